"""Run folders: ``<output_dir>/<name>/<timestamp>/``, never overwritten; the resolved recipe and env.json."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from runner import recipe as recipe_mod
from runner.errors import RecipeError

PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "rouge-score")


def recipe_root(recipe: dict) -> Path:
    return Path(recipe["output_dir"]) / recipe["name"]


def _checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def unfinished_run(recipe: dict) -> tuple[Path, Path] | None:
    """The newest run of this recipe that has a checkpoint but no adapter (it was interrupted)."""
    root = recipe_root(recipe)
    if not root.is_dir():
        return None
    for run_dir in sorted((p for p in root.iterdir() if p.is_dir()), reverse=True):
        if (run_dir / "adapter").exists():
            return None  # the newest run finished: start fresh rather than reopen an older one
        ckpts = _checkpoints(run_dir)
        if ckpts:
            return run_dir, ckpts[-1]
    return None


def open_run(recipe: dict) -> tuple[Path, str | None]:
    """(run folder, checkpoint to resume from or None). A new folder unless resume picks up an interrupted run."""
    resume = recipe["training"]["resume"]
    if resume == "auto":
        found = unfinished_run(recipe)
        if found:
            run_dir, ckpt = found
            print(f"resuming the interrupted run {run_dir} from {ckpt.name}", flush=True)
            return run_dir, str(ckpt)
    resume_from = None
    if resume not in ("auto", "never"):
        ckpt = Path(resume).expanduser()
        if not (ckpt / "trainer_state.json").is_file():
            raise RecipeError("training.resume", f"{ckpt} is not a checkpoint folder (no trainer_state.json)",
                              "use auto, never, or a path to runs/<name>/<time>/checkpoints/checkpoint-N")
        resume_from = str(ckpt)
    run_dir = new_run_dir(recipe)
    (run_dir / "recipe.yaml").write_text(recipe_mod.dump(recipe), encoding="utf-8")
    return run_dir, resume_from


def new_run_dir(recipe: dict) -> Path:
    return _fresh_dir(recipe_root(recipe))


def _fresh_dir(parent: Path, prefix: str = "") -> Path:
    """A new ``<prefix><timestamp>`` folder; an existing one is never reused."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        candidate = parent / f"{prefix}{stamp}{'' if i == 0 else f'-{i}'}"
        try:
            candidate.mkdir()  # atomic: two runs started in the same second get different folders
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new folder under {parent}")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _device() -> dict:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 2),
                "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def device_name() -> str:
    """This process's device, e.g. ``cuda:1 NVIDIA H200`` or ``cpu``."""
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return "cpu"


def write_env(run_dir: Path, recipe: dict, prepared, **extra) -> None:
    env = {"versions": _versions(), "device": _device(), "platform": platform.platform(),
           "git_commit": _git_commit(), "data_fingerprint": prepared.fingerprint, "data": prepared.stats,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    (run_dir / "env.json").write_text(json.dumps(env, indent=2), encoding="utf-8")


def update_env(run_dir: Path, **values) -> None:
    path = run_dir / "env.json"
    env = json.loads(path.read_text()) if path.exists() else {}
    env.update(values)
    path.write_text(json.dumps(env, indent=2), encoding="utf-8")


def peak_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3)}


def find_run(run: str | Path) -> Path:
    run_dir = Path(run)
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise RecipeError("--run", f"{run_dir} has no trained adapter (adapter/adapter_config.json)",
                          "pass a finished run folder, e.g. runs/<name>/<timestamp>")
    return run_dir


def open_eval_dir(recipe: dict, run_dir: Path | None) -> Path:
    """Where an evaluation writes: a new ``eval-<time>`` folder in the run (or ``<name>/base/<time>`` for the
    base model); an interrupted one (predictions but no metrics.json) is picked up again."""
    if run_dir is not None:
        parent, prefix = run_dir, "eval-"
    else:
        parent, prefix = recipe_root(recipe) / "base", ""
    return reopen_or_new(recipe, parent, prefix,
                         lambda p: not (p / "metrics.json").exists() and (p / "predictions.jsonl").exists())


def reopen_or_new(recipe: dict, parent: Path, prefix: str, interrupted) -> Path:
    """The newest ``<prefix><time>`` folder under ``parent`` when ``interrupted(folder)`` says its job never
    finished; otherwise a new one holding the resolved recipe."""
    parent.mkdir(parents=True, exist_ok=True)
    previous = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefix))
    if previous and interrupted(previous[-1]):
        return previous[-1]
    out = _fresh_dir(parent, prefix)
    (out / "recipe.yaml").write_text(recipe_mod.dump(recipe), encoding="utf-8")
    return out
