"""Saved files checked before a library loads them: a truncated or garbled adapter, model weights, config or
tokenizer is named in one line (the file and what is wrong with it) instead of surfacing as a library's exception
deep inside loading ("a bug in the runner"). Cheap: the safetensors header and the JSON files are read, not the
weights. A config.json's sizes are checked too (check_dimensions): in range and fitting each other, before
anything (a meta model, the memory model) is built from them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from runner.common.errors import EnvironmentProblem, RecipeError, short

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


CONFIG_HINT = ("the config.json is damaged or not a causal language model's: fix that value, or take the folder "
               "again from where it came")
# The sizes a config.json gives that plan, the meta model and the memory model build from, and the most any real
# model has (several times today's largest): a zero, a negative or a typo's extra digits is refused before a layer
# is built, rather than a division by zero or minutes and gigabytes spent on a meta model of a million layers.
DIMENSIONS = {"num_hidden_layers": 1024, "hidden_size": 131072, "num_attention_heads": 2048,
              "num_key_value_heads": 2048, "intermediate_size": 1048576, "vocab_size": 4194304}


def check_dimensions(config, src: str) -> None:
    """The config's sizes are whole numbers in range, and fit each other (heads divide the hidden size, key-value
    heads divide the heads), before anything is built from them."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, most in DIMENSIONS.items():
        value = getattr(cfg, name, None)
        if value is None and name in ("num_key_value_heads", "intermediate_size"):
            continue  # optional: the heads and 4 x hidden_size stand in
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise RecipeError("model.name_or_path", f"{src}/config.json: {name} is {short(repr(value), 40)}, "
                              f"not a model's (a whole number from 1 to {most:,})", CONFIG_HINT)
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if (getattr(cfg, "head_dim", None) is None and cfg.hidden_size % heads) or heads % kv:
        raise RecipeError("model.name_or_path", f"{src}/config.json: hidden_size {cfg.hidden_size}, "
                          f"num_attention_heads {heads} and num_key_value_heads {kv} do not fit each other (the "
                          "heads divide the hidden size, the key-value heads divide the heads)", CONFIG_HINT)
