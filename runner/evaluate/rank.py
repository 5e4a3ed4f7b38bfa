"""Log-likelihood scoring of completions after a prompt: classification by ranking the allowed labels
(``generation.mode: rank``) and the ``loss`` evaluator share it.

A completion is tokenized as TRL tokenizes it for training: ``prompt + completion + EOS`` as one text (chat data:
the chat template's end of turn instead of EOS, runner.data.chat.completion_end), the scored
tokens being those after the longest common prefix with the tokenized prompt alone. Rows are left-padded so every
completion ends at the right edge, and only the last positions' logits are computed (``logits_to_keep``, given
as the positions' indices: see ``last_columns``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from runner.common import dist
from runner.data import chat
from runner.evaluate import backend
from runner.evaluate.generate import length_sorted_batches
from runner.model import attention
from runner.recipe.checks import rank_labels
from runner.recipe.templates import render, template_fields

# Tokenizing threads: at most this many, each with at least MIN_CHUNK texts (fewer are not worth a thread).
MAX_TOKENIZE_THREADS = 8
MIN_CHUNK = 64


def candidate(recipe: dict, label: str, tokenizer=None) -> str:
    """The completion text the model was trained to write for ``label`` (e.g. ``" Sports"``; chat: the label as the
    chat template writes an answer after its generation prompt, e.g. Mistral's ``" Sports"`` after ``[/INST]``)."""
    if chat.is_chat(recipe):
        return (chat.answer_prefix(tokenizer) if tokenizer is not None else "") + label
    template = recipe["prompt"]["completion"]
    (field,) = template_fields(template, "prompt.completion")  # one field: the recipe checks say so in rank mode
    return render(template, {field: label}, recipe["prompt"]["list_separator"])


def tokenize_pairs(tokenizer, prompts: list[str], completions: list[str], end: str | None = None,
                   prompt_ids: dict[str, list[int]] | None = None) -> list[tuple[list[int], int]]:
    """(ids of prompt + completion + ``end``, number of scored tokens at the end) per pair, as TRL trains on them.
    ``end``: EOS, or a chat template's end of turn (runner.data.chat.completion_end); ``prompt_ids``: prompts already
    tokenized alone (rank mode tokenized them to size its batches)."""
    from trl.data_utils import common_prefix_length  # lazy: trl (and torch) load only when something is scored

    eos = tokenizer.eos_token if end is None else end
    full = token_ids(tokenizer, [p + c + eos for p, c in zip(prompts, completions)])
    alone = dict(prompt_ids or {})
    unique = [p for p in dict.fromkeys(prompts) if p not in alone]  # rank mode repeats each prompt once per label
    alone.update(zip(unique, token_ids(tokenizer, unique), strict=True))
    return [(ids, len(ids) - common_prefix_length(alone[p], ids)) for ids, p in zip(full, prompts)]


def token_ids(tokenizer, texts: list[str], workers: int | None = None) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]``, the texts split across threads on the cores this process may use. A fast
    tokenizer encodes without holding the GIL, so the threads run at once; its own thread pool (rayon) stays as
    TOKENIZERS_PARALLELISM says (the CLI turns it off: runner.common.cpu), and these threads end
    before this returns. Rank mode tokenizes four texts per example, a third of its time on one core."""
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(MAX_TOKENIZE_THREADS, cores, len(texts) // MIN_CHUNK)
    if workers < 2 or not getattr(tokenizer, "is_fast", False):  # a Python tokenizer holds the GIL: no gain
        return tokenizer(texts)["input_ids"] if texts else []
    tokenizer(texts[:1])  # settles the tokenizer's padding and truncation state here: the threads only read it
    size = -(-len(texts) // workers)
    with ThreadPoolExecutor(workers) as pool:
        parts = pool.map(lambda chunk: tokenizer(chunk)["input_ids"], [texts[i:i + size] for i in range(0, len(texts), size)])
        return [ids for part in parts for ids in part]


def _upload(values, device):
    """A host list as a tensor on ``device``, copied without making the host wait for the GPU: the next batch is
    tokenized and packed while this one runs (pinned memory, so the copy is asynchronous)."""
    import torch

    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def last_columns(width: int, keep: int, device):
    """The last ``keep`` of ``width`` columns as an index tensor, for ``logits_to_keep``. Given as a count, transformers
    slices the hidden states (a strided view) and the LM head runs as a batched matmul that reads its whole weight once
    per row (on an H200, 8 ms of a 170 ms rank-mode pass at batch 138); indexed, the slice is a contiguous copy and the
    head one matmul."""
    import torch

    return torch.arange(width - keep, width, device=device)


def score_rows(model, tokenizer, rows: list[tuple[list[int], int]]):
    """Summed log-probability of each row's last ``n`` tokens, in one forward pass over the rows; on the model's
    device, queued there (reading it waits for the pass)."""
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
    input_ids, attention, positions, scored = (_upload(t, device) for t in (input_ids, attention, positions, scored))
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                       logits_to_keep=last_columns(width, keep, device), use_cache=False).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_lp = logprobs.gather(-1, input_ids[:, width - keep + 1:].unsqueeze(-1)).squeeze(-1)
        return torch.where(scored, token_lp, 0.0).sum(-1)


def score_groups(model, tokenizer, groups: list[list[tuple[list[int], int]]]):
    """``score_rows`` for groups of rows that start with the same prompt (rank mode: one row per label, every group
    with as many), packed: each group is one row holding the shared prompt once and then every label's own tokens
    side by side. A 4-D attention mask lets each label's tokens see the prompt and themselves only, and their
    positions continue the prompt's, so each label is scored as if it followed the prompt alone: one forward pass
    per batch for about one prompt's compute, no KV cache. Equal to score_rows up to rounding.
    Returns [groups, rows per group] on the model's device, queued there as score_rows'."""
    import torch
    from trl.data_utils import common_prefix_length

    k = len(groups[0])
    # The shared part stops before the first scored token of every row (a scored token needs the logit before it).
    shared = [min(min(common_prefix_length(rows[0][0], ids) for ids, _ in rows), *(len(ids) - n for ids, n in rows))
              for rows in groups]
    packed = [_pack(rows, p) for rows, p in zip(groups, shared)]
    width = max(len(ids) for ids, _, _ in packed)
    windows = [w for w in attention.sliding_windows(model.config) if w is not None]
    if min(shared) == 0 or model.config._attn_implementation not in ("sdpa", "eager") or min(windows, default=width) < width:
        # no shared prompt to run once, an attention kernel that takes no custom mask, or a sliding window
        # narrower than the packed row (the custom mask replaces the window's, and packing stretches the distance
        # between a label's tokens and the prompt): a row per label
        return score_rows(model, tokenizer, [row for rows in groups for row in rows]).view(len(groups), k)
    keep = max(len(ids) - p for (ids, _, _), p in zip(packed, shared)) + 1  # the prompt's last logit + every tail
    input_ids, positions, segments = [], [], []  # segment: -1 padding, 0 the prompt, j + 1 label j's own tokens
    picks: list[tuple[int, int, int, int]] = []  # (group, kept column, target token, label)
    for g, ((ids, pos, spans), p) in enumerate(zip(packed, shared)):
        off = width - len(ids)  # left-padded: every packed row ends at the right edge
        input_ids.append([tokenizer.pad_token_id] * off + ids)
        positions.append([0] * off + pos)
        seg = [-1] * off + [0] * p
        for j, (a, b, n) in enumerate(spans):
            seg += [j + 1] * (b - a)
            for t in range(b - n, b):  # the label's scored tokens, each predicted by the position before it
                before = p - 1 if t == a else t - 1
                picks.append((g, off + before - (width - keep), ids[t], j))
        segments.append(seg)
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    seg, input_ids, positions = (_upload(x, device) for x in (segments, input_ids, positions))
    rows, cols, targets, labels = (_upload(x, device) for x in zip(*picks))
    # A query sees the keys at or before it that are the prompt's or its own label's (padding: only padding).
    allowed = torch.ones(width, width, dtype=torch.bool, device=device).tril() & (
        (seg[:, None, :] == 0) & (seg[:, :, None] >= 0) | (seg[:, None, :] == seg[:, :, None]))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask[:, None], position_ids=positions,
                       logits_to_keep=last_columns(width, keep, device), use_cache=False).logits
        token_lp = torch.log_softmax(logits[rows, cols].float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        sums = torch.zeros(len(groups) * k, device=device).index_add_(0, rows * k + labels, token_lp)
        return sums.view(len(groups), k)


def _pack(rows: list[tuple[list[int], int]], p: int) -> tuple[list[int], list[int], list[tuple[int, int, int]]]:
    """One group as a packed row: (ids, position ids, per label (start, end, scored tokens) of its own tokens)."""
    ids, pos, spans = list(rows[0][0][:p]), list(range(p)), []
    for row, n in rows:
        tail = row[p:]
        spans.append((len(ids), len(ids) + len(tail), n))
        ids += tail
        pos += range(p, p + len(tail))
    return ids, pos, spans


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
                        batch_size: int | None = None, choice: backend.Choice | None = None) -> list[tuple[float, int]]:
    """(summed log-probability, scored tokens) of each completion + EOS after its prompt, with ``choice``'s backend
    and batch size when given, else in batches of ``batch_size`` rows or as runner.evaluate.backend sizes them (on
    the merged copy where the backend merges)."""
    rows = tokenize_pairs(tokenizer, prompts, completions, chat.completion_end(recipe, tokenizer))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    if not rows:
        return out
    lengths = [len(ids) for ids, _ in rows]
    choice = choice or backend.for_scoring(recipe, model, lengths, max(n for _, n in rows), batch_size=batch_size)
    with backend.model_for(choice, model) as net, eval_mode(net), attention.for_scoring():
        queued = ((batch, score_rows(net, tokenizer, [rows[i] for i in batch]))
                  for batch in length_sorted_batches(lengths, choice.batch_size))
        for batch, sums in one_behind(queued):
            for i, s in zip(batch, sums.tolist()):
                out[i] = (s, rows[i][1])
    return out


def one_behind(items: Iterator) -> Iterator:
    """``items``, each handed on only once the next one has been made: a batch's scores are read (which waits for
    the GPU) after the next batch was tokenized, packed and queued, so the host's work overlaps the GPU's."""
    previous = sentinel = object()
    for item in items:
        if previous is not sentinel:
            yield previous
        previous = item
    if previous is not sentinel:
        yield previous


def _candidates(recipe: dict, tokenizer) -> tuple[list[str], list[str], int]:
    """(labels, their completion texts, the most tokens a completion + EOS takes)."""
    labels = rank_labels(recipe)
    cands = [candidate(recipe, label, tokenizer) for label in labels]
    end = chat.completion_end(recipe, tokenizer)
    longest = max(len(tokenizer(c + end, add_special_tokens=False)["input_ids"]) for c in cands)
    return labels, cands, longest


def _choice(model, recipe: dict, prompt_ids: list[list[int]], cands: list[str], longest: int) -> backend.Choice:
    """The backend and batch size (prompts per forward pass) that rank prompts of these token ids."""
    lengths = [len(one) + longest for one in prompt_ids] or [longest]
    return backend.for_scoring(recipe, model, lengths, longest, rows_per_prompt=len(cands), shared_prefix=True)


def choose(model, tokenizer, prompts: list[str], recipe: dict, skip: set[int] = frozenset()) -> backend.Choice:
    """The backend and batch size (prompts per forward pass) ``rank`` uses for these prompts (runner.evaluate.backend)."""
    _, cands, longest = _candidates(recipe, tokenizer)
    ids = token_ids(tokenizer, [p for i, p in enumerate(prompts) if i not in skip])
    return _choice(model, recipe, ids, cands, longest)


def rank(model, tokenizer, prompts: list[str], recipe: dict, skip: set[int] = frozenset(),
         on_batch: Callable[[list[tuple[int, str]]], None] | None = None, choice: backend.Choice | None = None,
         cudnn_attention: bool | None = None) -> dict[int, str]:
    """The most likely allowed label for each prompt (by index), streamed batch by batch to ``on_batch``.

    Same interface as ``runner.evaluate.generate.generate`` (``choice``: decided here by ``choose`` unless given;
    ``cudnn_attention``: forced instead of scoring's own choice). Each batch of prompts becomes prompts x labels
    rows, scored in one forward pass on the plain backend, and on the others with each prompt run once
    (``score_groups``); the prediction is always one of the labels (ties go to the label listed first).
    """
    labels, cands, longest = _candidates(recipe, tokenizer)
    todo = [i for i in range(len(prompts)) if i not in skip]
    if not todo:
        return {}
    prompt_ids = token_ids(tokenizer, [prompts[i] for i in todo])
    choice = choice or _choice(model, recipe, prompt_ids, cands, longest)
    lengths = [len(ids) for ids in prompt_ids]
    end = chat.completion_end(recipe, tokenizer)

    def queued(net):
        # Under a launcher, this rank's share of the batches (one process: all of them).
        for batch in dist.share(length_sorted_batches(lengths, dist.balanced(choice.batch_size, len(lengths)))):
            texts = [prompts[todo[j]] for j in batch]
            pairs = tokenize_pairs(tokenizer, [p for p in texts for _ in cands], cands * len(batch), end,
                                   prompt_ids={p: prompt_ids[j] for p, j in zip(texts, batch)})
            if choice.backend == "plain":
                scores = score_rows(net, tokenizer, pairs).view(len(batch), len(cands))
            else:
                scores = score_groups(net, tokenizer, [pairs[g:g + len(cands)] for g in range(0, len(pairs), len(cands))])
            yield [todo[j] for j in batch], scores

    results: dict[int, str] = {}
    with backend.model_for(choice, model) as net, eval_mode(net), attention.for_scoring(cudnn_attention):
        for indices, scores in one_behind(queued(net)):
            done = [(i, labels[best]) for i, best in zip(indices, scores.argmax(-1).tolist())]
            results.update(done)
            if on_batch:
                on_batch(done)
    return results
