"""model.adapter: training that starts from a trained LoRA adapter (a finished run folder, an adapter folder, or a
hub adapter id) instead of a new one, found before any weight loads and attached trainable to the base."""

from __future__ import annotations

import json
from pathlib import Path

from runner.common.errors import RecipeError
from runner.model import hub

CONFIG = "adapter_config.json"


def resolve(recipe: dict) -> str | None:
    """model.adapter as PeftModel.from_pretrained loads it (a folder or a hub id), or None when not set. A run folder
    must be finished (its report.md written last): an unfinished run's adapter may be missing or not yet evaluated."""
    src = recipe["model"]["adapter"]
    if src is None:
        return None
    path = Path(src).expanduser()
    if path.is_dir():
        if (path / CONFIG).is_file():
            return str(path)
        if (path / "adapter" / CONFIG).is_file() and (path / "report.md").is_file():
            return str(path / "adapter")
        if (path / "adapter").is_dir() or (path / "recipe.yaml").is_file():
            raise RecipeError("model.adapter", f"{path} is a run that has not finished (no report.md)",
                              "finish it first (runner train with resume: auto), or name another run")
        raise RecipeError("model.adapter", f"{path} holds no adapter (no {CONFIG}, no adapter/ folder)",
                          "name a finished run folder, an adapter folder, or a hub adapter id")
    if path.is_absolute() or src.startswith(("./", "../", "~")):
        raise RecipeError("model.adapter", f"{src} does not exist", "name a finished run folder or an adapter folder")
    hub.check_reachable("model.adapter", src, None, CONFIG, "name a local run or adapter folder")
    return src


def describe(recipe: dict) -> dict | None:
    """What env.json records of the adapter a run started from: as written, the folder or id loaded, and the run
    folder it came from when it is a run's."""
    loaded = resolve(recipe)
    if loaded is None:
        return None
    record = {"adapter": recipe["model"]["adapter"], "loaded": loaded}
    folder = Path(loaded)
    if folder.name == "adapter" and (folder.parent / "report.md").is_file():
        record["run"] = str(folder.parent)
        env = folder.parent / "env.json"
        started = json.loads(env.read_text(encoding="utf-8")).get("started_from") if env.is_file() else None
        if started:  # the chain: what that run itself started from
            record["started_from"] = started
    return record


def attach(model, recipe: dict):
    """The base ``model`` with model.adapter loaded trainable (its own LoRA settings: the recipe's lora section gives
    way to them)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, resolve(recipe), is_trainable=True)
