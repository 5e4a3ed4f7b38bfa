"""Local data files (JSON Lines, JSON, CSV, Parquet): read whole through datasets, or peeked at from their start
for their columns (``runner validate``, no datasets); a file that cannot be read is one RecipeError at its key."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from runner.common.errors import RecipeError, bad_text, os_fault
from runner.recipe.compose import DATA_SUFFIXES
from runner.recipe.loader import not_a_file

# datasets' and pandas' words for a file that parses to no rows (a CSV header alone, blank lines, []).
_NO_ROWS = re.compile(r"corresponds to no data|No columns to parse")
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _json_rows(path: Path):
    """The rows of a JSON Lines file, one per non-empty line; a line that is no JSON object raises ValueError
    saying which."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {number} is not a JSON object")
            bad = bad_text(row)
            if bad:
                raise ValueError(f"line {number}: {bad} (a \\uD800-\\uDFFF escape is half of a character)")
            yield row


def _first_bad_json_line(path: Path) -> str | None:
    try:
        for _ in _json_rows(path):
            pass
    except ValueError as exc:
        return str(exc)
    return None


def _unreadable(p: Path, reason: str, key_path: str) -> RecipeError:
    return RecipeError(key_path, f"cannot read {p.name}: {reason[:200]}",
                       f"check that it is valid {p.suffix.lstrip('.').upper()}")


def local_file(path: str, key_path: str) -> Path:
    """``path`` as a data file the runner reads: one that exists, of a type it knows."""
    p = Path(path)
    problem = not_a_file(p)
    if problem == "not found":
        raise RecipeError(key_path, f"file not found: {p}",
                          "paths in a recipe are relative to the recipe file, on the command line to where you run it")
    if problem:
        raise RecipeError(key_path, f"{p} {problem}", f"name a {'/'.join(DATA_SUFFIXES)} file")
    if p.suffix.lower() not in _FORMATS:
        raise RecipeError(key_path, f"unsupported file type {p.suffix!r}", f"use one of {', '.join(DATA_SUFFIXES)}")
    return p


def read_local(path: str, key_path: str):
    """The rows of a local data file as a datasets.Dataset; a file with no rows or that does not parse is refused."""
    from datasets import load_dataset

    p = local_file(path, key_path)
    no_rows = RecipeError(key_path, f"{p.name} has no rows", "add examples to it, or name another file")
    if p.stat().st_size == 0:
        raise no_rows
    try:
        ds = load_dataset(_FORMATS[p.suffix.lower()], data_files=str(p), split="train", keep_in_memory=True)
    except Exception as exc:  # datasets wraps parser errors in several types; all mean "can't read this file"
        fault = os_fault(exc)  # unless it is the machine's: a cache folder not writable, a link loop, a full disk
        if fault is not None:
            raise fault from None
        cause = _root_cause(exc)
        if _NO_ROWS.search(cause):
            raise no_rows from None
        reason = _first_bad_json_line(p) if p.suffix.lower() == ".jsonl" else None
        raise _unreadable(p, reason or cause, key_path) from None
    if len(ds) == 0:
        raise no_rows
    return ds


# How many rows of a JSON Lines file `runner validate` reads for its columns: datasets reads the file in blocks
# that must agree on their columns, so the first rows name them.
PEEK_ROWS = 100


def peek(p: Path, key_path: str) -> tuple[list[str], dict | None] | None:
    """(columns, first row or None) of a local data file, read from its start only (a CSV's header, a JSON Lines
    file's first rows, a Parquet file's schema); None where the start cannot tell (a JSON document, an empty file)."""
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(p).names, None
        except Exception as exc:  # pyarrow's ArrowInvalid and OSError alike: not a Parquet file
            raise _unreadable(p, _root_cause(exc), key_path) from None
    if suffix == ".csv":
        with open(p, newline="", encoding="utf-8-sig", errors="replace") as f:
            header = next((row for row in csv.reader(f) if row), None)  # pandas skips blank lines too
        return (header, None) if header else None
    rows = []
    try:
        for row in _json_rows(p):
            rows.append(row)
            if len(rows) == PEEK_ROWS:
                break
    except ValueError as exc:
        if suffix == ".json" and not rows:
            return None  # one JSON document rather than JSON Lines: datasets reads it whole
        raise _unreadable(p, str(exc), key_path) from None
    return (list(dict.fromkeys(k for row in rows for k in row)), rows[0]) if rows else None


# ---------------------------------------------------------------- files that change under a run


def signature(recipe: dict) -> dict[str, tuple[str, int, int]]:
    """{path: (its recipe key, size, modification time in ns)} of every local data file the recipe reads: taken
    before a run loads its data, compared (changed_since) before anything reads the files again (the report's data
    statistics and baselines), so that those never describe other rows than the run trained on."""
    data = recipe["data"]
    named = [("data.source", data.get("source"))]
    named += [(f"data.sources[{i}].source", spec.get("source")) for i, spec in enumerate(data.get("sources") or [])]
    out = {}
    for key, source in named:
        paths = source.items() if isinstance(source, dict) else [(None, source)]
        for role, path in paths:
            if isinstance(path, str) and Path(path).is_file():
                st = Path(path).stat()
                out[path] = (f"{key}.{role}" if role else key, st.st_size, st.st_mtime_ns)
    return out


def changed_since(before: dict[str, tuple[str, int, int]], recipe: dict) -> RecipeError | None:
    """The error for the first local data file that changed (or went) since ``before`` was taken, else None."""
    now = signature(recipe)
    for path, (key, size, mtime) in before.items():
        if path not in now or now[path][1:] != (size, mtime):
            what = "was removed" if path not in now else "changed"
            return RecipeError(key, f"{path} {what} while this run was training: its report would describe other "
                               "rows than it trained on, so none is written",
                               "the adapter and metrics are kept; restore the file and run the same command to "
                               "finish the run (training.resume: auto), or train again on the new data")
    return None
