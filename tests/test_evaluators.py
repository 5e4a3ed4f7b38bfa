"""Evaluators: ROUGE against rouge-score itself, the loss against the model's own loss, and a
user's evaluator named as package.module:ClassName, checked at validation and run by `runner eval`."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest

from evaluators.base import Record
from evaluators.loss import Loss
from evaluators.rouge import Rouge
from runner.cli import recipes
from runner.evaluate import evaluate as evaluate_mod
from tests.conftest import ROOT
from tests.test_errors import assert_user_error, write_recipe


def records(pairs) -> list[Record]:
    return [Record(index=i, prompt=f"p{i}", reference=ref, prediction=pred) for i, (ref, pred) in enumerate(pairs)]


# ---------------------------------------------------------------- rouge


def test_rouge_matches_rouge_score_and_a_hand_computed_value(tmp_path):
    from rouge_score import rouge_scorer

    pairs = [("the cat sat on the mat", "the cat sat"), ("Storms close five schools in Riverton.",
                                                          "Storms closed schools in Riverton."),
             ("United beat City by two goals.", "City beat United by two goals.")]
    out = Rouge(seed=1).evaluate(records(pairs), tmp_path)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for kind in ("rouge1", "rouge2", "rougeL"):
        direct = np.mean([scorer.score(ref, pred)[kind].fmeasure * 100 for ref, pred in pairs])
        assert out[kind]["f1"] == pytest.approx(direct, abs=1e-3)
    # "the cat sat" vs "the cat sat on the mat": precision 3/3, recall 3/6 -> F1 2/3.
    single = Rouge(seed=1).evaluate(records(pairs[:1]), tmp_path)
    assert single["rouge1"]["f1"] == pytest.approx(66.6667, abs=1e-3)
    assert single["rouge1"]["ci95"] == [pytest.approx(66.6667, abs=1e-3)] * 2  # one example: nothing to resample


def test_rouge_lsum_scores_sentence_by_sentence():
    """rougeLsum takes the LCS per reference sentence (newline-split), so swapped sentences keep their credit."""
    pair = [("Two people were hurt. The road is closed.", "The road is closed. Two people were hurt.")]
    scores = Rouge(seed=0).per_example(records(pair))
    assert scores["rougeLsum"][0] == pytest.approx(100.0)
    assert scores["rougeL"][0] < 80


def test_rouge_scores_real_summaries_as_rouge_score_does_stemming_each_word_once(shared_data, monkeypatch):
    """Every score bit for bit rouge-score's own (its default tokenizer and Porter stemmer), on XSum's real summaries
    against article sentences, while each distinct word is stemmed once: stemming was most of ROUGE's time (a
    full test split's 11,334 predictions: 9.9 s -> 3.9 s on a 2-core AMD EPYC)."""
    from nltk.stem import porter
    from rouge_score import rouge_scorer

    from evaluators.rouge import sentences_on_lines

    rows = [json.loads(line) for line in (shared_data / "xsum" / "sample.jsonl").read_text().splitlines()[:300]]
    pairs = [(r["summary"], ". ".join(r["document"].split(". ")[:2])) for r in rows]
    kinds = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    expected = {k: [] for k in kinds}
    for ref, pred in pairs:
        result = scorer.score(sentences_on_lines(ref), sentences_on_lines(pred))
        for k in kinds:
            expected[k].append(result[k].fmeasure * 100)
    stemmed = []
    original = porter.PorterStemmer.stem
    monkeypatch.setattr(porter.PorterStemmer, "stem", lambda self, word, *a, **kw: (stemmed.append(word),
                                                                                     original(self, word, *a, **kw))[1])
    scores = Rouge(seed=0).per_example(records(pairs))
    for k in kinds:
        assert np.array_equal(scores[k], np.asarray(expected[k])), k
    assert stemmed and len(stemmed) == len(set(stemmed))  # each word once, though many repeat across examples


# ---------------------------------------------------------------- loss


