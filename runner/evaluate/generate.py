"""Batched generation: length-sorted batches, left padding, the recipe's decoding settings, stop strings."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from runner.common import dist
from runner.data import chat
from runner.evaluate import backend as backend_mod
from runner.model import attention


def generation_config(recipe: dict, tokenizer, backend: str = "plain"):
    from transformers import GenerationConfig

    g = recipe["generation"]
    kwargs = dict(max_new_tokens=g["max_new_tokens"], num_beams=g["num_beams"],
                  repetition_penalty=g["repetition_penalty"], do_sample=g["do_sample"],
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if g["do_sample"]:
        kwargs.update(top_p=g["top_p"], temperature=g["temperature"], top_k=g["top_k"] or 0)
    stops = chat.stop_strings(recipe, tokenizer)
    if stops:
        kwargs["stop_strings"] = stops
    if backend != "plain" and g["num_beams"] == 1:
        # Written in place every step instead of re-concatenated; transformers compiles the decoding step of a
        # model with a static cache on a GPU unless told not to: only the compiled backend lets it.
        kwargs.update(cache_implementation="static", disable_compile=backend != "compiled")
    return GenerationConfig(**kwargs)


def cut_at_stop(text: str, stops: Iterable[str]) -> str:
    """The prediction up to the first stop string; surrounding whitespace removed."""
    end = len(text)
    for stop in stops:
        # A leading stop (the model starting with a newline) is not the end of an answer.
        pos = text.find(stop, len(text) - len(text.lstrip()))
        if pos != -1:
            end = min(end, pos)
    return text[:end].strip()


def length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first), so little padding is computed."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def choose(model, tokenizer, prompts: list[str], recipe: dict, skip: set[int] = frozenset()) -> backend_mod.Choice:
    """The backend and batch size ``generate`` uses for these prompts (runner.evaluate.backend)."""
    todo = [i for i in range(len(prompts)) if i not in skip]
    return backend_mod.for_generation(recipe, model, _lengths(tokenizer, [prompts[i] for i in todo]) or [1])


def _lengths(tokenizer, texts: list[str]) -> list[int]:
    # Special tokens as the tokenizer adds them by default: TRL tokenized the training prompts that way (a BOS).
    return [len(ids) for ids in tokenizer(texts)["input_ids"]] if texts else []


def generate(model, tokenizer, prompts: list[str], recipe: dict, skip: set[int] = frozenset(),
             on_batch: Callable[[list[tuple[int, str]]], None] | None = None, choice: backend_mod.Choice | None = None,
             cudnn_attention: bool | None = None) -> dict[int, str]:
    """Completions for ``prompts`` (by index), streamed batch by batch to ``on_batch``.

    ``choice``: the backend and batch size to run (runner.evaluate.backend), as the caller decided and recorded them;
    decided here (``choose``) when not given. Every backend runs ``model.generate`` with the recipe's decoding
    settings on length-sorted, left-padded batches. ``cudnn_attention``: cuDNN's SDPA forced on or off instead of
    generation's own choice (runner.model.attention; bench/decode_probe.py compares the two).
    """
    import torch
    from transformers import set_seed

    todo = [i for i in range(len(prompts)) if i not in skip]
    if not todo:
        return {}
    lengths = _lengths(tokenizer, [prompts[i] for i in todo])
    choice = choice or backend_mod.for_generation(recipe, model, lengths)
    config = generation_config(recipe, tokenizer, choice.backend)
    stops = chat.stop_strings(recipe, tokenizer)
    results: dict[int, str] = {}
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    was_training = model.training
    model.eval()
    try:
        with backend_mod.model_for(choice, model) as net, attention.for_generation(cudnn_attention):
            set_seed(recipe["seed"])  # after the copy is made: sampling draws start from the seed on every backend
            device = next(net.parameters()).device
            size = dist.balanced(choice.batch_size, len(lengths))
            # Under a launcher, this rank's share of the batches (one process: all of them).
            for batch in dist.share(length_sorted_batches(lengths, size)):
                indices = [todo[j] for j in batch]
                texts = [prompts[i] for i in indices]
                if choice.backend == "compiled":  # one batch shape: the captured CUDA graph is replayed, not redone
                    texts += texts[-1:] * (size - len(texts))
                enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
                with torch.inference_mode():
                    out = net.generate(**enc, generation_config=config, tokenizer=tokenizer)
                texts = tokenizer.batch_decode(out[:len(indices), enc["input_ids"].shape[1]:], skip_special_tokens=True)
                done = [(i, chat.cut_partial_end(recipe, tokenizer, cut_at_stop(t, stops)))
                        for i, t in zip(indices, texts, strict=True)]
                results.update(done)
                if on_batch:
                    on_batch(done)
    finally:
        tokenizer.padding_side = "right"
        model.train(was_training)
    return results
