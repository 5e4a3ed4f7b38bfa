"""Experiment trackers (``training.report_to``): transformers' own integration callbacks, pointed at the run.

TensorBoard writes into ``<run>/tb`` (transformers 5 reads its folder from TENSORBOARD_LOGGING_DIR when the callback
is made); wandb, mlflow and trackio keep their own settings (offline modes, tracking URIs), with the run named
``<name>/<timestamp>`` and, unless the environment says otherwise, the recipe's name as project / experiment.

The trainer would close each tracker's run when training ends, before the runner's evaluation (ROUGE, accuracy,
...) exists; the trackers' end-of-training event is held back instead, in a :class:`Session` that `runner train`
makes and hands to training, and whose ``finish`` sends the evaluation's metrics through the same callbacks first,
so one tracker run holds the training curves and the final scores.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from pathlib import Path

from runner.common.errors import RecipeError
from runner.evaluate.metrics import finite, flatten

# tracker -> (the package it needs, how to install it)
TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb"),
            "mlflow": ("mlflow", "pip install mlflow"), "trackio": ("trackio", "pip install trackio")}
TB_DIR = "tb"


def names(recipe: dict) -> list[str]:
    """``training.report_to`` as a list (``none`` -> [])."""
    value = recipe["training"]["report_to"]
    if isinstance(value, str):
        return [] if value == "none" else [value]
    return list(value)


def check(recipe: dict) -> None:
    """Every named tracker is importable (no import is run: ``runner validate`` stays light)."""
    value = recipe["training"]["report_to"]
    for i, name in enumerate(names(recipe)):
        package, install = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            where = "training.report_to" if isinstance(value, str) else f"training.report_to[{i}]"
            raise RecipeError(where, f"{name} is not installed", f"{install}, or leave {name} out of training.report_to")


def trainer_args(recipe: dict, run_dir: Path) -> dict:
    """The SFTConfig arguments that name the trackers and the run."""
    run_dir = Path(run_dir)
    return {"report_to": names(recipe) or "none", "run_name": f"{recipe['name']}/{run_dir.name}",
            "project": recipe["name"]}


@contextlib.contextmanager
def environment(recipe: dict, run_dir: Path):
    """While the trainer (and its tracker callbacks) is made: TensorBoard's folder is the run's ``tb/``; wandb's
    project and mlflow's experiment default to the recipe's name. Variables the user set are left alone; the ones
    set here are removed again afterwards."""
    wanted = {"TENSORBOARD_LOGGING_DIR": str(Path(run_dir) / TB_DIR)}
    trackers = names(recipe)
    if "wandb" in trackers:
        wanted["WANDB_PROJECT"] = recipe["name"]
    if "mlflow" in trackers:
        wanted["MLFLOW_EXPERIMENT_NAME"] = recipe["name"]
    added = [key for key in wanted if key not in os.environ]
    os.environ.update({key: wanted[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _purge_after(callback, step: int) -> None:
    """A resumed run logs again the steps after its checkpoint, which the interrupted session may have logged
    already: TensorBoard's own purge_step hides those older events, so every step shows once (like
    train_log.jsonl). The writer is made here, as the callback would make it, with that one argument more."""
    from torch.utils.tensorboard import SummaryWriter

    callback.tb_writer = SummaryWriter(log_dir=callback.logging_dir, purge_step=step + 1)


def _integration_classes() -> tuple:
    from transformers.integrations import MLflowCallback, TensorBoardCallback, TrackioCallback, WandbCallback

    return TensorBoardCallback, WandbCallback, MLflowCallback, TrackioCallback


class _Held:
    """A tracker callback whose ``on_train_end`` waits for :meth:`Session.finish` (every other event passes through)."""

    def __init__(self, callback):
        self.callback = callback
        self.ended = None  # (args, state, control, kwargs) of the trainer's on_train_end

    def __getattr__(self, name):
        return getattr(self.callback, name)

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = (args, state, control, kwargs)


class Session:
    """The trainer's tracker callbacks, held open past training (see the module docstring): a value the caller
    makes, hands to training (``attach``) and finishes with the evaluation's metrics."""

    def __init__(self):
        self.trainer, self.split = None, None
        self.held: list[_Held] = []

    def attach(self, trainer, split: str, resumed_from: str | Path | None = None) -> None:
        """Hold ``trainer``'s tracker callbacks open until :meth:`finish`; ``split`` names the evaluation's metrics;
        ``resumed_from``: the checkpoint the run goes on from."""
        match = re.fullmatch(r"checkpoint-(\d+)", Path(resumed_from).name) if resumed_from else None
        resumed_step = int(match.group(1)) if match else None
        self.trainer, self.split = trainer, split
        handler = trainer.callback_handler
        classes = _integration_classes()
        for i, callback in enumerate(handler.callbacks):
            if isinstance(callback, classes):
                handler.callbacks[i] = held = _Held(callback)
                self.held.append(held)
            if resumed_step and isinstance(callback, classes[0]) and trainer.is_world_process_zero():
                _purge_after(callback, resumed_step)

    def finish(self, metrics: dict | None = None) -> None:
        """Send the evaluation's numbers (flattened to ``test/rouge.rougeL``-style names, at the last training
        step), then end each tracker's run. Safe to call twice, and on a session no training attached to (a run
        resumed after its training); rank 0 only sends (the callbacks check it too)."""
        held, self.held = self.held, []
        if not held:
            return
        trainer = self.trainer
        logs = flat_metrics(metrics or {}, prefix=metric_prefix(self.split))
        for h in held:
            if logs and trainer.state.is_world_process_zero:
                h.callback.on_log(trainer.args, trainer.state, trainer.control, logs=logs, model=trainer.model)
            args, state, control, kwargs = h.ended or (trainer.args, trainer.state, trainer.control, {})
            h.callback.on_train_end(args, state, control, **kwargs)


def metric_prefix(split: str) -> str:
    """The trackers file ``test_*`` under test/ and ``eval_*`` under eval/ (transformers' rewrite_logs)."""
    return "eval_" if split == "eval" else "test_" + ("" if split == "test" else f"{split}.")


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The evaluators' numbers of a metrics.json under the names report.md and ``runner compare`` give them
    (runner.evaluate.metrics): {"rouge": {"rougeL": {"f1": 74.1, "ci95": [..]}}} -> {"test_rouge.rougeL": 74.1} (with prefix
    test_). Intervals, counts and NaNs are left out, and so are the top-level timings and sizes, which describe the
    evaluation rather than the model."""
    return {prefix + key: float(m["value"]) for key, m in flatten(metrics).items() if finite(m["value"])}
