"""runner.evaluate.metrics: one shape for every metric of a metrics.json (value, 95% CI, the declared direction and
scale), read one way by the summary line, the report and `runner compare` (the flatten test moved here from
test_compare.py)."""

from __future__ import annotations

from evaluators.classification import Classification
from evaluators.loss import Loss
from evaluators.rouge import Rouge
from evaluators.samples import Samples
from runner.evaluate import metrics

# What evaluation writes beside the numbers: each evaluator's declaration.
DECLARED = metrics.declared_by([("rouge", Rouge(types=["rougeL"])), ("loss", Loss()),
                                ("classification", Classification()), ("samples", Samples())])
METRICS = {"split": "test", "examples": 3, "mode": "generate", "prediction_seconds": 1.0,
           "rouge": {"rougeL": {"f1": 40.0, "ci95": [30.0, 50.0]}},
           "loss": {"split": "eval", "examples": 3, "tokens": 30, "loss": 2.0, "loss_ci95": [1.8, 2.2],
                    "perplexity": 7.389, "perplexity_ci95": [6.05, 9.03]},
           "classification": {"accuracy": 0.5, "accuracy_ci95": [0.3, 0.7], "invalid": 2,
                              "per_class": {"Sports": {"precision": 0.5, "recall": 1.0, "support": 4}}},
           "samples": {"count": 8, "file": "samples.md"},
           metrics.DECLARED: DECLARED}


def test_flatten_finds_each_metric_and_its_interval():
    flat = metrics.flatten(METRICS)
    assert flat == {  # the declared numbers only: no loss.examples, loss.tokens or per-class support
        "rouge.rougeL": {"value": 40.0, "ci95": [30.0, 50.0], "better": "higher", "scale": "percent"},
        "loss.loss": {"value": 2.0, "ci95": [1.8, 2.2], "better": "lower", "scale": "unbounded"},
        "loss.perplexity": {"value": 7.389, "ci95": [6.05, 9.03], "better": "lower", "scale": "unbounded"},
        "classification.accuracy": {"value": 0.5, "ci95": [0.3, 0.7], "better": "higher", "scale": "fraction"},
        "classification.invalid": {"value": 2, "ci95": None, "better": "lower", "scale": "count"},
        "classification.per_class.Sports.precision": {"value": 0.5, "ci95": None, "better": "higher",
                                                      "scale": "fraction"},
        "classification.per_class.Sports.recall": {"value": 1.0, "ci95": None, "better": "higher",
                                                   "scale": "fraction"},
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
    # every metric named as report.md and `runner compare` name it: <evaluator>.<metric>
    assert line == ("test (3 examples): rouge.rougeL 40.00 [30.00, 50.00], loss.loss 2 [1.8, 2.2], loss.perplexity "
                    "7.389 [6.05, 9.03], classification.accuracy 0.5 [0.3, 0.7], classification.invalid 2")
    assert metrics.summary_line({"split": "eval", "examples": 0}) == "eval (0 examples): no metrics"


def test_a_lone_value_with_an_interval_is_one_metric():
    """ROUGE's {"f1", "ci95"}: one metric named by its block, whatever the number's own key (also at the top)."""
    flat = metrics.flatten({"rouge": {"rouge1": {"f1": float("nan"), "ci95": [float("nan")] * 2}},
                            "mine:Score": {"score": 0.5, "ci95": [0.4, 0.6]}})
    assert list(flat) == ["rouge.rouge1", "mine:Score.score"]
    assert flat["mine:Score.score"]["ci95"] == [0.4, 0.6]
    assert metrics.headline({"rouge": {"rouge1": {"f1": float("nan"), "ci95": [0, 0]}}}) == {}


def test_directions_come_from_the_declaration_not_the_name():
    """A lower-is-better metric whose name says nothing of it, a higher-is-better one named like a loss: each as
    declared; a block whose evaluator declares nothing gets no direction at all."""
    from evaluators.base import Metric

    class Mine:
        metrics = (Metric("error_rate", "lower", "fraction"), Metric("loss_free", "higher", "fraction"))
        headline = None

    declared = metrics.declared_by([("my:Err", Mine())])
    flat = metrics.flatten({"my:Err": {"error_rate": 0.2, "loss_free": 0.8, "examples": 10},
                            "other:Thing": {"loss": 1.0}}, declared)
    assert flat == {"my:Err.error_rate": {"value": 0.2, "ci95": None, "better": "lower", "scale": "fraction"},
                    "my:Err.loss_free": {"value": 0.8, "ci95": None, "better": "higher", "scale": "fraction"},
                    "other:Thing.loss": {"value": 1.0, "ci95": None, "better": None, "scale": None}}
    assert declared["my:Err"]["headline"] == "error_rate"  # none declared: the first declared top-level metric
    assert metrics.better_of(0.1, 0.2, "lower") == 1 and metrics.better_of(0.1, 0.2, "higher") == -1
    assert metrics.better_of(0.1, 0.1, "lower") == 0 and metrics.better_of(0.1, 0.2, None) is None


def test_the_primary_metric_is_the_first_evaluators_headline():
    assert metrics.primary_metric(METRICS) == "rouge.rougeL"
    reordered = {"split": "test", "examples": 3, "samples": METRICS["samples"], "loss": METRICS["loss"],
                 "rouge": METRICS["rouge"], metrics.DECLARED: DECLARED}
    assert metrics.primary_metric(reordered) == "loss.loss"  # samples has no numbers; loss declares its headline
    # an evaluator that declares nothing: the first number it returns
    assert metrics.primary_metric({"mine:X": {"score": 0.4, "other": 1.0}}) == "mine:X.score"
