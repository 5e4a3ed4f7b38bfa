"""Log-likelihood scoring of completions after a prompt: classification by ranking the allowed labels
(``generation.mode: rank``) and the ``loss`` evaluator share it.

A completion is tokenized as TRL tokenizes it for training: ``prompt + completion + EOS`` as one text, the scored
tokens being those after the longest common prefix with the tokenized prompt alone. Rows are left-padded so every
completion ends at the right edge, and only the last positions' logits are computed (``logits_to_keep``).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from contextlib import contextmanager

from runner import chat, dist
from runner.data import render
from runner.errors import RecipeError
from runner.generate import length_sorted_batches


def rank_labels(recipe: dict) -> list[str] | None:
    """The allowed labels: ``generation.labels``, else the first classification evaluator's ``labels``."""
    if recipe["generation"].get("labels"):
        return list(recipe["generation"]["labels"])
    for spec in recipe["evaluation"]["evaluators"]:
        if spec["name"] == "classification" and spec.get("labels"):
            return list(spec["labels"])
    return None


def check_recipe(recipe: dict) -> None:
    """What rank mode needs from a recipe; called by the recipe cross-checks (no torch here)."""
    if recipe["generation"].get("mode") != "rank":
        return
    if not rank_labels(recipe):
        raise RecipeError("generation.mode", "rank needs the allowed labels",
                          "set generation.labels: [...] or give the classification evaluator its labels")
    if chat.is_chat(recipe):
        return  # each label is the last assistant turn's content
    fields = [f for _, f, _, _ in string.Formatter().parse(recipe["prompt"]["completion"]) if f]
    if len(set(fields)) != 1:
        raise RecipeError("prompt.completion", f"rank mode puts each label into the completion, which must use "
                          f"exactly one field, found {len(set(fields))}", "e.g. completion: \" {label}\"")


def candidate(recipe: dict, label: str) -> str:
    """The completion text the model was trained to write for ``label`` (e.g. ``" Sports"``; chat: the label)."""
    if chat.is_chat(recipe):
        return label
    template = recipe["prompt"]["completion"]
    field = next(f for _, f, _, _ in string.Formatter().parse(template) if f)
    return render(template, {field: label}, recipe["prompt"]["list_separator"])


def tokenize_pairs(tokenizer, prompts: list[str], completions: list[str],
                   end: str | None = None) -> list[tuple[list[int], int]]:
    """(ids of prompt + completion + ``end``, number of scored tokens at the end) per pair, as TRL trains on them.
    ``end``: EOS, or a chat template's end of turn (runner.chat.completion_end)."""
    from trl.data_utils import common_prefix_length  # lazy: `runner validate` imports this module without torch

    eos = tokenizer.eos_token if end is None else end
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


def score_groups(model, tokenizer, groups: list[list[tuple[list[int], int]]]):
    """``score_rows`` for groups of rows that start with the same prompt (rank mode: one row per label, every group
    with as many): the shared tokens run once per group, then each label's own tokens continue that KV cache, one
    label at a time (the cache is cropped back to the prompt after each, so it is held once, not once per label).
    Equal to score_rows up to rounding, for about one prompt's compute instead of one per label.
    Returns [groups, rows per group]."""
    import torch
    from trl.data_utils import common_prefix_length

    device = next(model.parameters()).device
    pad, k = tokenizer.pad_token_id, len(groups[0])
    # The shared part stops before the first scored token of every row (a scored token needs the logit before it).
    shared = [min(min(common_prefix_length(rows[0][0], ids) for ids, _ in rows), *(len(ids) - n for ids, n in rows))
              for rows in groups]
    if min(shared) == 0:  # a group whose rows share no token: nothing to run once
        return score_rows(model, tokenizer, [row for rows in groups for row in rows]).view(len(groups), k)
    width = max(shared)
    prefix = torch.full((len(groups), width), pad, dtype=torch.long)
    prefix_mask = torch.zeros((len(groups), width), dtype=torch.long)
    for g, (rows, p) in enumerate(zip(groups, shared)):
        prefix[g, width - p:] = torch.tensor(rows[0][0][:p])  # left-padded: every prefix ends at the right edge
        prefix_mask[g, width - p:] = 1
    sums = torch.zeros((len(groups), k))
    with torch.inference_mode():
        out = model(input_ids=prefix.to(device), attention_mask=prefix_mask.to(device),
                    position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True,
                    logits_to_keep=1)
        cache = out.past_key_values
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        for j in range(k):
            tail, tail_mask, scored = _tails([(rows[j][0][p:], rows[j][1]) for rows, p in zip(groups, shared)], pad)
            logits = model(input_ids=tail.to(device), past_key_values=cache, use_cache=True,
                           attention_mask=torch.cat([prefix_mask, tail_mask], 1).to(device),
                           position_ids=(torch.tensor(shared)[:, None] + torch.arange(tail.shape[1])).to(device)).logits
            cache.crop(-tail.shape[1])  # back to the prompt for the next label
            # Tail token t is predicted by the prompt's last logit (t = 0) or by the tail's logit at t - 1.
            logprobs = torch.cat([first[:, None], torch.log_softmax(logits[:, :-1].float(), dim=-1)], 1)
            token_lp = logprobs.gather(-1, tail.to(device).unsqueeze(-1)).squeeze(-1)
            sums[:, j] = torch.where(scored.to(device), token_lp, 0.0).sum(-1).cpu()
    return sums