@pytest.fixture(scope="module")
def untrained(tiny):
    """The tiny base model (NF4), its tokenizer and recipe."""
    import torch

    from runner.model import model as model_mod

    torch.set_num_threads(2)
    recipe = recipes.load(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml")
    return recipe, model_mod.load_tokenizer(recipe), model_mod.load_trained(recipe, None)


def test_loss_is_the_models_own_completion_loss(untrained, tmp_path):
    """Token-weighted cross-entropy over completion + EOS, each example run alone (no padding) as a direct check."""
    import torch

    recipe, tokenizer, net = untrained
    examples = {"prompt": ["Article: Riverton police said two people were hurt.\nSummary:", "Summary:",
                           "Instruction: Summarize.\nArticle: Norcom will cut jobs in Ashford.\nSummary:"],
                "completion": [" Two hurt in Riverton.", " United beat Rovers by three goals.", " Norcom cuts jobs."]}
    losses, counts = [], []
    for prompt, completion in zip(examples["prompt"], examples["completion"]):
        ids = tokenizer(prompt + completion + tokenizer.eos_token, return_tensors="pt")["input_ids"]
        labels = ids.clone()
        labels[0, : len(tokenizer(prompt)["input_ids"])] = -100
        with torch.inference_mode():
            losses.append(net(input_ids=ids, labels=labels).loss.item())
        counts.append(int((labels[0, 1:] != -100).sum()))
    expected = sum(loss * c for loss, c in zip(losses, counts)) / sum(counts)
    results = []
    for batch_size in (1, 3):  # padding must not change anything
        # The runner scores the references (it holds the model); the evaluator averages what the records carry.
        records = evaluate_mod.scored_records(recipe, net, tokenizer, examples, batch_size)
        assert [r.tokens for r in records] == counts and all(r.id is None for r in records)
        results.append(Loss(seed=recipe["seed"], batch_size=batch_size).evaluate(records, tmp_path))
    for out in results:
        assert out["loss"] == pytest.approx(expected, abs=1e-4)
        assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
        assert out["tokens"] == sum(counts) and out["examples"] == 3
        assert out["loss_ci95"][0] <= out["loss"] <= out["loss_ci95"][1]
    assert not net.training


# ---------------------------------------------------------------- what every built-in declares


LABELED = [("World", "World"), ("Sports", "World"), ("Business", "nonsense")]


@pytest.mark.parametrize(("name", "params", "pairs"), [
    ("rouge", {}, [("the cat sat on the mat", "the cat sat"), ("a b", "c d")]),
    ("rouge", {"types": ["rougeL"]}, [("the cat sat on the mat", "the cat sat")]),
    ("classification", {"labels": ["World", "Sports", "Business"]}, LABELED),
    ("multilabel", {}, [("joy, anger", "joy"), ("fear", "fear, joy, odd")]),
    ("loss", {}, [("a", ""), ("b", "")]),
    ("samples", {}, LABELED),
])
def test_builtins_declare_the_metrics_they_return(tmp_path, name, params, pairs):
    """`metrics` (what `runner sweep --metric` is checked against before training, with each metric's direction and
    scale) is what evaluate returns; every other number it returns describes the evaluation, not the model."""
    from evaluators import builtin
    from evaluators.base import declaration_problem
    from runner.evaluate.metrics import declared_by, headline

    evaluator = builtin(name)(seed=1, **params)
    assert declaration_problem(builtin(name)) is None and declaration_problem(evaluator) is None
    given = [Record(index=r.index, prompt=r.prompt, reference=r.reference, prediction=r.prediction, logprob=-2.0,
                    tokens=3) for r in records(pairs)]
    out = evaluator.evaluate(given, tmp_path)
    declared = [f"{name}.{m.name}" for m in evaluator.metrics if "." not in m.name]
    returned = headline({name: out}, declared_by([(name, evaluator)]))
    assert sorted(returned) == sorted(declared)
    every_number = headline({name: out}, declared={})  # as if it declared nothing
    assert set(every_number) - set(declared) <= {f"{name}.{k}" for k in ("examples", "tokens", "count",
                                                                         "labels_scored")}
    headline_metric = declared_by([(name, evaluator)])[name]["headline"]
    assert headline_metric is None if not declared else f"{name}.{headline_metric}" in declared


# ---------------------------------------------------------------- a user's own evaluator

USER_EVALUATOR = '''
from evaluators.base import Evaluator


class LengthRatio(Evaluator):
    """Mean prediction length over reference length, in words."""

    name = "length_ratio"
    params_schema = {"properties": {"cap": {"type": "number", "exclusiveMinimum": 0, "default": 3.0}}}

    def __init__(self, cap=3.0, **kw):
        super().__init__(**kw)
        self.cap = cap

    def evaluate(self, records, out_dir):
        ratios = [min(len(r.prediction.split()) / max(len(r.reference.split()), 1), self.cap) for r in records]
        return {"ratio": sum(ratios) / len(ratios), "cap": self.cap}
'''


@pytest.fixture
def user_package(tmp_path):
    package = tmp_path / "myevals"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "length.py").write_text(textwrap.dedent(USER_EVALUATOR))
    return tmp_path


