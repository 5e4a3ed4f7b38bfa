"""Task metrics while training (``training.task_metrics``): at every evaluation (``training.eval_every``) the
recipe's evaluators score the model's predictions of the first N eval examples, with the fast evaluation backend,
and each declared top-level metric joins the trainer's evaluation metrics as ``eval_<evaluator>.<metric>`` (so the
trackers, train_log.jsonl, report.md's plot, early stopping and the best checkpoint all see it). The time it takes
is kept (``seconds``) for env.json and report.md.

Without ``training.task_metrics``, an evaluator's metric that early stopping watches is scored as before
(runner.train.early.scorer: that evaluator alone, the whole eval split, the plain backend).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from evaluators.base import Record
from runner.common import dist
from runner.common.errors import RecipeError
from runner.evaluate import backend as backend_mod
from runner.evaluate import evaluate as evaluate_mod
from runner.evaluate.metrics import declared_by, flatten
from runner.train import early

# The fast backend: predictions batched with a static KV cache on the model as it trains. A merged or compiled copy
# of weights that change every step would be rebuilt at every evaluation.
FAST = "batched"


class Scorer:
    """``scorer(model) -> {"eval_<evaluator>.<metric>": value}``, called by the trainer at every evaluation
    (runner.train.sft.Trainer.extra_metrics); ``seconds``: the time all its calls took."""

    def __init__(self, recipe: dict, tokenizer, examples, size: int):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.examples = examples.select(range(min(size, len(examples))))
        self.evaluators = [(n, ev) for n, ev in evaluate_mod.build_evaluators(recipe) if ev.metrics]
        self.choice = None  # decided at the first evaluation, on the model as it trains (``_choose``)
        self.seconds = 0.0
        self.calls = 0

    def _choose(self, model) -> backend_mod.Choice:
        """The fast backend (the plain one where the recipe asks for it) and its batch size for these prompts, as
        generation sizes it: a given generation.batch_size, else from the memory budget and what is free while
        training holds its own (rank 0 decides for every rank)."""
        g = self.recipe["generation"]
        fast = {**self.recipe, "generation": {**g, "backend": "plain" if g["backend"] == "plain" else FAST}}
        choice = None
        if dist.world().main:
            choice = evaluate_mod.choose(model, self.tokenizer, list(self.examples["prompt"]), fast)
            choice = replace(choice, why="task metrics while training: the model as it trains")
        return dist.broadcast(choice)

    def __call__(self, model) -> dict[str, float]:
        start = time.time()
        if self.choice is None:
            self.choice = self._choose(model)
        with early._training_state_kept():
            records = self._records(model)
            values = None
            if dist.world().main:
                values = {}
                with tempfile.TemporaryDirectory() as tmp:  # files they write (plots) are not this run's
                    for name, evaluator in self.evaluators:
                        block = evaluator.evaluate(records.get(name, []), Path(tmp))
                        for metric, row in flatten({name: block}, declared_by([(name, evaluator)])).items():
                            if metric.count(".") == 1 and _finite(row.get("value")):
                                values[f"eval_{metric}"] = float(row["value"])
            values = dist.broadcast(values)
        self.seconds += time.time() - start
        self.calls += 1
        return values

    def _records(self, model) -> dict[str, list[Record]]:
        """Each evaluator's records: the predictions made once for all of them, the reference scores where needed."""
        examples, recipe = self.examples, self.recipe
        prompts, refs = list(examples["prompt"]), evaluate_mod.references(examples)
        ids = examples["id"] if "id" in examples.column_names else [None] * len(prompts)
        made = {}
        if any("predictions" in ev.needs for _, ev in self.evaluators):
            mine = evaluate_mod.predict(model, self.tokenizer, prompts, recipe, self.choice)
            made = {i: text for part in dist.gather(mine) for i, text in part.items()}
        predicted = [Record(index=i, prompt=p, reference=refs[i], prediction=made.get(i, ""), id=ids[i])
                     for i, p in enumerate(prompts)]
        out = {}
        for name, evaluator in self.evaluators:
            out[name] = predicted
            if "logprobs" in evaluator.needs:
                scoring = replace(self.choice, batch_size=evaluator.batch_size or self.choice.batch_size)
                out[name] = evaluate_mod.scored_records(recipe, model, self.tokenizer, examples, predicted=predicted,
                                                        choice=scoring)
        return out

    def record(self) -> dict:
        """What env.json keeps: the evaluations run, their total time, the examples and backend."""
        choice = self.choice.record() if self.choice is not None else {}
        return {"evaluations": self.calls, "seconds": round(self.seconds, 2), "examples": len(self.examples), **choice}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_launch(recipe: dict, speed) -> None:
    """Task metrics need predictions at every evaluation, which FSDP's sharded model cannot make outside its step."""
    if recipe["training"]["task_metrics"] is not None and speed.distributed == "fsdp":
        raise RecipeError("training.task_metrics", "needs the model's predictions at every evaluation, and FSDP "
                          "shards the model across the processes", "train with ddp, or training.task_metrics: null")


def scorer(recipe: dict, found: early.Decider | None, tokenizer, examples):
    """The trainer's extra evaluation metrics: all the evaluators' on the eval subset when training.task_metrics
    is set, else early stopping's own (or None)."""
    size = recipe["training"]["task_metrics"]
    if size is None or examples is None:
        return early.scorer(found, recipe, tokenizer, examples)
    return Scorer(recipe, tokenizer, examples, size)
