"""Checkpoints that count only when complete, and the record of a whole run across interruptions.

The trainer writes ``checkpoint-N/`` file by file; a process killed on the way (or a full disk) leaves a folder
that looks like a checkpoint and is not one. Here a checkpoint counts only once its manifest
(``runner_checkpoint.json``: every file and its size, written last, atomically, after the files are flushed to
disk) is there and the files still match it. Incomplete ones are never chosen and are removed by the process
that next holds the run; old ones are rotated manifest first, so a rotation cut short never looks complete.

The manifest also carries the run's record up to that step (the summed loss and the training time of every
session before), so a resumed run reports the mean train loss and the time of the whole run, not of its last
part.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from runner.common import dist, safeio

MANIFEST = "runner_checkpoint.json"
PREFIX = "checkpoint-"


def _step(path: Path) -> int | None:
    tail = path.name[len(PREFIX):]
    return int(tail) if path.name.startswith(PREFIX) and tail.isdigit() else None


def manifest(ckpt: Path) -> dict | None:
    """The checkpoint's manifest when the checkpoint is complete (every listed file there, of its size)."""
    try:
        info = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
        for name, size in info["files"].items():
            if (ckpt / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return info if info.get("step") == _step(ckpt) else None


def complete(ckpt: Path) -> bool:
    return manifest(Path(ckpt)) is not None


def _candidates(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _step(p) is not None]
    return sorted(found, key=_step)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    return [p for p in _candidates(Path(run_dir) / "checkpoints") if complete(p)]


def tidy(run_dir: Path) -> list[Path]:
    """Remove what a stopped process left half-written: incomplete checkpoints, a partial adapter; returns what was
    removed. Only the process that holds the run (runner.store.runs.claim) calls this."""
    run_dir = Path(run_dir)
    removed = []
    for ckpt in _candidates(run_dir / "checkpoints"):
        if not complete(ckpt):
            shutil.rmtree(ckpt, ignore_errors=True)
            removed.append(ckpt)
    for partial in run_dir.glob("*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    for tmp in run_dir.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
    return removed


def trim_log(path: Path, step: int) -> None:
    """Keep the log records up to ``step`` (what the checkpoint resumed from had logged): the resumed run logs
    the later steps again, so none appears twice. Torn lines go too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    safeio.write_text(path, "".join(kept))


def _mark_complete(ckpt: Path, record: dict) -> None:
    safeio.fsync_tree(ckpt)
    paths = [p for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST]
    files = {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in paths}
    # what each file held: a file garbled later (of the same size) is found before a resume trusts it
    digests = {p.relative_to(ckpt).as_posix(): safeio.sha256(p) for p in paths}
    safeio.write_json(ckpt / MANIFEST, {"step": _step(ckpt), "files": files, "sha256": digests, **record})


def damage(ckpt: Path) -> str | None:
    """What is wrong with a complete checkpoint's files now (None: they hold what was saved): a file whose content
    differs from its digest in the manifest (a manifest of an older runner, without digests, is trusted)."""
    info = manifest(ckpt)
    if info is None:
        return "incomplete"
    for name, digest in (info.get("sha256") or {}).items():
        try:
            if safeio.sha256(ckpt / name) != digest:
                return f"{name} does not hold what was saved"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror})"
    return None


def newest_loadable(run_dir: Path) -> tuple[Path | None, list[str]]:
    """(the newest complete checkpoint whose files hold what was saved, or None; a line for each newer one passed
    over as damaged). A damaged one stops counting as a checkpoint (its manifest goes first), so nothing else picks
    it up; the process holding the run removes it as it removes an incomplete one."""
    passed = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        what = damage(ckpt)
        if what is None:
            return ckpt, passed
        (ckpt / MANIFEST).unlink(missing_ok=True)
        passed.append(f"{ckpt} is damaged: {what}; passed over")
    return None, passed


def rotate(folder: Path, keep: int | None, best: str | Path | None = None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints: manifest first, so a deletion cut short leaves
    a folder that no longer counts as a checkpoint. ``best`` (the trainer's best checkpoint, which early stopping
    restores at the end) is kept besides them."""
    if not keep:
        return
    best_name = Path(best).name if best else None
    done = [p for p in _candidates(folder) if complete(p) and p.name != best_name]
    for old in done[: max(len(done) - keep, 0)]:
        (old / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)


def resume_in_the_same_precision(trainer) -> None:
    """The trainer resumes a LoRA model (and restores the best checkpoint at the end, with early stopping) through
    peft's load_adapter, which upcasts the adapter to fp32, while TRL trains a quantized model's LoRA weights in
    bf16: the resumed run would go on in another precision than it began, and save another adapter. Cast the
    trainable weights back right after loading, before the optimizer (and its state) is made for them."""
    for method in ("_load_from_checkpoint", "_load_best_model"):
        load = getattr(trainer, method, None)
        if load is not None:
            setattr(trainer, method, _keeping_dtypes(trainer, load))


def _keeping_dtypes(trainer, load):
    def load_keeping_dtypes(*args, **kwargs):
        dtypes = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
        load(*args, **kwargs)
        for name, param in trainer.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    return load_keeping_dtypes


def run_record(keep: int | None = None, resumed_from: str | Path | None = None, every_minutes: float | None = None):
    """A trainer callback keeping the whole run's record across resumes: it logs at every checkpoint and at the
    last step (so each checkpoint holds the loss of every step before it), sums loss x steps and training time,
    marks each saved checkpoint complete and rotates old ones (``keep`` = training.save_total_limit; the
    trainer's own rotation is off). ``seconds()`` and ``mean_loss()`` are the run's. ``every_minutes``: also
    checkpoint at the first step that ends that long after the last checkpoint (or the session's start), but not at
    the last step (the adapter is saved right after it)."""
    from transformers import TrainerCallback

    class RunRecord(TrainerCallback):
        def __init__(self):
            base = (manifest(Path(resumed_from)) if resumed_from else None) or {}
            self.keep = keep
            self.loss_sum = float(base.get("loss_sum", 0.0))
            self.last_step = int(base.get("step", 0))
            self.base_seconds = float(base.get("train_seconds", 0.0))
            self.session_start: float | None = None
            self.every_s = every_minutes * 60 if every_minutes else None
            self.last_save = time.monotonic()

        def _time_to_save(self) -> bool:
            # Every rank must decide alike: a checkpoint is written by all ranks together (FSDP gathers the weights;
            # the trainer waits at barriers), and clocks read at slightly different moments could disagree. Rank 0's
            # clock decides for all.
            due = time.monotonic() - self.last_save >= self.every_s
            return bool(dist.broadcast(due if dist.world().main else None))

        def seconds(self) -> float:
            """Training time of the whole run: the sessions before the checkpoint resumed from, and this one."""
            return self.base_seconds + (time.time() - self.session_start if self.session_start else 0.0)

        def mean_loss(self) -> float | None:
            return self.loss_sum / self.last_step if self.last_step else None

        def on_train_begin(self, args, state, control, **kwargs):
            self.session_start = time.time()
            self.last_save = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if self.every_s is not None and not control.should_save and state.global_step < state.max_steps:
                control.should_save = self._time_to_save()
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True  # the checkpoint (and the end) then covers every step's loss
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            if "loss" in logs and "train_loss" not in logs and state.global_step > self.last_step:
                self.loss_sum += float(logs["loss"]) * (state.global_step - self.last_step)
                self.last_step = state.global_step
            if "train_loss" in logs:  # the trainer's summary covers only this session: make it the run's
                mean = self.mean_loss()
                if mean is not None:
                    logs["train_loss"] = mean
                logs["train_runtime"] = round(self.seconds(), 4)

        def on_save(self, args, state, control, **kwargs):
            self.last_save = time.monotonic()
            ckpt = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
            if ckpt.is_dir() and args.should_save:
                _mark_complete(ckpt, {"loss_sum": self.loss_sum, "train_seconds": self.seconds()})
                rotate(ckpt.parent, self.keep, best=state.best_model_checkpoint)

    return RunRecord()


def describe_best(best: dict) -> str:
    """One sentence: which step's adapter the run kept, and why."""
    value = f"{best['best_value']:.4g}" if isinstance(best.get("best_value"), (int, float)) else "n/a"
    # as early stopping's metric is declared (runner.train.early); a record without it says "best"
    lower = {"lower": "lowest", "higher": "highest"}.get(best.get("better"), "best")
    if best["best_step"] is None:
        return f"no evaluation gave {best['metric']}; kept the last step's adapter (step {best['last_step']})"
    stop = (f"stopped at step {best['last_step']} of {best['max_steps']}: {best['evaluations_without_improvement']} "
            f"evaluation(s) in a row without an improvement larger than {best['min_delta']:g} (patience "
            f"{best['patience']})" if best["stopped_early"] else f"trained all {best['last_step']} steps")
    kept = (f"kept step {best['kept_step']}'s adapter, the {lower} {best['metric']} ({value}) of "
            f"{best['evaluations']} evaluations" if best["restored_best"]
            else f"kept the last step's adapter (step {best['kept_step']}; restore_best is off); the best "
                 f"{best['metric']} was {value} at step {best['best_step']}")
    return f"{kept}; {stop}"
