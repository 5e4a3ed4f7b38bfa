"""Run folders: ``<output_dir>/<name>/<timestamp>/``, never overwritten; the resolved recipe and env.json."""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

from runner.common import safeio
from runner.common.errors import EnvironmentProblem, RecipeError
from runner.recipe import loader
from runner.store import checkpoints, provenance

PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "rouge-score")


def recipe_root(recipe: dict) -> Path:
    return Path(recipe["output_dir"]) / recipe["name"]


def _checkpoints(run_dir: Path) -> list[Path]:
    return checkpoints.complete_checkpoints(run_dir)


def trained_adapter(run_dir: Path) -> Path | None:
    """The run's saved adapter (complete: it is written under another name and renamed), or None."""
    adapter = Path(run_dir) / "adapter"
    return adapter if (adapter / "adapter_config.json").is_file() else None


def run_state(run_dir: Path) -> str:
    """finished (report.md written last), diverged, evaluate (trained, not yet evaluated and reported),
    train (a complete checkpoint to continue from), or empty (nothing to continue from)."""
    if (run_dir / "report.md").is_file():
        return "finished"
    if "diverged" in _read_env(run_dir):
        return "diverged"
    if trained_adapter(run_dir) is not None:
        return "evaluate"
    return "train" if _checkpoints(run_dir) else "empty"


def unfinished_run(recipe: dict) -> tuple[Path, str] | None:
    """(run folder, its state) of the newest run of this recipe that was interrupted: trained but not evaluated,
    or with a complete checkpoint. Runs another live process holds are passed over."""
    root = recipe_root(recipe)
    if not root.is_dir():
        return None
    for run_dir in sorted((p for p in root.iterdir() if p.is_dir() and p.name[:1].isdigit()), reverse=True):
        if holder(run_dir) is not None:
            continue  # another process is running it: not interrupted
        state = run_state(run_dir)
        if state in ("finished", "diverged"):
            return None  # the newest run ended: start fresh rather than reopen an older one
        if state != "empty":
            return run_dir, state
    return None


def saved_recipe(run_dir: Path) -> dict | None:
    """The resolved recipe a run folder saved (recipe.yaml), read with the recipe loader's bounds; None when it is
    missing or unreadable."""
    try:
        saved = loader.parse_yaml((run_dir / "recipe.yaml").read_text(encoding="utf-8"), "recipe.yaml")
    except (OSError, UnicodeDecodeError, RecipeError):
        return None
    return saved if isinstance(saved, dict) else None


def mismatch(run_dir: Path, recipe: dict, fingerprint: str | None) -> str | None:
    """What differs between the run folder's recipe and data and these (None: the same run)."""
    saved = saved_recipe(run_dir)
    if saved is None:
        return "its recipe.yaml is missing or unreadable"
    diff = next(_differences(_comparable(saved), _comparable(recipe), []), None)
    if diff is not None:
        path, theirs, ours = diff
        return f"{loader._fmt(path)} was {loader._show(theirs)}, this recipe has {loader._show(ours)}"
    before = _read_env(run_dir).get("data_fingerprint")
    if fingerprint and before and before != fingerprint:
        return f"the data differs (fingerprint {before} then, {fingerprint} now)"
    return None


def _comparable(recipe: dict) -> dict:
    out = json.loads(json.dumps(recipe, default=str))
    out.get("training", {}).pop("resume", None)  # how to start is not what is trained
    out.get("training", {}).pop("save_every_minutes", None)  # nor how often by the clock it is kept (a newer key)
    return out


def recipe_differences(run_a: Path, run_b: Path) -> list[tuple[str, object, object]] | None:
    """(key path, A's value, B's value) for every recipe key two runs were trained with differently (their
    recipe.yaml; where they write and how they started left out); None when either recipe is unreadable."""
    a, b = saved_recipe(run_a), saved_recipe(run_b)
    if a is None or b is None:
        return None
    a, b = ({**_comparable(r), "output_dir": None} for r in (a, b))
    return [(loader._fmt(path), x, y) for path, x, y in _differences(a, b, [])]


_MISSING = object()