def _tails(tails: list[tuple[list[int], int]], pad: int):
    """Right-padded [rows, longest] ids, their mask, and which positions are the row's last ``n`` (scored)."""
    import torch

    width = max(len(ids) for ids, _ in tails)
    ids_t = torch.full((len(tails), width), pad, dtype=torch.long)
    mask = torch.zeros((len(tails), width), dtype=torch.long)
    scored = torch.zeros((len(tails), width), dtype=torch.bool)
    for r, (ids, n) in enumerate(tails):
        ids_t[r, :len(ids)] = torch.tensor(ids)  # right-padded: each row continues right after its prompt
        mask[r, :len(ids)] = 1
        scored[r, len(ids) - n:len(ids)] = True
    return ids_t, mask, scored


@contextmanager
def eval_mode(model):
    """Dropout off while scoring; the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def completion_logprobs(model, tokenizer, prompts: list[str], completions: list[str], recipe: dict,
                        batch_size: int | None = None) -> list[tuple[float, int]]:
    """(summed log-probability, scored tokens) of each completion + EOS after its prompt, in batches of
    ``batch_size`` rows, else as runner.backend sizes them (on the merged copy where the backend merges)."""
    from runner import backend

    rows = tokenize_pairs(tokenizer, prompts, completions, chat.completion_end(recipe, tokenizer))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    if not rows:
        return out
    lengths = [len(ids) for ids, _ in rows]
    choice = backend.for_scoring(recipe, model, lengths, max(n for _, n in rows), batch_size=batch_size)
    with backend.model_for(choice, model) as net, eval_mode(net):
        for batch in length_sorted_batches(lengths, choice.batch_size):
            sums = score_rows(net, tokenizer, [rows[i] for i in batch])
            for i, s in zip(batch, sums.tolist()):
                out[i] = (s, rows[i][1])
    return out


def _candidates(recipe: dict, tokenizer) -> tuple[list[str], list[str], int]:
    """(labels, their completion texts, the most tokens a completion + EOS takes)."""
    labels = rank_labels(recipe)
    cands = [candidate(recipe, label) for label in labels]
    end = chat.completion_end(recipe, tokenizer)
    longest = max(len(tokenizer(c + end, add_special_tokens=False)["input_ids"]) for c in cands)
    return labels, cands, longest


def choose(model, tokenizer, prompts: list[str], recipe: dict, skip: set[int] = frozenset()):
    """The backend and batch size (prompts per forward pass) ``rank`` uses for these prompts (runner.backend)."""
    from runner import backend

    _, cands, longest = _candidates(recipe, tokenizer)
    todo = [prompts[i] for i in range(len(prompts)) if i not in skip]
    lengths = [len(ids) + longest for ids in tokenizer(todo)["input_ids"]] if todo else [longest]
    return backend.for_scoring(recipe, model, lengths, longest, rows_per_prompt=len(cands), shared_prefix=True)


def rank(model, tokenizer, prompts: list[str], recipe: dict, skip: set[int] = frozenset(),
         on_batch: Callable[[list[tuple[int, str]]], None] | None = None) -> dict[int, str]:
    """The most likely allowed label for each prompt (by index), streamed batch by batch to ``on_batch``.

    Same interface as ``runner.generate.generate``. Each batch of prompts becomes prompts x labels rows, scored in
    one forward pass on the plain backend, and on the others with each prompt run once (``score_groups``); the
    prediction is always one of the labels (ties go to the label listed first).
    """
    from runner import backend

    labels, cands, longest = _candidates(recipe, tokenizer)
    todo = [i for i in range(len(prompts)) if i not in skip]
    if not todo:
        return {}
    lengths = [len(ids) for ids in tokenizer([prompts[i] for i in todo])["input_ids"]]
    choice = backend.for_scoring(recipe, model, [n + longest for n in lengths], longest, rows_per_prompt=len(cands),
                                 shared_prefix=True)
    results: dict[int, str] = {}
    with backend.model_for(choice, model) as net, eval_mode(net):
        # Under a launcher, this rank's share of the batches (one process: all of them).
        for batch in dist.share(length_sorted_batches(lengths, choice.batch_size)):
            indices = [todo[j] for j in batch]
            pairs = tokenize_pairs(tokenizer, [prompts[i] for i in indices for _ in cands],
                                   [c for _ in indices for c in cands], chat.completion_end(recipe, tokenizer))
            if choice.backend == "plain":
                scores = score_rows(net, tokenizer, pairs).view(len(indices), len(cands))
            else:
                scores = score_groups(net, tokenizer, [pairs[g:g + len(cands)] for g in range(0, len(pairs), len(cands))])
            done = [(i, labels[int(row.argmax())]) for i, row in zip(indices, scores)]
            results.update(done)
            if on_batch:
                on_batch(done)
    return results
