"""Trivial baselines scored by the recipe's own evaluators, the report's Baselines and How-many-examples sections,
and the statistics behind them. No training: the records are the tiny test splits with hand-made predictions."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from evaluators.base import Record
from runner.cli import recipes
from runner.common import stats
from runner.data import data as data_mod
from runner.evaluate import baselines
from runner.report import report
from tests.conftest import ROOT

TINY = ROOT / "recipes" / "tiny"


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from runner.model import model

    return model.load_tokenizer(recipes.load(TINY / "xsum_tiny.yaml"))


def evaluated(recipe: dict, tokenizer, predict) -> list[Record]:
    """The evaluation split's examples as records, each predicted by ``predict(reference)``."""
    examples = data_mod.prepare(recipe, tokenizer, roles=("test",)).splits["test"]
    return [Record(index=i, prompt=p, reference=c.strip(), prediction=predict(c.strip()), id=ex_id)
            for i, (p, c, ex_id) in enumerate(zip(examples["prompt"], examples["completion"], examples["id"],
                                                   strict=True))]


def write_run(run_dir, records, metrics) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "predictions.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r.__dict__) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_unrender_reads_the_fields_back_from_a_prompt():
    template = "Premise: {premise}\nHypothesis: {hypothesis}\nAnswer:"
    prompt = data_mod.render(template, {"premise": "A. B: c.", "hypothesis": "Answer: no"})
    assert baselines.unrender(template, prompt) == {"premise": "A. B: c.", "hypothesis": "Answer: no"}
    assert baselines.unrender(template, "something else") is None
    assert baselines.first_sentence("  One  two. Three? Four.") == "One two."
    assert baselines.first_words("a b c d", 2) == "a b"


def test_lead1_on_the_tiny_xsum_data_is_scored_and_in_the_report(tiny, tokenizer, tmp_path):
    from evaluators.rouge import Rouge

    recipe = recipes.load(TINY / "xsum_tiny.yaml")
    records = evaluated(recipe, tokenizer, predict=lambda ref: ref)  # a perfect model
    run_dir = tmp_path / "run"
    model_metrics = {"split": "test", "examples": len(records), "rouge": Rouge().evaluate(records, run_dir)}
    write_run(run_dir, records, model_metrics)
    path = report.write(run_dir, recipe)

    result = json.loads((run_dir / "baselines.json").read_text())
    lead = result["baselines"]["LEAD-1"]
    saved = [json.loads(line) for line in (run_dir / lead["folder"] / "predictions.jsonl").read_text().splitlines()]
    document = baselines.unrender(recipe["prompt"]["template"], records[0].prompt)["document"]
    assert saved[0]["prediction"] == document.split(". ")[0] + "."
    assert saved[0]["reference"] == records[0].reference
    # Scored by the same evaluator: recompute LEAD-1's ROUGE-L from its predictions.
    rouge_l = Rouge().per_example([Record(r["index"], r["prompt"], r["reference"], r["prediction"]) for r in saved])
    assert lead["metrics"]["rouge"]["rougeL"]["f1"] == pytest.approx(rouge_l["rougeL"].mean(), abs=1e-3)
    assert 5 < lead["metrics"]["rouge"]["rougeL"]["f1"] < 90  # the first sentence shares words with the summary
    words = next(n for n in result["baselines"] if n.startswith("first "))
    n_words = int(words.split()[1])
    train = baselines.train_references(recipe)
    assert n_words == int(np.median([len(r.split()) for r in train]))
    # The perfect model beats LEAD-1, and the paired interval says so.
    paired = lead["model_minus_baseline"]["rouge.rougeL"]
    assert paired["difference"] == pytest.approx(100 - lead["metrics"]["rouge"]["rougeL"]["f1"], abs=1e-3)
    assert paired["difference_ci95"][0] > 0

    text = path.read_text()
    section = text[text.index("## Baselines"):text.index("## How many examples")]
    assert "**LEAD-1**" in section and f"**{words}**" in section
    lead_l = lead["metrics"]["rouge"]["rougeL"]["f1"]
    assert re.search(rf"\| rouge.rougeL \| 100 \[100, 100\] \| {lead_l:.4g} \[", section), section
    assert "## Samples" in text and text.index("## How many examples") < text.index("## Samples")


def test_classification_baselines_count_labels_in_train_only(tiny, tokenizer, tmp_path):
    from evaluators.classification import Classification

    recipe = recipes.load(TINY / "agnews_tiny.yaml", ["data.test_samples=60"])
    records = evaluated(recipe, tokenizer, predict=lambda ref: ref)
    result = baselines.compute(recipe, tmp_path, records)
    train = baselines.train_references(recipe)
    counts = {label: train.count(label) for label in set(train)}
    top = max(counts, key=counts.get)
    majority = result["baselines"]["majority class"]
    assert f"`{top}`" in majority["description"]
    gold = [r.reference for r in records]
    assert majority["metrics"]["classification"]["accuracy"] == pytest.approx(gold.count(top) / len(gold), abs=1e-4)
    assert majority["metrics"]["classification"]["per_class"][top]["recall"] == 1.0
    draws = [json.loads(line)["prediction"] for line in
             (tmp_path / result["baselines"]["label distribution"]["folder"] / "predictions.jsonl").open()]
    assert set(draws) <= set(counts) and len(set(draws)) > 1
    again = baselines.compute(recipe, tmp_path / "again", records)  # seeded: the same draws
    assert again["baselines"]["label distribution"]["metrics"] == result["baselines"]["label distribution"]["metrics"]
    assert Classification  # the evaluator the recipe names scored them (metrics carry its keys)
    assert "macro_f1" in majority["metrics"]["classification"]


