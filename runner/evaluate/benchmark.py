"""Multiple-choice benchmarks (MMLU, ARC, HellaSwag style): items read from a local JSONL/CSV/Parquet file or a hub
dataset, each choice scored after the question by rank mode's packed pass (runner.evaluate.rank), the choice with
the highest log-likelihood taken; an lm-evaluation-harness task instead where ``lm_eval`` is installed.

A benchmark is one entry of ``evaluation.retention`` (the schema's ``benchmark``): where its items come from, which
columns hold the question, the choices, the answer and the subject, the prompt template and whether the choices'
texts or their letters are scored.
"""

from __future__ import annotations

import importlib.util
import random
import string
from dataclasses import dataclass, replace

from evaluators.base import Record
from runner.common.errors import RecipeError, hub_unreachable, short
from runner.data import files
from runner.evaluate import backend
from runner.evaluate import rank as rank_mod
from runner.evaluate.generate import length_sorted_batches
from runner.model import attention
from runner.recipe.compose import is_local_path
from runner.recipe.templates import render, template_fields

LETTERS = string.ascii_uppercase
FIELDS = ("question", "choices", "subject")  # what a benchmark's template may name


@dataclass(frozen=True)
class Item:
    """One question: its choices, the gold choice's index, its subject (None where the data has none)."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None


def key(i: int, field: str | None = None) -> str:
    return f"evaluation.retention[{i}]" + (f".{field}" if field else "")


def check_recipe(recipe: dict) -> None:
    """Each benchmark names a source or an lm-eval task (installed), and a template of known fields; the run has an
    adapter to compare with its base."""
    if recipe["evaluation"]["retention"] and recipe["lora"] is None:
        raise RecipeError("evaluation.retention", "compares the base model with the adapter, and full fine-tuning "
                          "(lora: null) leaves no adapter to switch off", "train with lora, or evaluation.retention: []")
    for i, spec in enumerate(recipe["evaluation"]["retention"]):
        if spec["lm_eval"] is not None:
            if importlib.util.find_spec("lm_eval") is None:
                raise RecipeError(key(i, "lm_eval"), "the lm-evaluation-harness (lm_eval) is not installed",
                                  "pip install lm-eval, or give the benchmark a source file instead")
            continue
        if spec["source"] is None:
            raise RecipeError(key(i, "source"), "the benchmark has neither a source nor an lm_eval task",
                              "name a local JSONL/CSV/Parquet file or a hub dataset id")
        if is_local_path(spec["source"]):
            files.local_file(spec["source"], key(i, "source"))
        unknown = [f for f in template_fields(spec["template"], key(i, "template")) if f not in FIELDS]
        if unknown:
            raise RecipeError(key(i, "template"), f"unknown field {{{unknown[0]}}}",
                              f"a benchmark's template may use {', '.join('{' + f + '}' for f in FIELDS)}")


def _rows(spec: dict, i: int):
    """The benchmark's rows as a datasets.Dataset (a local file, else the hub)."""
    if is_local_path(spec["source"]):
        return files.read_local(spec["source"], key(i, "source"))
    from datasets import load_dataset

    try:
        return load_dataset(spec["source"], name=spec["subset"], split=spec["split"])
    except Exception as exc:
        unreachable = hub_unreachable(exc, key(i, "source"), spec["source"], "point it at a local file")
        if unreachable is not None:
            raise unreachable from None
        raise RecipeError(key(i, "source"), f"cannot load {spec['source']!r}: {type(exc).__name__}: "
                          f"{short(exc, 200)}", "check the id, subset and split") from None


def _choices(row: dict, spec: dict, i: int, n: int) -> tuple[str, ...]:
    columns = spec["choices"]
    if isinstance(columns, list):  # one column per choice (a CSV's A, B, C, D)
        return tuple(str(row[c]) for c in columns)
    value = row[columns]
    if isinstance(value, dict) and "text" in value:  # ARC's {"text": [...], "label": [...]}
        value = value["text"]
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise RecipeError(key(i, "choices"), f"row {n}: {columns!r} holds {short(value, 60)!r}, not a list of "
                          "two or more choices", "name the column that lists the choices, or one column per choice")
    return tuple(str(v) for v in value)


def _answer(value, choices: tuple[str, ...], i: int, n: int) -> int:
    """The gold choice's index from an index (0-based), a letter (A, B, ...) or the choice's text."""
    if isinstance(value, bool):
        value = None
    elif isinstance(value, (int, float)) and float(value).is_integer() and 0 <= int(value) < len(choices):
        return int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit() and int(text) < len(choices):
            return int(text)
        if len(text) == 1 and text.upper() in LETTERS[:len(choices)]:
            return LETTERS.index(text.upper())
        if text in choices:
            return choices.index(text)
    raise RecipeError(key(i, "answer"), f"row {n}: answer {short(value, 40)!r} is not an index, a letter or the text "
                      f"of one of its {len(choices)} choices", "name the column that holds the gold answer")


