"""training.early_stopping: stop after N evaluations without improvement, keep the best evaluation's adapter (its
checkpoint is never rotated away), and say in env.json and report.md which step was kept and why."""

from __future__ import annotations

import json

import pytest

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.store import checkpoints
from tests.conftest import ROOT, run_folder

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


def test_early_stopping_needs_an_eval_split_and_a_checkpoint_at_each_evaluation(tiny):
    with pytest.raises(RecipeError) as err:
        recipes.load(TINY, ["training.early_stopping={patience: 2}", "data.splits.eval=null"])
    assert err.value.key_path == "training.early_stopping"
    with pytest.raises(RecipeError) as err:
        recipes.load(TINY, ["training.early_stopping={patience: 2}", "training.eval_every=5",
                               "training.save_every=10"])
    assert err.value.key_path == "training.save_every"
    recipe = recipes.load(TINY, ["training.early_stopping={patience: 2}", "training.eval_every=5"])
    assert recipe["training"]["early_stopping"] == {"patience": 2, "metric": "eval_loss", "min_delta": 0.0,
                                                    "restore_best": True}


def test_rotation_keeps_the_best_checkpoint_besides_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"x" * step)
        checkpoints._mark_complete(ckpt, {})
    checkpoints.rotate(tmp_path, keep=1, best=tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_a_run_whose_eval_loss_rises_stops_and_keeps_the_best_steps_adapter(tiny, cli, tmp_path):
    """A learning rate far too high makes the eval loss jump after the first step (measured 6.7 -> 8.7): with
    patience 1 the run stops at step 2 of 10 and the adapter is step 1's, even though the trainer's rotation
    (save_total_limit 1) would otherwise have deleted that checkpoint."""
    from safetensors.torch import load_file

    result = cli("train", TINY, f"output_dir={tmp_path}", "training.max_steps=10", "training.eval_every=1",
                 "training.learning_rate=0.3", "training.warmup_ratio=0", "training.early_stopping={patience: 1}",
                 "training.save_total_limit=1", "training.micro_batch_size=4", "data.train_samples=200",
                 "data.eval_samples=8", "training.report_to=none", "--no-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_folder(result.stdout)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    evals = {row["step"]: row["eval_loss"] for row in log if "eval_loss" in row}
    assert sorted(evals) == [1, 2] and evals[2] > evals[1]
    best = json.loads((run / "env.json").read_text())["early_stopping"]
    assert best["stopped_early"] and best["last_step"] == 2 and best["max_steps"] == 10
    assert best["best_step"] == 1 and best["kept_step"] == 1 and best["restored_best"]
    assert best["best_value"] == pytest.approx(evals[1])
    assert best["evaluations_without_improvement"] == 1
    # the run's adapter is step 1's checkpoint, not step 2's
    kept = load_file(run / "adapter" / "adapter_model.safetensors")
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    first = load_file(run / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    second = load_file(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert kept.keys() == first.keys()
    assert all((kept[k] == first[k]).all() for k in kept)
    assert any((kept[k] != second[k]).any() for k in kept)
    assert "early stopping: kept step 1's adapter, the lowest eval_loss" in result.stdout
    report = (run / "report.md").read_text()
    assert "| adapter kept (early stopping) | kept step 1's adapter, the lowest eval_loss" in report
    assert "stopped at step 2 of 10: 1 evaluation(s) in a row without an improvement" in report


# ---------------------------------------------------------------- a metric an evaluator declares

AGNEWS = ROOT / "recipes" / "tiny" / "agnews_tiny.yaml"
USER_EVALUATORS = ("evaluation.evaluators=[{name: classification, labels: [World, Sports, Business, Sci/Tech]}, "
                   "{name: 'tests.userevals:ErrorRate'}, {name: 'tests.userevals:Undeclared'}]")


@pytest.mark.parametrize(("metric", "where", "what"), [
    ("eval_los", "training.early_stopping.metric", "did you mean 'eval_loss'?"),
    ("rouge.rougeL", "training.early_stopping.metric", "is neither the trainer's metric nor one of"),
    ("tests.userevals:ErrorRate.nope", "training.early_stopping.metric",
     "has no metric 'nope' (one of: tests.userevals:ErrorRate.error_rate, tests.userevals:ErrorRate.loss_free)"),
    ("tests.userevals:Undeclared.score", "training.early_stopping.metric",
     "declares no metrics, so whether a higher or a lower score is better is unknown"),
])
def test_an_evaluator_metric_to_stop_on_is_checked_at_validation(tiny, cli, metric, where, what):
    result = cli("validate", AGNEWS, USER_EVALUATORS, f"training.early_stopping={{patience: 2, metric: '{metric}'}}")
    assert result.returncode == 2, result.stdout
    line = result.stderr.strip()
    assert line.startswith(f"error: {where}: ") and what in line and "\n" not in line


def test_the_direction_to_stop_on_is_declared(tiny):
    from runner.train import early

    def decided(metric):
        recipe = recipes.load(AGNEWS, [USER_EVALUATORS, f"training.early_stopping={{patience: 2, metric: '{metric}'}}"])
        found = early.decider(recipe)
        return found.logged, early.trainer_args(recipe, found)["greater_is_better"]

    assert decided("eval_loss") == ("eval_loss", False)
    assert decided("eval_mean_token_accuracy") == ("eval_mean_token_accuracy", True)
    # a guess from the names would have it the other way round for both
    assert decided("tests.userevals:ErrorRate.error_rate") == ("eval_tests.userevals:ErrorRate.error_rate", False)
    assert decided("tests.userevals:ErrorRate.loss_free") == ("eval_tests.userevals:ErrorRate.loss_free", True)
    assert decided("classification.accuracy") == ("eval_classification.accuracy", True)


@pytest.mark.slow
def test_stopping_on_a_users_lower_is_better_metric_keeps_its_lowest_evaluation(tiny, cli, tmp_path):
    """The user's evaluator scores the model's (ranked) predictions of the eval split at every evaluation; its
    error_rate is declared lower-is-better, so the lowest one is the best (a guess from the name would have kept the
    highest). Measured here: 0.875 at step 1, then 0.4375 at steps 2-4; patience 2 stops at step 4, keeping step 2."""
    metric = "tests.userevals:ErrorRate.error_rate"
    result = cli("train", AGNEWS, f"output_dir={tmp_path}", "training.max_steps=6", "training.eval_every=1",
                 "training.warmup_ratio=0", f"training.early_stopping={{patience: 2, metric: '{metric}'}}",
                 "training.save_total_limit=1", "training.micro_batch_size=8", "data.train_samples=200",
                 "data.eval_samples=16", "training.report_to=none", "generation.mode=rank", USER_EVALUATORS,
                 "--no-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_folder(result.stdout)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    evals = {row["step"]: row[f"eval_{metric}"] for row in log if f"eval_{metric}" in row}
    assert sorted(evals) == list(range(1, len(evals) + 1)) and all("eval_loss" in row for row in log
                                                                   if f"eval_{metric}" in row)
    lowest = min(evals.values())
    assert lowest < max(evals.values())  # the evaluations differ: the direction decides which is kept
    first_lowest = min(step for step, value in evals.items() if value == lowest)
    best = json.loads((run / "env.json").read_text())["early_stopping"]
    assert best["metric"] == metric and best["better"] == "lower"
    assert best["best_value"] == pytest.approx(lowest) and best["best_step"] == first_lowest == best["kept_step"]
    # stopped after `patience` evaluations in a row without a lower error rate
    assert best["stopped_early"] and best["last_step"] == max(evals)
    assert all(evals[s] >= lowest for s in evals if s > first_lowest) and best["evaluations_without_improvement"] == 2
    assert f"kept step {first_lowest}'s adapter, the lowest {metric}" in result.stdout
