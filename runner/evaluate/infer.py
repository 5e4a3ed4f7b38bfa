"""Inference on a user's own inputs (``runner generate``): JSONL records or raw text lines -> rendered prompts ->
completions, through the same template, truncation and decoding settings as evaluation."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from runner.common.errors import RecipeError, bad_text
from runner.data import chat
from runner.data.data import cap_text, char_cap, shorten
from runner.evaluate import evaluate
from runner.recipe.loader import not_a_file
from runner.recipe.templates import render, template_fields


def main_field(recipe: dict) -> str:
    """The template field raw text goes into: ``prompt.truncate``, or the template's only field."""
    fields = template_fields(recipe["prompt"]["template"], "prompt.template")
    main = recipe["prompt"]["truncate"] or (fields[0] if len(fields) == 1 else None)
    others = [f for f in fields if f != main]
    if main is None or others:
        raise RecipeError("--input", f"a raw text line fills one field, but prompt.template uses "
                          f"{', '.join('{' + f + '}' for f in fields)}",
                          "give JSONL records with those fields, one per line")
    return main


def open_input(source: str) -> Iterable[str]:
    if source == "-":
        if sys.stdin.isatty():
            print("reading inputs from standard input, one per line (end with Ctrl-D)", file=sys.stderr, flush=True)
        return _decode(sys.stdin.buffer.read(), "standard input")
    path = Path(source)
    problem = not_a_file(path)
    if problem:
        raise RecipeError("--input", f"file not found: {path}" if problem == "not found" else f"{path} {problem}",
                          "a .jsonl of records or a text file, or - for stdin")
    return _decode(path.read_bytes(), path.name)


def _decode(raw: bytes, name: str) -> list[str]:
    try:
        # lines end at a newline only: str.splitlines() would also split inside a record at U+2028, U+0085, ...
        return [line.removesuffix("\r") for line in raw.decode("utf-8-sig").split("\n")]
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError("--input", f"{name} is not UTF-8 text (line {line}, byte {exc.start})",
                          "save it as UTF-8, e.g. iconv -t utf-8") from None


def read_inputs(lines: Iterable[str], recipe: dict) -> list[dict]:
    """One record per non-empty line: a JSON object with the template's fields (a line starting with ``{``), or raw
    text for the main field. Chat recipes: a JSON object whose prompt.messages field holds the conversation so far
    (ending with a user turn), or raw text as one user turn."""
    if chat.is_chat(recipe):
        return _read_conversations(lines, recipe)
    fields = template_fields(recipe["prompt"]["template"], "prompt.template")
    rows, main = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _json_object(line, number)
        if record is not None:
            missing = [f for f in fields if f not in record]
            if missing:
                raise RecipeError("--input", f"line {number}: the record has no {missing[0]!r} field",
                                  f"prompt.template uses {', '.join(fields)}")
            rows.append(record)
            continue
        main = main or main_field(recipe)
        rows.append({main: line.strip()})
    if not rows:
        raise RecipeError("--input", "has no inputs", "give one JSON record or one text per line")
    return rows


def _read_conversations(lines: Iterable[str], recipe: dict) -> list[dict]:
    column = recipe["prompt"]["messages"]
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _json_object(line, number)
        if record is None:
            rows.append({column: [{"role": "user", "content": line.strip()}]})
            continue
        if column not in record:
            raise RecipeError("--input", f"line {number}: the record has no {column!r} field",
                              "give the conversation so far as {\"" + column + "\": [{\"role\": \"user\", ...}]}")
        try:
            turns = chat.check_turns(record[column], f"line {number}", final_assistant=False)
        except RecipeError as exc:
            raise RecipeError("--input", exc.problem, exc.hint) from None
        if turns[-1]["role"] == "assistant":
            raise RecipeError("--input", f"line {number}: the conversation ends with an assistant turn",
                              "end it with the user turn the model answers")
        rows.append({**record, column: turns})
    if not rows:
        raise RecipeError("--input", "has no inputs", "give one JSON record or one text per line")
    return rows


def _json_object(line: str, number: int) -> dict | None:
    """The line's JSON record, or None for raw text. A line that starts with ``{`` is a record: one that does not
    parse is a broken record, never an article that happens to start with a brace."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)  # starts with "{": an object, if it parses at all
    except json.JSONDecodeError as exc:
        raise RecipeError("--input", f"line {number}: not valid JSON", f"{exc.msg} at column {exc.colno}; a line "
                          "that starts with '{' is read as a JSON record") from None
    bad = bad_text(record)
    if bad:
        raise RecipeError("--input", f"line {number}: {bad}", _SURROGATE_HINT)
    return record


_SURROGATE_HINT = ("a \\uD800-\\uDFFF escape is half of a character: write the character itself, or both halves "
                   "of the pair")


def fit_prompt(row: dict, recipe: dict, tokenizer) -> tuple[str, bool]:
    """The rendered prompt, with ``prompt.truncate`` shortened (from the end, in tokens) so the prompt and
    ``generation.max_new_tokens`` fit ``prompt.max_length`` as in training. Returns (prompt, was it shortened).
    A chat input is rendered with the recipe's chat template, as evaluation renders it, and never shortened."""
    p = recipe["prompt"]
    if chat.is_chat(recipe):
        return chat.render_prompt(tokenizer, row[p["messages"]]), False
    sep, field = p["list_separator"], p["truncate"]
    budget = max(p["max_length"] - recipe["generation"]["max_new_tokens"], 1)
    cap = char_cap(tokenizer, p["max_length"])  # a huge input is cut before it is tokenized whole
    row = {k: cap_text(v, cap, sep) for k, v in row.items()}
    prompt = render(p["template"], row, sep)
    count = len(tokenizer(prompt)["input_ids"])
    if count <= budget or field is None:
        return prompt, False
    cut, _ = shorten(row, p, tokenizer, count, budget)
    return (prompt if cut is None else cut), True


def complete(model, tokenizer, prompts: list[str], recipe: dict) -> list[str]:
    """Completions in input order, with the recipe's generation.mode and decoding settings (the backend and batch
    size decided once, here, as evaluation decides them)."""
    from tqdm.auto import tqdm

    choice = evaluate.choose(model, tokenizer, prompts, recipe)
    with tqdm(total=len(prompts), desc="generating", unit=" inputs", file=sys.stderr, dynamic_ncols=True) as bar:
        results = evaluate.predict(model, tokenizer, prompts, recipe, choice, on_batch=lambda b: bar.update(len(b)))
    return [results[i] for i in range(len(prompts))]
