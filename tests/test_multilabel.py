"""The multilabel evaluator: micro/macro-F1 and exact match against a hand computation, order-, case- and
space-tolerant names, invalid names, and its parameters checked when a recipe is validated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluators import BUILTINS
from evaluators.base import Record
from evaluators.multilabel import Multilabel
from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.common.stats import bootstrap_ci
from tests.conftest import ROOT

LABELS = ["joy", "anger", "fear", "neutral"]
PAIRS = [
    ("joy, anger", "anger,joy"),          # exact (order and spaces ignored)
    ("joy", "JOY, fear"),                 # joy right, fear a false positive
    ("fear", "neutral"),                  # fear missed, neutral a false positive
    ("anger, fear", "anger, anger"),      # anger right (once), fear missed
    ("neutral", "neutral, boredom"),      # neutral right; boredom is no label
    ("joy", ""),                          # nothing predicted
]


def records(pairs):
    return [Record(index=i, prompt="p", reference=ref, prediction=pred) for i, (ref, pred) in enumerate(pairs)]


def test_numbers_match_a_hand_computation(tmp_path):
    out = Multilabel(labels=LABELS, seed=1).evaluate(records(PAIRS), tmp_path)
    # per label: tp, predicted, support
    counts = {"joy": (2, 2, 3), "anger": (2, 2, 2), "fear": (0, 1, 2), "neutral": (1, 2, 1)}
    tp, predicted, support = (sum(c[i] for c in counts.values()) for i in range(3))
    micro_p, micro_r = tp / predicted, tp / support
    assert out["micro_precision"] == round(micro_p, 4) and out["micro_recall"] == round(micro_r, 4)
    assert out["micro_f1"] == round(2 * micro_p * micro_r / (micro_p + micro_r), 4)
    f1s = []
    for label, (t, p, s) in counts.items():
        f1 = 2 * t / (p + s)  # F1 = 2tp / (predicted + support)
        f1s.append(f1)
        assert out["per_label"][label]["f1"] == round(f1, 4), label
    assert out["macro_f1"] == round(float(np.mean(f1s)), 4)
    # exact: rows 0 and 4 (boredom is dropped from the set, so {neutral} == {neutral})
    assert out["exact_match"] == round(2 / 6, 4)
    low, high = bootstrap_ci(np.array([1, 0, 0, 0, 1, 0], dtype=float), 1)
    assert out["exact_match_ci95"] == [round(low, 4), round(high, 4)]
    assert out["invalid_names"] == 1 and out["invalid_rate"] == round(1 / 6, 4)
    assert out["invalid_examples"] == [{"name": "boredom", "count": 1}]
    json.dumps(out)


def test_labels_nobody_used_are_left_out_of_macro_f1(tmp_path):
    out = Multilabel(labels=LABELS + ["grief"]).evaluate(records([("joy", "joy"), ("anger", "anger")]), tmp_path)
    assert out["macro_f1"] == 1.0 and out["labels_scored"] == 2


def test_a_custom_separator(tmp_path):
    out = Multilabel(labels=LABELS, separator="|").evaluate(records([("joy|fear", "fear | joy")]), tmp_path)
    assert out["exact_match"] == 1.0 and out["micro_f1"] == 1.0


def test_labels_default_to_the_names_in_the_references(tmp_path):
    out = Multilabel().evaluate(records([("b, a", "a"), ("c", "A, c")]), tmp_path)
    assert list(out["per_label"]) == ["a", "b", "c"]
    assert out["per_label"]["a"]["predicted"] == 2 and out["invalid_names"] == 0


def test_is_a_builtin_that_recipes_can_name():
    assert BUILTINS["multilabel"] == "evaluators.multilabel:Multilabel"
    recipe = recipes.load(ROOT / "recipes" / "goemotions_phi2.yaml")
    spec = recipe["evaluation"]["evaluators"][0]
    assert spec["name"] == "multilabel" and len(spec["labels"]) == 28 and spec["separator"] == ","


@pytest.mark.parametrize("override, key_path", [
    ("evaluation.evaluators[0].separator=''", "evaluation.evaluators[0].separator"),
    ("evaluation.evaluators[0].labels=[joy]", "evaluation.evaluators[0].labels"),
    ("evaluation.evaluators[0].threshold=0.5", "evaluation.evaluators[0].threshold"),
])
def test_wrong_parameters_are_recipe_errors(override, key_path):
    with pytest.raises(RecipeError) as info:
        recipes.load(ROOT / "recipes" / "goemotions_phi2.yaml", [override])
    assert info.value.key_path == key_path


def test_per_example_exact_match_is_what_exact_match_averages(tmp_path):
    evaluator = Multilabel(labels=LABELS)
    flags = evaluator.per_example(records(PAIRS))["exact_match"]
    assert flags.tolist() == [1, 0, 0, 0, 1, 0]
    assert round(flags.mean(), 4) == evaluator.evaluate(records(PAIRS), tmp_path)["exact_match"]


def test_the_recipe_s_labels_are_checked_against_each_name_of_the_data():
    """Multi-label references hold several names: the list is checked against each, split as evaluation splits them."""
    from runner.evaluate import evaluate

    def check(labels):
        recipe = recipes.load(ROOT / "recipes" / "goemotions_phi2.yaml",
                                 [f"evaluation.evaluators[0].labels=[{','.join(labels)}]"])
        evaluate.check_labels(recipe, {"train": {"completion": [" joy, anger", " fear", " joy"]}})

    check(["joy", "anger", "fear", "grief"])  # grief: a rare name this sample lacks
    with pytest.raises(RecipeError) as info:
        check(["joyy", "anger", "fear"])
    assert info.value.key_path == "evaluation.evaluators[0].labels[0]"
    assert info.value.hint == "the data's labels: anger, fear, joy; did you mean 'joy'?"
