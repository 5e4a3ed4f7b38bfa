"""``training.early_stopping``: the metric that decides, which way it is better (declared, never read from its name),
transformers' EarlyStoppingCallback and best-checkpoint arguments, and the record of what was kept.

The metric is the trainer's own (``eval_loss``, ``eval_mean_token_accuracy``: their directions declared here in
TRAINER_METRICS) or one that an evaluator of the recipe declares (``classification.accuracy``,
``myevals.err:ErrorRate.error_rate``): that evaluator then scores the model's predictions of the eval split at every
evaluation, on the plain backend, and its number joins the trainer's evaluation metrics as ``eval_<metric>``.
"""

from __future__ import annotations

import contextlib
import difflib
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from evaluators.base import Metric, Record
from runner.common import dist
from runner.common.errors import RecipeError, short
from runner.evaluate import backend as backend_mod
from runner.evaluate import evaluate as evaluate_mod
from runner.evaluate.metrics import declared_by, flatten

KEY = "training.early_stopping.metric"
# The trainer's own evaluation metrics (on the eval split, every eval_every steps), declared like an evaluator's.
TRAINER_METRICS = {"eval_loss": Metric("eval_loss", "lower", "unbounded"),
                   "eval_mean_token_accuracy": Metric("eval_mean_token_accuracy", "higher", "fraction")}


@dataclass(frozen=True)
class Decider:
    """The metric early stopping watches: as the recipe names it, as the trainer logs it, its declared direction,
    and the (name, evaluator) that computes it (None: the trainer's own)."""

    metric: str
    logged: str
    better: str
    evaluator: tuple[str, object] | None = None


def decider(recipe: dict) -> Decider | None:
    """The recipe's early-stopping metric, checked: the trainer's own, or a top-level metric an evaluator of the
    recipe declares with a direction. None without early stopping. Builds that one evaluator (a user's code runs)."""
    early = recipe["training"]["early_stopping"]
    if early is None:
        return None
    metric = early["metric"]
    if metric in TRAINER_METRICS:
        return Decider(metric, metric, TRAINER_METRICS[metric].better)
    specs = recipe["evaluation"]["evaluators"]
    # The longest evaluator name that prefixes the metric (a user's dotted module name holds dots itself).
    named = sorted((i for i, s in enumerate(specs) if metric.startswith(s["name"] + ".")),
                   key=lambda i: -len(specs[i]["name"]))
    if not named:
        close = difflib.get_close_matches(metric, list(TRAINER_METRICS), n=1, cutoff=0.8)
        raise RecipeError(KEY, f"{short(metric, 80)!r} is neither the trainer's metric nor one of evaluation."
                          "evaluators'", (f"did you mean {close[0]!r}? Or" if close else "one of")
                          + f" {' or '.join(TRAINER_METRICS)}, or <evaluator>.<metric> of an evaluator of the recipe, "
                          "e.g. classification.accuracy")
    i = named[0]
    name, evaluator = evaluate_mod.build_evaluators(recipe)[i]
    key = metric[len(name) + 1:]
    if evaluator.metrics is None:
        raise RecipeError(KEY, f"{name} declares no metrics, so whether a higher or a lower {key} is better is "
                          "unknown", "declare its metrics (evaluators.base.Metric), or stop on another metric")
    declared = {m.name: m for m in evaluator.metrics if "." not in m.name and "*" not in m.name}
    if key not in declared:
        raise RecipeError(KEY, f"{name} has no metric {key!r}", "one of: " + ", ".join(f"{name}.{k}" for k in declared))
    return Decider(metric, f"eval_{metric}", declared[key].better, (name, evaluator))


def check_launch(found: Decider | None, speed) -> None:
    """An evaluator's metric needs predictions at every evaluation: one process generates them, and FSDP's sharded
    model cannot run outside the trainer's step."""
    if found is not None and found.evaluator is not None and speed.distributed == "fsdp":
        raise RecipeError(KEY, f"{found.metric} needs the model's predictions at every evaluation, and FSDP shards "
                          "the model across the processes", "stop on eval_loss under FSDP, or train with ddp")


