"""Saved files checked before a library loads them: a truncated or garbled adapter, model weights, config or
tokenizer is named in one line (the file and what is wrong with it) instead of surfacing as a library's exception
deep inside loading ("a bug in the runner"). Cheap: the safetensors header and the JSON files are read, not the
weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from runner.common.errors import EnvironmentProblem

# The JSON files of a model, adapter or tokenizer folder that loading parses.
JSON_FILES = ("config.json", "adapter_config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header's size


def safetensors_problem(path: Path) -> str | None:
    """What makes ``path`` no safetensors file (None when its header is whole and its data all there)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            return "its header is cut short or garbled"
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is garbled"
    if 8 + length + end > size:
        return f"cut short: {size:,} bytes of the {8 + length + end:,} its header describes"
    return None


def json_problem(path: Path) -> str | None:
    try:
        data = json.loads(path.read_bytes())
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except ValueError as exc:
        return f"not valid JSON ({str(exc)[:80]})"
    return None if isinstance(data, dict) else "not a JSON object"


def check_folder(folder: str | Path, what: str, hint: str) -> None:
    """Every safetensors and JSON file that loading ``folder`` reads, checked; the first damaged one raises
    ``error: <file>: <what> is damaged: <how> (<hint>)`` (exit 1: the files, not the recipe). A folder that does
    not exist is left to the caller's own message."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")) + [folder / n for n in JSON_FILES if (folder / n).is_file()]:
        problem = safetensors_problem(path) if path.suffix == ".safetensors" else json_problem(path)
        if problem:
            raise EnvironmentProblem(str(path), f"{what} is damaged: {problem}", hint)