def test_multilabel_baseline_is_the_most_frequent_label_set(tiny, tokenizer, tmp_path):
    from collections import Counter

    from evaluators.multilabel import split_names
    from runner.common.labels import normalize

    recipe = recipes.load(TINY / "goemotions_tiny.yaml", ["data.test_samples=40"])
    records = evaluated(recipe, tokenizer, predict=lambda ref: ref)
    result = baselines.compute(recipe, tmp_path, records)
    base = result["baselines"]["most frequent label set"]
    train = baselines.train_references(recipe)
    sets = Counter(frozenset(normalize(n) for n in split_names(r, ",")) for r in train)
    top = sets.most_common(1)[0][0]
    predicted = base["description"].split("`")[1]
    assert frozenset(normalize(n) for n in split_names(predicted, ",")) == top
    exact = np.mean([frozenset(normalize(n) for n in split_names(r.reference, ",")) == top for r in records])
    assert base["metrics"]["multilabel"]["exact_match"] == pytest.approx(exact, abs=1e-4)


def test_smallest_resolvable_difference_follows_the_bootstrap_spread():
    assert stats.smallest_difference([40.0, 50.0]) == pytest.approx(5 * math.sqrt(2))
    # four times the examples halve the interval: resolving half the difference needs four times the examples
    assert stats.examples_for(5 * math.sqrt(2) / 2, [40.0, 50.0], 100) == 400
    # a point by the declared scale (evaluators.base.SCALES), never by the metric's name
    assert stats.point("percent") == 1.0 and stats.point("fraction") == 0.01
    assert stats.point("unbounded") is None and stats.point(None) is None
    metrics = {"split": "test", "examples": 100, "classification": {"accuracy": 0.5, "accuracy_ci95": [0.4, 0.6]},
               "loss": {"loss": 2.0, "loss_ci95": [1.9, 2.1]}}
    lines = "\n".join(report.resolution_section(metrics))
    # half-width 0.1, smallest 0.1414; one point (0.01) needs 100 x (0.1414/0.01)^2 = 20,000 examples
    assert "| classification.accuracy | 0.5 | ±0.1 | 0.1414 | 20,000 (for 0.01) |" in lines
    assert "| loss.loss | 2 | ±0.1 | 0.1414 | – |" in lines


def test_welch_separates_seed_noise_from_a_real_difference():
    same = stats.welch([50.0, 52.0, 51.0], [51.0, 50.5, 52.5])
    assert same["ci95"][0] < 0 < same["ci95"][1] and not stats.excludes_zero(same["ci95"])
    apart = stats.welch([50.0, 51.0, 50.5], [60.0, 61.0, 60.5])
    assert apart["difference"] == pytest.approx(10.0) and stats.excludes_zero(apart["ci95"])
    assert stats.welch([50.0], [60.0, 61.0]) is None  # one seed says nothing about seed noise
    spread = stats.seed_spread([1.0, 3.0])
    assert spread["sd"] == pytest.approx(math.sqrt(2)) and spread["mean"] == 2.0
    assert spread["mean_ci95_half"] == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2), rel=1e-3)


def test_a_run_that_predicts_one_label_is_called_degenerate_in_its_report(tiny, tokenizer, tmp_path):
    """Every prediction the train split's majority class: report.md says the run is degenerate, for both reasons
    (constant predictions, accuracy no better than the majority-class baseline's); a perfect model's report does
    not."""
    from evaluators.classification import Classification
    from runner.evaluate.metrics import DECLARED, declared_by

    recipe = recipes.load(TINY / "agnews_tiny.yaml", ["data.test_samples=40",
                                                         "evaluation.evaluators=[{name: classification}]"])
    train = baselines.train_references(recipe)
    majority = max(set(train), key=train.count)
    texts = {}
    for name, predict in (("constant", lambda ref: majority), ("perfect", lambda ref: ref)):
        records = evaluated(recipe, tokenizer, predict)
        evaluator = Classification(confusion_matrix=False)
        metrics = {"split": "test", "examples": len(records), "classification": evaluator.evaluate(records, tmp_path),
                   DECLARED: declared_by([("classification", evaluator)])}
        write_run(tmp_path / name, records, metrics)
        texts[name] = report.write(tmp_path / name, recipe).read_text()
    section = texts["constant"][texts["constant"].index("## Baselines"):]
    accuracy = json.loads((tmp_path / "constant" / "metrics.json").read_text())["classification"]["accuracy"]
    assert (f"**Degenerate run**: all 40 predictions are the same: `{majority}`; classification.accuracy "
            f"{accuracy:.4g} is no better than the majority class baseline's {accuracy:.4g}") in section
    assert "Degenerate" not in texts["perfect"]
