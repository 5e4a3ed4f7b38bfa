"""The classification evaluator: numbers checked against a hand computation, tolerant label matching, invalid
predictions, the confusion-matrix PNG, and its parameters checked when a recipe is validated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluators import BUILTINS
from evaluators.base import Record
from evaluators.classification import Classification
from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.common.stats import bootstrap_ci
from tests.conftest import ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def records(pairs):
    return [Record(index=i, prompt=f"prompt {i}", reference=ref, prediction=pred) for i, (ref, pred) in enumerate(pairs)]


# reference, prediction. Classes: cat, dog, bird.
PAIRS = [
    ("cat", "cat"), ("cat", " CAT "), ("cat", "dog"), ("cat", "a cat, I think"),  # 2 right, 1 dog, 1 invalid
    ("dog", "dog"), ("dog", "Dog"), ("dog", "cat"),                              # 2 right, 1 cat
    ("bird", "bird\n"), ("bird", "fish"),                                        # 1 right, 1 invalid
]


def test_numbers_match_a_hand_computation(tmp_path):
    out = Classification(labels=["cat", "dog", "bird"], seed=3).evaluate(records(PAIRS), tmp_path)
    assert out["accuracy"] == round(5 / 9, 4)
    # cat: tp 2, predicted 3 (2 + the dog mistaken for a cat), support 4. dog: tp 2, predicted 3, support 3.
    # bird: tp 1, predicted 1, support 2. Invalid predictions are no class's false positive.
    expect = {"cat": (2 / 3, 2 / 4), "dog": (2 / 3, 2 / 3), "bird": (1.0, 1 / 2)}
    f1s = []
    for label, (p, r) in expect.items():
        f1 = 2 * p * r / (p + r)
        f1s.append(f1)
        got = out["per_class"][label]
        assert (got["precision"], got["recall"], got["f1"]) == (round(p, 4), round(r, 4), round(f1, 4)), label
    assert out["per_class"]["cat"]["support"] == 4
    assert out["macro_f1"] == round(float(np.mean(f1s)), 4)
    assert out["invalid"] == 2 and out["invalid_rate"] == round(2 / 9, 4)
    assert {e["prediction"] for e in out["invalid_examples"]} == {"a cat, I think", "fish"}
    cm = out["confusion_matrix"]
    assert cm["rows"] == ["cat", "dog", "bird"] and cm["columns"] == ["cat", "dog", "bird", "(invalid)"]
    assert cm["counts"] == [[2, 1, 0, 1], [1, 2, 0, 0], [0, 0, 1, 1]]
    json.dumps(out)  # metrics.json must be able to hold it


def test_accuracy_interval_is_the_bootstrap_of_the_correct_flags(tmp_path):
    out = Classification(labels=["cat", "dog", "bird"], seed=7).evaluate(records(PAIRS), tmp_path)
    correct = np.array([1, 1, 0, 0, 1, 1, 0, 1, 0], dtype=float)
    low, high = bootstrap_ci(correct, 7)
    assert out["accuracy_ci95"] == [round(low, 4), round(high, 4)]
    assert low < out["accuracy"] < high
    again = Classification(labels=["cat", "dog", "bird"], seed=7).evaluate(records(PAIRS), tmp_path)
    assert again["accuracy_ci95"] == out["accuracy_ci95"]


def test_confusion_matrix_png_is_written(tmp_path):
    import matplotlib.image

    out = Classification(labels=["cat", "dog", "bird"]).evaluate(records(PAIRS), tmp_path)
    path = tmp_path / out["file"]
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).shape[0] > 100
    Classification(labels=["cat", "dog", "bird"], confusion_matrix=False).evaluate(records(PAIRS), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_labels_default_to_the_references_and_case_variants_are_one_class(tmp_path):
    out = Classification().evaluate(records([("Yes", "yes"), ("yes ", "YES"), ("No", "no"), ("no", "maybe")]),
                                    tmp_path)
    assert list(out["per_class"]) == ["No", "Yes"]
    assert out["accuracy"] == 0.75 and out["invalid"] == 1


def test_a_class_nobody_used_is_left_out_of_macro_f1(tmp_path):
    out = Classification(labels=["cat", "dog", "bird"]).evaluate(records([("cat", "cat"), ("dog", "dog")]), tmp_path)
    assert out["macro_f1"] == 1.0
    assert out["per_class"]["bird"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_references_outside_the_labels_are_reported_not_dropped(tmp_path):
    out = Classification(labels=["cat", "dog"]).evaluate(records([("cat", "cat"), ("horse", "horse")]), tmp_path)
    assert out["references_not_in_labels"] == ["horse"]
    assert out["accuracy"] == 1.0


def test_is_a_builtin_that_recipes_can_name():
    assert BUILTINS["classification"] == "evaluators.classification:Classification"
    recipe = recipes.load(ROOT / "recipes" / "agnews_phi2.yaml")
    spec = recipe["evaluation"]["evaluators"][0]
    assert spec == {"name": "classification", "labels": ["World", "Sports", "Business", "Sci/Tech"],
                    "confusion_matrix": True}


@pytest.mark.parametrize("override, key_path, word", [
    ("evaluation.evaluators[0].labels=World", "evaluation.evaluators[0].labels", "expected list or null"),
    ("evaluation.evaluators[0].labels=[World,World]", "evaluation.evaluators[0].labels", "duplicate"),
    ("evaluation.evaluators[0].label=[a,b]", "evaluation.evaluators[0].label", "did you mean 'labels'"),
    ("evaluation.evaluators[0].confusion_matrix=maybe", "evaluation.evaluators[0].confusion_matrix", "boolean"),
])
def test_wrong_parameters_are_recipe_errors(override, key_path, word):
    with pytest.raises(RecipeError) as info:
        recipes.load(ROOT / "recipes" / "agnews_phi2.yaml", [override])
    assert info.value.key_path == key_path
    assert word in info.value.line()


def test_per_example_correctness_is_what_accuracy_averages(tmp_path):
    evaluator = Classification(labels=["cat", "dog", "bird"])
    flags = evaluator.per_example(records(PAIRS))["accuracy"]
    assert flags.tolist() == [1, 1, 0, 0, 1, 1, 0, 1, 0]
    assert round(flags.mean(), 4) == evaluator.evaluate(records(PAIRS), tmp_path)["accuracy"]


# ---------------------------------------------------------------- the recipe's labels against the data's


def label_check(labels: list[str], references: list[str], *overrides: str, recipe: str = "agnews_phi2"):
    """evaluate.check_labels on a recipe whose first evaluator lists ``labels``, with data whose completions are
    ``references`` (one split)."""
    from runner.evaluate import evaluate

    resolved = recipes.load(ROOT / "recipes" / f"{recipe}.yaml",
                               [f"evaluation.evaluators[0].labels=[{','.join(labels)}]", *overrides])
    evaluate.check_labels(resolved, {"test": {"completion": [f" {r}" for r in references]}})


AGNEWS = ["World", "Sports", "Business", "Sci/Tech"]


def test_a_listed_label_no_split_holds_is_fine_while_the_data_has_no_other():
    """A rare class a sample missed: the list and the data do not disagree."""
    label_check([*AGNEWS, "Health"], AGNEWS * 2)
    label_check([*AGNEWS, "Health"], AGNEWS * 2, "generation.mode=rank")


def test_a_listed_label_missing_from_the_data_that_has_others_is_an_error():
    with pytest.raises(RecipeError) as info:
        label_check(["pos", "neg"], ["positive", "negative", "positive"])
    assert info.value.key_path == "evaluation.evaluators[0].labels[0]"
    assert info.value.line() == ("error: evaluation.evaluators[0].labels[0]: 'pos' is not a label of the data (the "
                                 "data's labels: negative, positive; did you mean 'positive'?)")


def test_references_outside_the_list_are_fine_when_generating_but_not_in_rank_mode():
    label_check(AGNEWS[:3], AGNEWS)  # generated answers are scored; report.md lists the unlisted references
    with pytest.raises(RecipeError) as info:
        label_check(AGNEWS[:3], AGNEWS, "generation.mode=rank")
    assert info.value.key_path == "evaluation.evaluators[0].labels"
    assert "'Sci/Tech'" in info.value.problem and "never predict" in info.value.problem


def test_rank_mode_s_own_labels_are_checked_too():
    with pytest.raises(RecipeError) as info:
        label_check(AGNEWS, AGNEWS, "generation.mode=rank", "generation.labels=[World,Sports,Business,Sci]")
    assert info.value.key_path == "generation.labels[3]"
    assert "did you mean 'Sci/Tech'?" in info.value.hint


def test_labels_evaluation_would_take_for_one_are_an_error():
    with pytest.raises(RecipeError) as info:
        label_check(["World", "world"], AGNEWS)
    assert info.value.key_path == "evaluation.evaluators[0].labels" and info.value.hint == "list each label once"


@pytest.mark.slow
@pytest.mark.parametrize("command", [["train"], ["eval", "--base"]])
def test_misspelled_labels_stop_before_the_model_loads(tmp_path, tiny, cli, command):
    """The issue's case: rank mode among labels the data never uses scored accuracy 0.08 and exited 0."""
    result = cli(*command, ROOT / "recipes" / "tiny" / "agnews_tiny.yaml", "generation.mode=rank",
                 "evaluation.evaluators[0].labels=[World,Sportz,Busines,Sci]", "training.max_steps=2",
                 f"output_dir={tmp_path / 'runs'}")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == ("error: evaluation.evaluators[0].labels[1]: 'Sportz' is not a label of the data "
                                     "(the data's labels: World, Business, Sci/Tech, Sports; did you mean 'Sports'?)")
    assert "trainable params" not in result.stdout  # stopped before the model loaded
    assert not any(p.is_file() for p in (tmp_path / "runs").rglob("*"))


@pytest.mark.slow
def test_labels_the_data_writes_differently_stop_training(tmp_path, tiny, cli):
    """Generated answers: [pos, neg] against data that says positive / negative used to exit 0."""
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": f"review {i}", "label": ["positive", "negative"][i % 2]}) + "\n"
                               for i in range(40)))
    result = cli("train", ROOT / "recipes" / "tiny" / "agnews_tiny.yaml", f"data.source={reviews}",
                 "data.holdout={eval: 4, test: 8}", "evaluation.evaluators[0].labels=[pos,neg]",
                 f"output_dir={tmp_path / 'runs'}")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.startswith("error: evaluation.evaluators[0].labels[0]: 'pos' is not a label of the data "
                                    "(the data's labels: negative, positive; did you mean 'positive'?)")
    assert not any(p.is_file() for p in (tmp_path / "runs").rglob("*"))
