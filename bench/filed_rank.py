"""Rank mode as it was when issue 9 was filed ("today's" in the issue: commit feed1da, runner/rank.py), kept
verbatim so bench/generate_bench.py can time it beside today's code in one process. Only the imports changed
(``render`` moved to runner.recipe.templates; ``check_recipe`` and its RecipeError import dropped: the bench's recipe is
valid). Each batch of prompts becomes prompts x labels rows on the model as loaded (4-bit + LoRA); each prompt is
tokenized nine times (for its length, then alone and with each of 4 labels), on one thread, and each batch's
scores are read before the next batch is built.
"""
from __future__ import annotations

import string
from collections.abc import Callable
from contextlib import contextmanager

from runner.evaluate.generate import length_sorted_batches
from runner.recipe.templates import render


def rank_labels(recipe: dict) -> list[str] | None:
    """The allowed labels: ``generation.labels``, else the first classification evaluator's ``labels``."""
    if recipe["generation"].get("labels"):
        return list(recipe["generation"]["labels"])
    for spec in recipe["evaluation"]["evaluators"]:
        if spec["name"] == "classification" and spec.get("labels"):
            return list(spec["labels"])
    return None


def candidate(recipe: dict, label: str) -> str:
    """The completion text the model was trained to write for ``label`` (e.g. ``" Sports"``)."""
    template = recipe["prompt"]["completion"]
    field = next(f for _, f, _, _ in string.Formatter().parse(template) if f)
    return render(template, {field: label}, recipe["prompt"]["list_separator"])


def tokenize_pairs(tokenizer, prompts: list[str], completions: list[str]) -> list[tuple[list[int], int]]:
    """(ids of prompt + completion + EOS, number of scored tokens at the end) per pair, as TRL trains on them."""
    from trl.data_utils import common_prefix_length  # lazy: `runner validate` imports this module without torch

    eos = tokenizer.eos_token
    full = tokenizer([p + c + eos for p, c in zip(prompts, completions)])["input_ids"]
    alone = tokenizer(list(prompts))["input_ids"]
    return [(ids, len(ids) - common_prefix_length(p_ids, ids)) for ids, p_ids in zip(full, alone)]


def score_rows(model, tokenizer, rows: list[tuple[list[int], int]]):
    """Summed log-probability of each row's last ``n`` tokens, in one forward pass over the rows."""
    import torch

    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in rows)
    keep = max(n for _, n in rows) + 1
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), keep - 1), dtype=torch.bool)
    for r, (ids, n) in enumerate(rows):
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        attention[r, width - len(ids):] = 1
        scored[r, keep - 1 - n:] = True
    # Left padding: positions count real tokens only, as they did in training.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                       position_ids=positions.to(device), logits_to_keep=keep, use_cache=False).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, width - keep + 1:].to(device)
    token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(scored.to(device), token_lp, 0.0).sum(-1).cpu()


@contextmanager
def eval_mode(model):
    """Dropout off while scoring; the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def completion_logprobs(model, tokenizer, prompts: list[str], completions: list[str],
                        batch_size: int) -> list[tuple[float, int]]:
    """(summed log-probability, scored tokens) of each completion + EOS after its prompt."""
    rows = tokenize_pairs(tokenizer, prompts, completions)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    with eval_mode(model):
        for batch in length_sorted_batches([len(ids) for ids, _ in rows], batch_size):
            sums = score_rows(model, tokenizer, [rows[i] for i in batch])
            for i, s in zip(batch, sums.tolist()):
                out[i] = (s, rows[i][1])
    return out


def rank(model, tokenizer, prompts: list[str], recipe: dict, skip: set[int] = frozenset(),
         on_batch: Callable[[list[tuple[int, str]]], None] | None = None) -> dict[int, str]:
    """The most likely allowed label for each prompt (by index), streamed batch by batch to ``on_batch``.

    Same interface as ``runner.evaluate.generate.generate``. Each batch of prompts becomes prompts x labels rows scored in
    one forward pass; the prediction is always one of the labels (ties go to the label listed first).
    """
    labels = rank_labels(recipe)
    cands = [candidate(recipe, label) for label in labels]
    todo = [i for i in range(len(prompts)) if i not in skip]
    lengths = [len(ids) for ids in tokenizer([prompts[i] for i in todo])["input_ids"]]
    results: dict[int, str] = {}
    with eval_mode(model):
        for batch in length_sorted_batches(lengths, recipe["generation"]["batch_size"]):
            indices = [todo[j] for j in batch]
            pairs = tokenize_pairs(tokenizer, [prompts[i] for i in indices for _ in cands],
                                   [c for _ in indices for c in cands])
            scores = score_rows(model, tokenizer, pairs).view(len(indices), len(cands))
            done = [(i, labels[int(row.argmax())]) for i, row in zip(indices, scores)]
            results.update(done)
            if on_batch:
                on_batch(done)
    return results