def _differences(a, b, path):
    """Every (path, a's value, b's value) where the two differ, in a's key order (a missing key: None)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            yield from _differences(a.get(key, _MISSING), b.get(key, _MISSING), [*path, key])
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _differences(x, y, [*path, i])
    elif a != b:
        yield path, None if a is _MISSING else a, None if b is _MISSING else b


def open_run(recipe: dict, fingerprint: str | None = None) -> tuple[Path, str | None]:
    """(run folder, checkpoint to resume from or None). A new folder unless resume picks up an interrupted run:
    one of the same recipe and data (else one line says what differs), held by no other process."""
    resume = recipe["training"]["resume"]
    if resume == "auto":
        found = unfinished_run(recipe)
        if found:
            run_dir, state = found
            differs = mismatch(run_dir, recipe, fingerprint)
            if differs:
                also = f", or evaluate its adapter with runner eval RECIPE --run {run_dir}" if state == "evaluate" else ""
                raise RecipeError("training.resume", f"auto would continue the interrupted run {run_dir}, but "
                                  f"{differs}", "run it with the same recipe and data to finish it, or start "
                                  f"fresh with training.resume=never{also}")
            claim(run_dir)
            _track(run_dir, created=False, resume_auto=True)
            checkpoints.tidy(run_dir)
            if state == "evaluate":
                print(f"resuming the interrupted run {run_dir}: trained, evaluating", flush=True)
                return run_dir, None
            ckpt, passed = checkpoints.newest_loadable(run_dir)
            for line in passed:
                print(line, flush=True)
            if ckpt is None:
                raise EnvironmentProblem("training.resume", f"every checkpoint of the interrupted run {run_dir} is "
                                         "damaged (a file no longer holds what was saved)",
                                         "check the disk; start fresh with training.resume=never")
            checkpoints.tidy(run_dir)  # the damaged ones passed over, as incomplete ones are
            checkpoints.trim_log(run_dir / "train_log.jsonl", checkpoints.manifest(ckpt)["step"])
            print(f"resuming the interrupted run {run_dir} from {ckpt.name}", flush=True)
            return run_dir, str(ckpt)
    resume_from = None
    if resume not in ("auto", "never"):
        ckpt = Path(resume).expanduser()
        if not (ckpt / "trainer_state.json").is_file():
            raise RecipeError("training.resume", f"{ckpt} is not a checkpoint folder (no trainer_state.json)",
                              "use auto, never, or a path to runs/<name>/<time>/checkpoints/checkpoint-N")
        if (ckpt / checkpoints.MANIFEST).exists() and not checkpoints.complete(ckpt):
            raise RecipeError("training.resume", f"{ckpt} is an incomplete checkpoint (a file is missing or "
                              "cut short)", "resume from an earlier checkpoint")
        if (ckpt / checkpoints.MANIFEST).exists() and checkpoints.damage(ckpt):
            raise RecipeError("training.resume", f"{ckpt} is damaged: {checkpoints.damage(ckpt)}",
                              "resume from an earlier checkpoint")
        resume_from = str(ckpt)
    run_dir = new_run_dir(recipe)
    safeio.write_text(run_dir / "recipe.yaml", loader.dump(recipe))
    return run_dir, resume_from


def new_run_dir(recipe: dict) -> Path:
    run_dir = _fresh_dir(recipe_root(recipe))
    _track(run_dir, created=True, resume_auto=recipe["training"]["resume"] == "auto")
    return run_dir


def _fresh_dir(parent: Path, prefix: str = "") -> Path:
    """A new ``<prefix><timestamp>`` folder; an existing one is never reused."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        candidate = parent / f"{prefix}{stamp}{'' if i == 0 else f'-{i}'}"
        try:
            candidate.mkdir()  # atomic: two runs started in the same second get different folders
        except FileExistsError:
            continue
        claim(candidate)
        return candidate
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
    safeio.write_json(run_dir / "env.json", env)


# The settings a speed profile decides at launch (runner.speed.profiles.Speed), noted in recipe.yaml.
RESOLVED = ("profile", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "world_size",
            "distributed")


def note_resolved(run_dir: Path, recipe: dict, speed: dict) -> None:
    """recipe.yaml again, with what trained noted under it: the profile's micro-batch (per process) x accumulation,
    checkpointing and processes. A comment, not a key, so the file stays the recipe (resume compares it; it loads
    as a recipe); env.json's ``speed`` has every setting."""
    note = yaml.safe_dump({"resolved": {k: speed[k] for k in RESOLVED if k in speed}}, sort_keys=False)
    text = ("\n# What trained, as training.profile resolved it at launch (not a recipe key; env.json: speed):\n"
            + "".join(f"# {line}\n" for line in note.splitlines()))
    safeio.write_text(run_dir / "recipe.yaml", loader.dump(recipe) + text)


