"""training.report_to: TensorBoard in the run folder by default, the evaluation's metrics in the same tracker run,
a missing tracker refused in one line by `runner validate`."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from runner.cli import cli, recipes
from runner.common.errors import RecipeError
from runner.train import tracking
from tests.conftest import ROOT

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


def test_report_to_defaults_to_tensorboard_and_accepts_the_transformers_spellings():
    assert tracking.names(recipes.load(TINY)) == ["tensorboard"]
    assert tracking.names(recipes.load(TINY, ["training.report_to=none"])) == []
    assert tracking.names(recipes.load(TINY, ["training.report_to=[]"])) == []
    assert tracking.names(recipes.load(TINY, ["training.report_to=wandb"])) == ["wandb"]
    args = tracking.trainer_args(recipes.load(TINY, ["training.report_to=none"]), ROOT / "runs" / "x" / "20261129-1")
    assert args == {"report_to": "none", "run_name": "xsum_tiny/20261129-1", "project": "xsum_tiny"}
    with pytest.raises(RecipeError) as err:
        recipes.load(TINY, ["training.report_to=[tensorbord]"])
    assert err.value.key_path.startswith("training.report_to")


def test_a_tracker_that_is_not_installed_is_one_line_from_validate(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = cli.main(["validate", str(TINY), "training.report_to=[tensorboard,wandb]"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("error: training.report_to[1]: wandb is not installed (pip install wandb, or leave wandb out of "
                   "training.report_to)\n")
    with pytest.raises(RecipeError):
        tracking.check(recipes.load(TINY, ["training.report_to=wandb"]))
    tracking.check(recipes.load(TINY, ["training.report_to=tensorboard"]))  # installed: a dependency


def test_the_tracker_environment_points_tensorboard_at_the_run_and_leaves_the_users_settings(monkeypatch, tmp_path):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    recipe = recipes.load(TINY, ["training.report_to=[]"])
    recipe["training"]["report_to"] = ["tensorboard", "wandb", "mlflow"]  # as if installed
    with tracking.environment(recipe, tmp_path / "run"):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "run" / "tb")
        assert os.environ["WANDB_PROJECT"] == "xsum_tiny"
        assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "mine"
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ and "WANDB_PROJECT" not in os.environ
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "mine"


def test_evaluation_metrics_are_flattened_to_the_trackers_test_namespace():
    metrics = {"split": "test", "examples": 48, "evaluation_seconds": 3.1,
               "rouge": {"rougeL": {"f1": 74.1, "ci95": [70.0, 78.0]}},
               "classification": {"accuracy": 0.9, "accuracy_ci95": [0.8, 1.0], "invalid": 2,
                                  "per_class": {"World": {"f1": 0.8, "support": 27}}},
               "samples": {"count": 8, "file": "samples.md"}}
    assert tracking.flat_metrics(metrics, tracking.metric_prefix("test")) == {
        "test_rouge.rougeL": 74.1, "test_classification.accuracy": 0.9, "test_classification.invalid": 2.0,
        "test_classification.per_class.World.f1": 0.8}
    assert tracking.metric_prefix("eval") == "eval_"


def _trainer_with_tensorboard(events: list):
    """A trainer as Session sees one: its callbacks (a TensorBoard callback that records what it is sent) and state."""
    from types import SimpleNamespace

    from transformers.integrations import TensorBoardCallback

    class Recorded(TensorBoardCallback):
        def __init__(self):  # no writer: only what reaches the callback matters here
            pass

        def on_log(self, args, state, control, logs=None, **kwargs):
            events.append(("log", logs))

        def on_train_end(self, args, state, control, **kwargs):
            events.append(("end", None))

    state = SimpleNamespace(is_world_process_zero=True)
    return SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[Recorded()]), args=None, state=state,
                           control=None, model=None, is_world_process_zero=lambda: True)


def test_a_tracker_session_is_a_value_that_ends_only_its_own_trainers_runs():
    """The trackers of a training are held by the Session its caller made and handed to it (runner.cli.pipeline):
    finishing another session (a sweep's next cell, a run resumed after its training) ends nothing of this one;
    finishing this one sends the evaluation's numbers, then ends the trackers' run, once."""
    first, second = [], []
    session = tracking.Session()
    session.attach(_trainer_with_tensorboard(first), "test")
    handler_callbacks = session.trainer.callback_handler.callbacks
    handler_callbacks[0].on_train_end(None, None, None)  # the trainer's end of training: held back
    other = tracking.Session()
    other.attach(_trainer_with_tensorboard(second), "test")
    tracking.Session().finish({"rouge": {"rougeL": {"f1": 1.0}}})  # a session no training attached to
    other.finish()
    assert first == [] and second == [("end", None)]
    session.finish({"rouge": {"rougeL": {"f1": 74.1, "ci95": [70.0, 78.0]}}})
    session.finish({"rouge": {"rougeL": {"f1": 0.0}}})  # twice: nothing more
    assert first == [("log", {"test_rouge.rougeL": 74.1}), ("end", None)]


@pytest.mark.twins("xsum_tiny")
def test_the_trained_twin_has_tensorboard_curves_and_its_test_scores_in_the_same_run(trained):
    """`tensorboard --logdir runs/` finds the run: train and eval curves from the trainer, and the evaluation's
    ROUGE (sent after training, through the same TensorBoard callback) at the last step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = trained("xsum_tiny").run_dir
    events = sorted((run / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/loss", "test/rouge.rougeL"} <= tags
    metrics = json.loads((run / "metrics.json").read_text())
    env = json.loads((run / "env.json").read_text())
    [rouge] = acc.Scalars("test/rouge.rougeL")
    assert rouge.value == pytest.approx(metrics["rouge"]["rougeL"]["f1"], rel=1e-6)
    assert rouge.step == env["global_step"]
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    train_steps = [row["step"] for row in logged if "loss" in row and "train_loss" not in row]
    assert [e.step for e in acc.Scalars("train/loss")] == train_steps
