"""What `runner train` does, start to end: train, evaluate the adapter, write report.md. `runner sweep` runs each of
its cells through here too, so a cell is a normal run."""

from __future__ import annotations

from pathlib import Path

from runner.common import dist
from runner.data import files
from runner.evaluate import evaluate, retention
from runner.evaluate.metrics import summary_line
from runner.export import card
from runner.report import report
from runner.train import tracking, train


def train_evaluate_report(recipe: dict, recipe_path: str | Path, evaluate_after: bool = True) -> Path:
    """Train ``recipe`` (read from ``recipe_path``), evaluate and report; returns the run folder."""
    benchmarks = retention.load_all(recipe) if evaluate_after else None  # unreadable ones stop it before training
    trackers = tracking.Session()  # held open by training, finished here with the evaluation's numbers
    sources = files.signature(recipe)  # the data files as the run reads them (checked again before the report)
    run_dir, model, tokenizer, prepared = train.train(recipe, trackers=trackers)
    metrics = None
    if evaluate_after and dist.sharded(model):
        # Each rank would generate its own batches on a model whose every forward needs all ranks in step.
        print(f"evaluation: skipped after FSDP training; evaluate the saved adapter with `runner eval "
              f"{recipe_path} --run {run_dir}` (under torchrun for several GPUs)", flush=True)
    elif evaluate_after:
        role = recipe["evaluation"]["split"]
        metrics = evaluate.evaluate(recipe, model, tokenizer, run_dir, examples=prepared.splits[role],
                                    splits=prepared.splits)
        if metrics is not None:
            print(summary_line(metrics))
        if dist.world().main:  # the base vs the adapter on evaluation.retention's benchmarks (rank 0 alone)
            retention.run(recipe, model, tokenizer, run_dir, loaded=benchmarks)
    trackers.finish(metrics)  # the evaluation's numbers join the training curves in the trackers' run
    if dist.world().main:
        changed = files.changed_since(sources, recipe)  # the report re-reads the data: only the data it trained on
        if changed is not None:
            raise changed
        print(f"report: {report.write(run_dir, recipe, tokenizer, rss_gb=report.peak_rss_gb())}")
        if (run_dir / "adapter").is_dir():  # the adapter's model card, from the report's numbers (peft's is empty)
            card.write(run_dir / "adapter" / card.CARD, recipe, run_dir, "adapter")
        print(f"done: {run_dir}")
    return run_dir
