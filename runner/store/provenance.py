"""Which base model a run's adapter was trained on when the run's recipe record (recipe.yaml) is missing,
unreadable or lacks the model keys: the adapter's own config (adapter_config.json, written by peft) names it."""

from __future__ import annotations

import json
from pathlib import Path

from runner.common.errors import RecipeError
from runner.recipe import loader


def text_at(data: dict, section: str, key: str) -> str | None:
    """``data[section][key]`` when it is text, else None (a record without it, or not a mapping)."""
    value = data.get(section)
    value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


def adapter_base_note(run_dir: Path, want: str) -> str | None:
    """Without a usable recipe record, the base model the adapter's own config names (peft writes it when saving)
    must be the recipe's: the same path or hub id, or the same folder name (a run moved to another machine)."""
    try:
        config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
        base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    except (OSError, ValueError):
        base = None
    why = f"{run_dir} has no usable recipe record (recipe.yaml missing, unreadable or without model keys)"
    if not isinstance(base, str) or not base:
        return None  # nothing to check it against (loading the adapter names a damaged config: runner.common.artifacts)
    if base != want and Path(base).name != Path(want).name:
        raise RecipeError("--run", f"{why}; its adapter was trained on {loader._show(base)}, not the recipe's "
                          f"{loader._show(want)}", "an adapter fits its own base model only: give a recipe with that "
                          "model.name_or_path")
    return f"note: {why}; its adapter's config names the base {base}, as the recipe does (quantization not checked)"