def trainer_args(recipe: dict, found: Decider | None) -> dict:
    """Early stopping's metric and its declared direction, and whether the best checkpoint becomes the run's
    adapter."""
    if found is None:
        return {}
    return {"metric_for_best_model": found.logged, "greater_is_better": found.better == "higher",
            "load_best_model_at_end": recipe["training"]["early_stopping"]["restore_best"],
            # the patience count and best metric so far come back with a resumed checkpoint
            "restore_callback_states_from_checkpoint": True}


def callbacks(recipe: dict) -> list:
    from transformers import EarlyStoppingCallback

    early = recipe["training"]["early_stopping"]
    if early is None:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=early["patience"], early_stopping_threshold=early["min_delta"])]


def scorer(found: Decider | None, recipe: dict, tokenizer, examples):
    """``score(model) -> {"eval_<metric>": value}`` for the trainer's evaluations when an evaluator's metric decides
    (None otherwise): the evaluator on the model's predictions of ``examples`` (the eval split)."""
    if found is None or found.evaluator is None:
        return None
    name, evaluator = found.evaluator
    g = recipe["generation"]
    batch = g["batch_size"] if isinstance(g["batch_size"], int) else backend_mod.DEFAULT_BATCH
    plain = backend_mod.Choice("plain", batch, why="the model as it trains, never a merged or compiled copy of it")

    def score(model) -> dict[str, float]:
        with _training_state_kept():
            records = _records(recipe, plain, evaluator, model, tokenizer, examples)
            value = None
            if dist.world().main:
                with tempfile.TemporaryDirectory() as tmp:  # files it writes (plots) are not this run's
                    block = evaluator.evaluate(records, Path(tmp))
                value = flatten({name: block}, declared_by([(name, evaluator)])).get(found.metric, {}).get("value")
            value = dist.broadcast(value)
        if value is None:
            raise RuntimeError(f"{name} returned no {found.metric} (training.early_stopping.metric)")
        return {found.logged: float(value)}

    return score


def _records(recipe: dict, choice: backend_mod.Choice, evaluator, model, tokenizer, examples) -> list[Record]:
    """The eval split as records: the predictions it needs (each rank its share, gathered), the reference scores."""
    prompts, refs = list(examples["prompt"]), evaluate_mod.references(examples)
    ids = examples["id"] if "id" in getattr(examples, "column_names", examples) else [None] * len(prompts)
    made = {}
    if "predictions" in evaluator.needs:
        mine = evaluate_mod.predict(model, tokenizer, prompts, recipe, choice)
        made = {i: text for part in dist.gather(mine) for i, text in part.items()}
    records = [Record(index=i, prompt=p, reference=refs[i], prediction=made.get(i, ""), id=ids[i])
               for i, p in enumerate(prompts)]
    if "logprobs" in evaluator.needs:
        scoring = replace(choice, batch_size=evaluator.batch_size or choice.batch_size)
        records = evaluate_mod.scored_records(recipe, model, tokenizer, examples, predicted=records, choice=scoring)
    return records


@contextlib.contextmanager
def _training_state_kept():
    """Predicting in the middle of training leaves training as it was: its random number generators (generation
    seeds them) come back, and compiled layers run uncompiled meanwhile (decoding shapes would recompile them)."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def best_record(trainer, recipe: dict, found: Decider | None) -> dict | None:
    """What early stopping decided, for env.json and report.md: the best evaluation, the step whose adapter was
    kept, and whether (and after how many evaluations without improvement) training stopped early."""
    if found is None:
        return None
    early = recipe["training"]["early_stopping"]
    state = trainer.state
    evals = [(row["step"], row[found.logged]) for row in state.log_history if found.logged in row]
    best_step = state.best_global_step
    restored = early["restore_best"] and state.best_model_checkpoint is not None
    from transformers import EarlyStoppingCallback

    stopper = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None)
    since = stopper.early_stopping_patience_counter if stopper is not None else 0
    return {"metric": found.metric, "better": found.better, "patience": early["patience"],
            "min_delta": early["min_delta"], "evaluations": len(evals), "best_step": best_step,
            "best_value": state.best_metric, "kept_step": best_step if restored else state.global_step,
            "restored_best": restored, "last_step": state.global_step, "max_steps": state.max_steps,
            "stopped_early": state.global_step < state.max_steps, "evaluations_without_improvement": since}