def _read_env(run_dir: Path) -> dict:
    try:
        env = json.loads((Path(run_dir) / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return env if isinstance(env, dict) else {}


def update_env(run_dir: Path, **values) -> None:
    safeio.write_json(run_dir / "env.json", {**_read_env(run_dir), **values})


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


def trained_with(recipe: dict, run_dir: Path) -> str | None:
    """Checks that ``run_dir``'s adapter fits the recipe's base model (the one that will be loaded): another model or
    quantization is the user's mistake. Returns a note when the run was trained with another recipe (another task on
    the same base, which is legitimate to evaluate), or when its recipe record is missing, unreadable or incomplete
    (the adapter's own config then names the base it was trained on), else None."""
    trained = saved_recipe(run_dir) or {}
    got = (provenance.text_at(trained, "model", "name_or_path"), provenance.text_at(trained, "quantization", "method"))
    want = (recipe["model"]["name_or_path"], recipe["quantization"]["method"])
    if got[0] is None or got[1] is None:
        return provenance.adapter_base_note(run_dir, want[0])
    if got != want:
        raise RecipeError("--run", f"{run_dir} was trained on {got[0]} ({got[1]}), not the recipe's {want[0]} "
                          f"({want[1]})", f"an adapter fits its own base model only: give the recipe it was "
                          f"trained with, {run_dir / 'recipe.yaml'}")
    if trained.get("name") != recipe["name"]:
        return (f"note: {run_dir} was trained with the recipe {loader._show(trained.get('name'))}; using it with "
                f"{recipe['name']!r} (its data, prompt and evaluators)")
    return None


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
    if previous and interrupted(previous[-1]) and holder(previous[-1]) is None:
        claim(previous[-1])
        _track(previous[-1], created=False, kind="evaluation")
        return previous[-1]
    out = _fresh_dir(parent, prefix)
    _track(out, created=True, keep=lambda p: any(p.rglob("predictions.jsonl")), kind="evaluation")
    safeio.write_text(out / "recipe.yaml", loader.dump(recipe))
    return out


# ---------------------------------------------------------------- claims: one process per folder

LOCK = ".lock"
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_claims: dict[Path, int] = {}  # folder -> open file descriptor holding its lock, until this process ends


def holder(folder: Path) -> int | None:
    """The process id holding ``folder`` when another live process does, else None. The lock is the kernel's
    (flock): a process that dies, even by kill -9, lets go of it."""
    folder = Path(folder).resolve()
    if folder in _claims or not (folder / LOCK).exists():
        return None
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no claims
        return None
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in _HELD:
            return None  # a file system without locks: nobody can be seen holding it
        try:
            return int(os.pread(fd, 32, 0).decode().strip() or 0) or -1
        except (OSError, ValueError):
            return -1
    finally:
        os.close(fd)
    return None


def claim(folder: Path) -> None:
    """Hold ``folder`` for this process (until it ends); another live holder is an error, a dead one is not."""
    folder = Path(folder).resolve()
    if folder in _claims:
        return
    try:
        import fcntl
    except ImportError:
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in _HELD:  # a file system without locks (ENOLCK): work without the claim
            os.close(fd)
            return
        try:
            pid = os.pread(fd, 32, 0).decode().strip() or "?"
        except (OSError, UnicodeDecodeError):
            pid = "?"
        os.close(fd)
        raise EnvironmentProblem(str(folder), f"another runner process (pid {pid}) is using this folder",
                                 "wait for it to end, or start a separate run with training.resume=never") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _claims[folder] = fd


# ---------------------------------------------------------------- what a failed command leaves

@dataclass
class Left:
    """A folder this process wrote into, and (after discard_unfinished) what became of it."""
    folder: Path
    created: bool  # made by this process (else taken over: a resumed run, a reopened evaluation)
    keep: Callable[[Path], bool]  # whether it holds something a later command can continue from
    kind: str = "run"  # run | evaluation
    resume_auto: bool = False  # a run of training.resume: auto (the same command picks it up again)
    removed: list[Path] = field(default_factory=list)  # half-written pieces removed from it
    discarded: bool = False  # the whole folder removed: nothing in it to continue from


_tracked: list[Left] = []


def _has_progress(run_dir: Path) -> bool:
    return run_state(run_dir) != "empty"


def _track(folder: Path, created: bool, keep=_has_progress, kind: str = "run", resume_auto: bool = False) -> None:
    _tracked.append(Left(Path(folder), created, keep, kind, resume_auto))


def written() -> list[Path]:
    """The folders this process created or took over, to write into."""
    return [left.folder for left in _tracked if left.folder.is_dir()]


def discard_unfinished() -> list[Left]:
    """After a command failed: remove half-written pieces from the folders it held, and the folders it created
    that hold nothing a later command could continue from (no checkpoint, no adapter, no prediction; a diverged
    run keeps its log). Returns each folder with what was removed (runner.store.leftovers says it in words)."""
    done = []
    for left in reversed(_tracked):
        if not left.folder.is_dir():
            continue
        left.removed = checkpoints.tidy(left.folder)
        if left.created and not left.keep(left.folder):
            shutil.rmtree(left.folder, ignore_errors=True)
            left.discarded = True
            try:
                left.folder.parent.rmdir()  # <name>/ or base/ made for it, if now empty
            except OSError:
                pass
        done.append(left)
    _tracked.clear()
    return done[::-1]