def _with_user_evaluator(spec: dict):
    def edit(recipe):
        recipe["evaluation"]["evaluators"] = [{"name": "myevals.length:LengthRatio", **spec}, {"name": "loss"}]
    return edit


def test_user_evaluator_parameters_are_checked_at_validation(user_package, tiny, cli):
    good = write_recipe(user_package, tiny, _with_user_evaluator({"cap": 2}))
    result = cli("validate", good, "--print", cwd=user_package)
    assert result.returncode == 0, result.stderr
    assert "cap: 2" in result.stdout
    bad = write_recipe(user_package, tiny, _with_user_evaluator({"cpa": 2}))
    assert_user_error(cli("validate", bad, cwd=user_package), "evaluation.evaluators[0].cpa", "did you mean 'cap'")
    bad = write_recipe(user_package, tiny, _with_user_evaluator({"cap": -1}))
    assert_user_error(cli("validate", bad, cwd=user_package), "evaluation.evaluators[0].cap", "out of range")
    missing = write_recipe(user_package, tiny, lambda r: r["evaluation"].update(
        evaluators=[{"name": "myevals.nothere:LengthRatio"}]))
    assert_user_error(cli("validate", missing, cwd=user_package), "evaluation.evaluators[0].name", "cannot import")


def test_user_evaluator_default_is_filled_and_it_runs(user_package, tiny, monkeypatch):
    monkeypatch.chdir(user_package)
    monkeypatch.syspath_prepend(str(user_package))
    recipe = recipes.load(write_recipe(user_package, tiny, _with_user_evaluator({})))
    assert recipe["evaluation"]["evaluators"][0]["cap"] == 3.0
    (name, evaluator), _ = evaluate_mod.build_evaluators(recipe)
    out = evaluator.evaluate(records([("a b c d", "a b"), ("a b", "a b c d e f g h")]), user_package)
    assert out == {"ratio": pytest.approx((0.5 + 3.0) / 2), "cap": 3.0}
    assert evaluate_mod.metric_names(recipe) is None  # it declares no metrics: sweep --metric waits for the runs


@pytest.mark.slow
def test_eval_runs_a_user_evaluator_and_the_loss(user_package, tiny, cli):
    """`runner eval --base` from the user's folder: their evaluator and the built-in loss land in metrics.json."""
    path = write_recipe(user_package, tiny, _with_user_evaluator({"cap": 2}))
    result = cli("eval", path, "--base", "data.test_samples=8", "data.eval_samples=8", cwd=user_package)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(next((user_package / "runs").rglob("metrics.json")).read_text())
    assert metrics["examples"] == 8 and metrics["myevals.length:LengthRatio"]["cap"] == 2
    assert 0 <= metrics["myevals.length:LengthRatio"]["ratio"] <= 2
    assert metrics["loss"]["split"] == "eval" and metrics["loss"]["examples"] == 8
    assert metrics["loss"]["perplexity"] == pytest.approx(math.exp(metrics["loss"]["loss"]), rel=1e-3)
    # An untrained model is about as unsure as a uniform guess over the vocabulary (2048 tokens).
    assert 100 < metrics["loss"]["perplexity"] < 20000
    assert "loss" in result.stdout and "perplexity" in result.stdout


