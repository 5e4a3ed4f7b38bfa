"""runner.evaluate.metrics: one shape for every metric of a metrics.json (value, 95% CI, lower-is-better), read one way by
the summary line, the report and `runner compare` (the flatten test moved here from test_compare.py)."""

from __future__ import annotations

from runner.evaluate import metrics

METRICS = {"split": "test", "examples": 3, "mode": "generate", "prediction_seconds": 1.0,
           "rouge": {"rougeL": {"f1": 40.0, "ci95": [30.0, 50.0]}},
           "loss": {"split": "eval", "examples": 3, "tokens": 30, "loss": 2.0, "loss_ci95": [1.8, 2.2],
                    "perplexity": 7.389, "perplexity_ci95": [6.05, 9.03]},
           "classification": {"accuracy": 0.5, "accuracy_ci95": [0.3, 0.7], "invalid": 2,
                              "per_class": {"Sports": {"precision": 0.5, "recall": 1.0, "support": 4}}},
           "samples": {"count": 8, "file": "samples.md"}}


def test_flatten_finds_each_metric_and_its_interval():
    flat = metrics.flatten(METRICS)
    assert flat == {
        "rouge.rougeL": {"value": 40.0, "ci95": [30.0, 50.0], "lower_is_better": False},
        "loss.loss": {"value": 2.0, "ci95": [1.8, 2.2], "lower_is_better": True},
        "loss.perplexity": {"value": 7.389, "ci95": [6.05, 9.03], "lower_is_better": True},
        "classification.accuracy": {"value": 0.5, "ci95": [0.3, 0.7], "lower_is_better": False},
        "classification.invalid": {"value": 2, "ci95": None, "lower_is_better": True},
        "classification.per_class.Sports.precision": {"value": 0.5, "ci95": None, "lower_is_better": False},
        "classification.per_class.Sports.recall": {"value": 1.0, "ci95": None, "lower_is_better": False},
    }


def test_headline_is_the_top_level_metrics_with_a_value():
    nan = {**METRICS, "multilabel": {"micro_f1": float("nan"), "exact_match": 0.25, "exact_match_ci95": [0.1, 0.4]},
           "myevals.length:LengthRatio": {"ratio": 1.5, "cap": 3.0}}
    assert list(metrics.headline(nan)) == [
        "rouge.rougeL", "loss.loss", "loss.perplexity", "classification.accuracy", "classification.invalid",
        "multilabel.exact_match", "myevals.length:LengthRatio.ratio", "myevals.length:LengthRatio.cap"]
    # A user evaluator's dotted name is one evaluator, its keys its metrics.
    assert list(metrics.by_evaluator(nan)["myevals.length:LengthRatio"]) == ["ratio", "cap"]


def test_summary_line_shows_each_top_level_metric_once():
    line = metrics.summary_line(METRICS)
    assert line == ("test (3 examples): rougeL 40.00 [30.00, 50.00], loss 2 [1.8, 2.2], perplexity 7.389 "
                    "[6.05, 9.03], accuracy 0.5 [0.3, 0.7], classification.invalid 2")
    assert metrics.summary_line({"split": "eval", "examples": 0}) == "eval (0 examples): no metrics"


def test_a_lone_value_with_an_interval_is_one_metric():
    """ROUGE's {"f1", "ci95"}: one metric named by its block, whatever the number's own key (also at the top)."""
    flat = metrics.flatten({"rouge": {"rouge1": {"f1": float("nan"), "ci95": [float("nan")] * 2}},
                            "mine:Score": {"score": 0.5, "ci95": [0.4, 0.6]}})
    assert list(flat) == ["rouge.rouge1", "mine:Score.score"]
    assert flat["mine:Score.score"]["ci95"] == [0.4, 0.6]
    assert metrics.headline({"rouge": {"rouge1": {"f1": float("nan"), "ci95": [0, 0]}}}) == {}