def load(spec: dict, i: int) -> list[Item]:
    """The benchmark's items: all of them, or ``max_items`` drawn once with a fixed seed (the same items for every
    recipe, base and adapter alike)."""
    rows = _rows(spec, i)
    needed = [spec["question"], spec["answer"]] + (spec["choices"] if isinstance(spec["choices"], list)
                                                   else [spec["choices"]]) + ([spec["subject"]] if spec["subject"] else [])
    missing = [c for c in needed if c not in rows.column_names]
    if missing:
        raise RecipeError(key(i), f"the data has no column {missing[0]!r}",
                          f"its columns: {short(', '.join(rows.column_names), 200)}")
    picked = range(len(rows))
    if spec["max_items"] is not None and spec["max_items"] < len(rows):
        picked = sorted(random.Random(0).sample(range(len(rows)), spec["max_items"]))
    items = []
    for n in picked:
        row = rows[n]
        choices = _choices(row, spec, i, n)
        items.append(Item(id=str(row.get("id", n)), question=str(row[spec["question"]]), choices=choices,
                          answer=_answer(row[spec["answer"]], choices, i, n),
                          subject=str(row[spec["subject"]]) if spec["subject"] else None))
    return items


def prompt(spec: dict, item: Item) -> str:
    listed = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(item.choices))
    return render(spec["template"], {"question": item.question, "choices": listed, "subject": item.subject or ""}, "")


def candidates(spec: dict, item: Item) -> list[str]:
    """What is scored after the prompt for each choice: " <text>" or " <letter>"."""
    if spec["answers"] == "letters":
        return [f" {LETTERS[j]}" for j in range(len(item.choices))]
    return [f" {c}" for c in item.choices]


def chosen(model, tokenizer, recipe: dict, spec: dict, items: list[Item]) -> list[int]:
    """The index of the choice the model finds most likely for each item (ties: the first), by rank mode's scoring:
    items with the same number of choices scored together, each item's prompt once with every choice packed after
    it (``rank.score_groups``; the plain backend: a row per choice). Nothing follows a choice (no EOS), as
    benchmarks are scored elsewhere. A merging backend is not used: the base is scored with the adapter disabled,
    so base and adapter run the same kernels and the paired difference is the adapter's."""
    out = [0] * len(items)
    by_k: dict[int, list[int]] = {}
    for n, item in enumerate(items):
        by_k.setdefault(len(item.choices), []).append(n)
    for k, members in by_k.items():
        texts = [prompt(spec, items[n]) for n in members]
        cands = [candidates(spec, items[n]) for n in members]
        ids = rank_mod.token_ids(tokenizer, texts)
        rows = rank_mod.tokenize_pairs(tokenizer, [t for t in texts for _ in range(k)], [c for cs in cands for c in cs],
                                       end="", prompt_ids=dict(zip(texts, ids)))
        groups = [rows[g * k:(g + 1) * k] for g in range(len(members))]
        lengths = [max(len(r) for r, _ in group) for group in groups]
        scored = max(n for group in groups for _, n in group)
        choice = backend.for_scoring(recipe, model, lengths, scored, rows_per_prompt=k, shared_prefix=True)
        if choice.merges:
            choice = replace(choice, backend="batched", why="the model as loaded: base and adapter alike")
        with backend.model_for(choice, model) as net, rank_mod.eval_mode(net), attention.for_scoring():
            batches = length_sorted_batches(lengths, choice.batch_size)
            queued = ((batch, _scores(net, tokenizer, [groups[g] for g in batch], choice)) for batch in batches)
            for batch, scores in rank_mod.one_behind(queued):
                for g, best in zip(batch, scores.argmax(-1).tolist()):
                    out[members[g]] = best
    return out


def _scores(net, tokenizer, groups: list, choice: backend.Choice):
    if choice.backend == "plain":
        return rank_mod.score_rows(net, tokenizer, [row for group in groups for row in group]).view(len(groups), -1)
    return rank_mod.score_groups(net, tokenizer, groups)


def records(items: list[Item], picks: list[int]) -> list[Record]:
    """The items as the multiple_choice evaluator reads them: the chosen choice's text against the gold one's."""
    return [Record(index=n, prompt=item.question, reference=item.choices[item.answer],
                   prediction=item.choices[pick], id=item.id, group=item.subject)
            for n, (item, pick) in enumerate(zip(items, picks))]


def lm_eval_records(model, tokenizer, spec: dict) -> list[Record]:
    """An lm-evaluation-harness task run on ``model`` as it is (lm_eval installed: runner.evaluate.benchmark's
    check_recipe says so first): each sample's ``acc`` as a record that is right (prediction = reference) or
    wrong, by document index."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    task = spec["lm_eval"]
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=spec["max_items"], log_samples=True)
    samples = out["samples"][task]
    return [Record(index=int(s["doc_id"]), prompt=str(s.get("doc", ""))[:200], reference="right",
                   prediction="right" if s["acc"] else "wrong", id=str(s["doc_id"]), group=task)
            for s in sorted(samples, key=lambda s: s["doc_id"])]