@pytest.mark.slow
def test_a_user_evaluator_that_raises_is_named_not_the_runner(user_package, tiny, cli):
    """Its exception is one line naming its recipe key and class, exit 1; the run gets no report.md."""
    (user_package / "myevals" / "boom.py").write_text(textwrap.dedent('''
        from evaluators.base import Evaluator

        class Boom(Evaluator):
            def evaluate(self, records, out_dir):
                return self.explode()

            def explode(self):
                raise RuntimeError("kaboom")
    '''))
    path = write_recipe(user_package, tiny)
    result = cli("train", path, "evaluation.evaluators[1]={name: myevals.boom:Boom}", "training.max_steps=1",
                 "data.test_samples=4", cwd=user_package)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == ("error: evaluation.evaluators[1] (myevals.boom:Boom): "
                                                      "RuntimeError: kaboom (a bug in that evaluator; RUNNER_DEBUG=1 "
                                                      "shows the traceback)")
    assert "Traceback" not in result.stderr
    assert list((user_package / "runs").rglob("adapter_config.json"))  # trained; the evaluation failed
    assert not list((user_package / "runs").rglob("report.md"))


# ---------------------------------------------------------------- declarations


def test_a_malformed_declaration_is_one_line_naming_its_evaluator(tiny, cli):
    agnews = ROOT / "recipes" / "tiny" / "agnews_tiny.yaml"
    result = cli("validate", agnews, "evaluation.evaluators=[{name: classification}, {name: 'tests.userevals:Malformed'}]")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: evaluation.evaluators[1]: tests.userevals:Malformed's metric declaration is malformed: metrics holds "
        "'score', not a Metric (e.g. Metric('score', better='higher', scale='fraction')) (declare metrics = "
        "(Metric(name, better='higher' or 'lower', scale=...), ...) as evaluators.base.Evaluator describes)")


ACCURACY = ("accuracy", "higher", "fraction")


@pytest.mark.parametrize(("metrics", "extra", "problem"), [
    ((("accuracy", "higher"),), {}, "holds ('accuracy', 'higher'), not a Metric"),
    ("accuracy", {}, "metrics is a str, not a tuple of Metric"),
    ((("accuracy", "up", "fraction"),), {}, "better is 'up', not 'higher' or 'lower'"),
    ((("accuracy", "higher", "percentage"),), {}, "scale is 'percentage', not one of fraction, percent, count, unbounded"),
    ((ACCURACY, ACCURACY), {}, "metric 'accuracy' is declared twice"),
    ((ACCURACY,), {"headline": "f1"}, "headline 'f1' is not one of its top-level metrics (accuracy)"),
    ((ACCURACY,), {"baselines": ("lead_2",)}, "baselines is ('lead_2',), not a tuple of majority_class"),
    ((ACCURACY,), {"baselines": ("label_set",)}, "the label_set baseline needs a gold_names(references) method"),
])
def test_declaration_problems_are_named(metrics, extra, problem):
    """What is wrong, in the sentence the error line shows; Metric fields given as tuples here become Metrics."""
    from evaluators.base import Evaluator, Metric, declaration_problem

    if isinstance(metrics, tuple) and all(len(m) == 3 for m in metrics):
        metrics = tuple(Metric(*m) for m in metrics)
    assert problem in declaration_problem(type("Mine", (Evaluator,), {"metrics": metrics, **extra}))
    fine = {"metrics": (Metric(*ACCURACY), Metric("per_class.*.f1", "higher", "fraction")), "headline": "accuracy"}
    assert declaration_problem(type("Fine", (Evaluator,), fine)) is None
    assert declaration_problem(Evaluator) is None  # declares nothing: the documented default
