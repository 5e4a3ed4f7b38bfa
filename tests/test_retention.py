"""General ability before and after fine-tuning (evaluation.retention): the multiple_choice evaluator, benchmarks
read from files and scored by rank mode's packed pass, the base's cached scores, the paired verdict, and the tiny
demonstration of forgetting (tests/forgetting.py: a pre-trained base, a fine-tune that overwrites part of what it
knew) through the real `runner train` and `runner compare`; task metrics while training (training.task_metrics)
ride on the same run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from evaluators.base import Record
from evaluators.multiple_choice import MultipleChoice
from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.evaluate import benchmark, retention
from tests.conftest import ROOT, ahead, run_cli, run_folder, run_python

TINY = ROOT / "recipes" / "tiny" / "agnews_tiny.yaml"


def _spec(source, **over) -> dict:
    spec = {"name": "B", "source": str(source), "subset": None, "split": "test", "question": "question",
            "choices": "choices", "answer": "answer", "subject": None, "template": "Question: {question}\nAnswer:",
            "answers": "text", "max_items": None, "lm_eval": None}
    return {**spec, **over}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the evaluator


def test_multiple_choice_accuracy_with_its_ci_and_per_subject():
    records = [Record(i, "q", "a", "a" if i % 4 else "b", group="x" if i < 8 else "y") for i in range(16)]
    out = MultipleChoice(seed=1).evaluate(records, Path("."))
    assert out["accuracy"] == 0.75 and out["n"] == 16
    assert out["ci95"][0] < 0.75 < out["ci95"][1]
    assert out["per_subject"]["x"] == {"accuracy": 0.75, "ci95": out["per_subject"]["x"]["ci95"], "n": 8}
    assert list(MultipleChoice().per_example(records[:2])["accuracy"]) == [0.0, 1.0]
    assert "per_subject" not in MultipleChoice().evaluate([Record(0, "q", "a", "a")], Path("."))


# ---------------------------------------------------------------- reading benchmarks


def test_items_from_jsonl_csv_and_parquet_with_answers_as_index_letter_or_text(tmp_path):
    rows = [{"question": "q0", "choices": ["a", "b", "c"], "answer": 2, "subject": "s"},
            {"question": "q1", "choices": ["a", "b", "c"], "answer": "B", "subject": "s"},
            {"question": "q2", "choices": ["a", "b", "c"], "answer": "a", "subject": "t"}]
    items = benchmark.load(_spec(_jsonl(tmp_path / "b.jsonl", rows), subject="subject"), 0)
    assert [it.answer for it in items] == [2, 1, 0] and [it.subject for it in items] == ["s", "s", "t"]
    (tmp_path / "b.csv").write_text("question,A,B,C,answer\nq0,x,y,z,C\nq1,x,y,z,0\n", encoding="utf-8")
    items = benchmark.load(_spec(tmp_path / "b.csv", choices=["A", "B", "C"]), 0)
    assert [(it.choices, it.answer) for it in items] == [(("x", "y", "z"), 2), (("x", "y", "z"), 0)]
    import pandas as pd

    pd.DataFrame([{**r, "answer": str(r["answer"])} for r in rows]).to_parquet(tmp_path / "b.parquet")
    assert [it.answer for it in benchmark.load(_spec(tmp_path / "b.parquet"), 0)] == [2, 1, 0]
    picked = benchmark.load(_spec(tmp_path / "b.parquet", max_items=2), 0)
    assert len(picked) == 2 and picked == benchmark.load(_spec(tmp_path / "b.parquet", max_items=2), 0)


def test_a_bad_benchmark_is_one_error_at_its_key(tmp_path):
    path = _jsonl(tmp_path / "b.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "E"}])
    with pytest.raises(RecipeError) as err:
        benchmark.load(_spec(path), 3)
    assert err.value.key_path == "evaluation.retention[3].answer" and "'E'" in err.value.problem
    with pytest.raises(RecipeError) as err:
        benchmark.load(_spec(path, question="prompt"), 0)
    assert err.value.key_path == "evaluation.retention[0]" and "'prompt'" in err.value.problem


def test_the_recipe_names_a_source_and_a_template_of_known_fields(tmp_path):
    path = _jsonl(tmp_path / "b.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    recipe = recipes.load(TINY, [f"evaluation.retention=[{{name: B, source: {path}, template: 'Q: {{question}} "
                                 "{choices}'}]"])
    assert recipe["evaluation"]["retention"][0]["answers"] == "text"
    with pytest.raises(RecipeError) as err:
        recipes.load(TINY, [f"evaluation.retention=[{{name: B, source: {path}, template: 'Q: {{query}}'}}]"])
    assert err.value.key_path == "evaluation.retention[0].template"
    with pytest.raises(RecipeError) as err:
        recipes.load(TINY, ["evaluation.retention=[{name: B}]"])
    assert err.value.key_path == "evaluation.retention[0].source"
    with pytest.raises(RecipeError) as err:
        recipes.load(TINY, [f"evaluation.retention=[{{name: B, source: {path}}}]", "lora=null",
                            "quantization.method=none"])
    assert err.value.key_path == "evaluation.retention" and "lora: null" in err.value.problem


def test_task_metrics_need_an_eval_split_and_no_fsdp(tiny):
    from types import SimpleNamespace

    from runner.train import live_eval

    with pytest.raises(RecipeError) as err:
        recipes.load(TINY, ["training.task_metrics=8", "data.splits.eval=null", "training.eval_every=null"])
    assert err.value.key_path == "training.task_metrics"
    recipe = recipes.load(TINY, ["training.task_metrics=8"])
    live_eval.check_launch(recipe, SimpleNamespace(distributed="ddp"))
    with pytest.raises(RecipeError) as err:
        live_eval.check_launch(recipe, SimpleNamespace(distributed="fsdp"))
    assert err.value.key_path == "training.task_metrics"


def test_an_unreachable_hub_benchmark_stops_the_run_before_it_trains(tiny, tmp_path):
    result = run_cli("train", TINY, f"output_dir={tmp_path}",
                     "evaluation.retention=[{name: MMLU, source: cais/mmlu, subset: all}]")
    assert result.returncode == 1 and "adapter saved" not in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: evaluation.retention[0].source: cannot reach the Hugging Face hub for 'cais/mmlu'")
    assert not list(tmp_path.rglob("env.json"))


def test_the_lm_eval_bridge_without_lm_eval_is_one_error_line(tiny, tmp_path):
    pytest.importorskip("pytest")  # the bridge is optional: this checks the message where lm_eval is absent
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed here")
    result = run_cli("validate", TINY, "evaluation.retention=[{name: MMLU, lm_eval: mmlu}]")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: evaluation.retention[0].lm_eval: the lm-evaluation-harness (lm_eval) is not installed (pip install "
        "lm-eval, or give the benchmark a source file instead)"]


# ---------------------------------------------------------------- the verdict


@pytest.mark.parametrize("ci, words", [([-0.031, -0.005], "\u22123.1, \u22120.5]: forgetting resolved"),
                                       ([-0.02, 0.01], "\u22122.0, +1.0]: within noise at n = 500"),
                                       ([0.005, 0.03], "+0.5, +3.0]: gain resolved")])
def test_the_verdict_says_whether_the_difference_is_resolved(ci, words):
    text = retention.verdict("MMLU", {"difference": -0.018, "difference_ci95": ci}, 500)
    assert text == "MMLU \u22121.8 [" + words


def test_the_report_section_lists_subjects_largest_drop_first():
    base = [Record(i, "q", "a", "a", group="law" if i < 6 else "art") for i in range(12)]
    adapter = [Record(i, "q", "a", "b" if i < 4 else "a", group=b.group) for i, b in enumerate(base)]
    per = retention._per_subject(list(zip(base, adapter)), MultipleChoice(), 0)
    assert per["law"]["difference"] == pytest.approx(-4 / 6, abs=1e-4) and per["art"]["difference"] == 0
    result = {"benchmarks": [{"name": "MMLU", "n": 12, "base": {"accuracy": 1.0}, "adapter": {"accuracy": 2 / 3},
                              "verdict": "MMLU \u221233.3 [...]", "per_subject": per}]}
    lines = retention.section(result)
    assert lines[0] == "## General ability" and "| MMLU | 12 | 100.0 | 66.7 | MMLU \u221233.3 [...] |" in lines
    subjects = [line.split(" | ")[0] for line in lines if line.startswith(("| law", "| art"))]
    assert subjects == ["| law", "| art"]
    assert retention.summary_lines(result) == ["general ability: MMLU \u221233.3 [...]"]


# ---------------------------------------------------------------- the base's cache


class _Peft:
    """Stands in for a PeftModel: counts the times the base (adapter disabled) is scored."""

    def __init__(self):
        self.disabled = 0

    def disable_adapter(self):
        import contextlib

        self.disabled += 1
        return contextlib.nullcontext()


def test_the_base_is_scored_once_per_base_model_benchmark_and_settings(tmp_path, monkeypatch):
    model_dir = tmp_path / "base"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    path = _jsonl(tmp_path / "b.jsonl", [{"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2}
                                         for i in range(4)])
    recipe = {"model": {"name_or_path": str(model_dir), "dtype": "auto"}, "quantization": {"method": None}}
    spec = _spec(path)
    items = benchmark.load(spec, 0)
    monkeypatch.setattr(retention, "_score", lambda m, t, r, s, its: benchmark.records(its, [0] * len(its)))
    cache, model = tmp_path / "cache", _Peft()
    first, hit = retention.base_records(recipe, spec, items, model, None, cache)
    assert not hit and model.disabled == 1
    again, hit = retention.base_records(recipe, spec, items, model, None, cache)
    assert hit and model.disabled == 1 and again == first  # the same records, from the cache
    # Another template, other items, another quantization, a re-trained base: each scores the base again.
    for changed in ({**spec, "template": "Q: {question}\nA:"}, spec):
        retention.base_records(recipe, changed, items[:3] if changed is spec else items, model, None, cache)
    retention.base_records({**recipe, "quantization": {"method": "bnb_4bit"}}, spec, items, model, None, cache)
    assert model.disabled == 4
    stat = (model_dir / "model.safetensors").stat()
    os.utime(model_dir / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _, hit = retention.base_records(recipe, spec, items, model, None, cache)
    assert not hit and model.disabled == 5


# ---------------------------------------------------------------- scoring


def test_the_packed_pass_chooses_as_one_row_per_choice_does(tiny, tokenizer, tmp_path):
    """Items of 2, 3 and 4 choices: the batched backend (each prompt once, choices packed) picks what scoring every
    choice on its own row picks."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner.evaluate import rank

    model = AutoModelForCausalLM.from_pretrained(tiny / "phi", dtype=torch.float32, attn_implementation="sdpa")
    words = ["United", "Rovers", "City", "Town", "Albion"]
    rows = [{"question": f"Which team plays in {town}?", "choices": words[: 2 + i % 3], "answer": 0}
            for i, town in enumerate(["Riverton", "Lakeside", "Ashford", "Milltown", "Northgate", "Eastwood"])]
    spec = _spec(_jsonl(tmp_path / "b.jsonl", rows))
    items = benchmark.load(spec, 0)
    recipe = recipes.load(TINY, ["generation.backend=batched", "generation.batch_size=4"])
    packed = benchmark.chosen(model, tokenizer, recipe, spec, items)
    alone = []
    for it in items:
        pairs = rank.tokenize_pairs(tokenizer, [benchmark.prompt(spec, it)] * len(it.choices),
                                    benchmark.candidates(spec, it), end="")
        alone.append(int(rank.score_rows(model, tokenizer, pairs).argmax()))
    assert packed == alone
    plain = recipes.load(TINY, ["generation.backend=plain", "generation.batch_size=4"])
    assert benchmark.chosen(model, tokenizer, plain, spec, items) == alone


# ---------------------------------------------------------------- the tiny demonstration


@ahead("forgetting")
def _forgetting(out: Path, lane) -> dict:
    """The base pre-trained on made-up facts, the fine-tune that overwrites half of one set, then `runner compare`."""
    made = run_python(["-m", "tests.forgetting", str(out)], ROOT, _env(), lane=lane)
    assert made.returncode == 0, made.stderr[-3000:]
    recipe = Path(made.stdout.strip().splitlines()[-1])
    trained = run_cli("train", recipe, lane=lane)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    compared = run_cli("compare", recipe, "--run", run_folder(trained.stdout), lane=lane)
    return {"recipe": recipe, "train": trained, "compare": compared}


def _env() -> dict:
    from tests.conftest import cli_env

    return cli_env()


def test_the_report_resolves_the_forgetting_and_compare_reuses_the_base(background):
    _, result = background("forgetting")
    run = run_folder(result["train"].stdout)
    general = json.loads((run / "retention.json").read_text())["benchmarks"]
    teams, companies = general
    assert teams["name"] == "Teams" and teams["n"] == 48 and not teams["base_cached"]
    assert teams["base"]["accuracy"] >= 0.9, teams  # the pre-trained base knows its facts
    assert teams["paired"]["difference_ci95"][1] < 0 and teams["verdict"].endswith("forgetting resolved")
    assert companies["n"] == 30 and "within noise at n = 30" in companies["verdict"]
    report = (run / "report.md").read_text()
    assert "## General ability" in report and teams["verdict"] in report and companies["verdict"] in report
    assert "Teams by subject" in report or teams["per_subject"] == {}
    compared = result["compare"]
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert f"general ability: {teams['verdict']}" in compared.stdout
    assert "cached" in compared.stdout.split("general ability: Teams")[1].splitlines()[0]
    summary = json.loads(next(run.rglob("comparison.json")).read_text())
    assert [b["base_cached"] for b in summary["retention"]["benchmarks"]] == [True, True]
    assert [b["base"] for b in summary["retention"]["benchmarks"]] == [teams["base"], companies["base"]]


def test_task_metrics_are_logged_timed_plotted_and_decide_the_best_checkpoint(background):
    _, result = background("forgetting")
    run = run_folder(result["train"].stdout)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    accuracy = [(r["step"], r["eval_classification.accuracy"]) for r in log if "eval_classification.accuracy" in r]
    assert [step for step, _ in accuracy] == [20, 40]
    assert all(0 <= v <= 1 for _, v in accuracy)
    env = json.loads((run / "env.json").read_text())
    assert env["task_metrics"]["evaluations"] == 2 and env["task_metrics"]["examples"] == 8
    assert env["task_metrics"]["backend"] == "batched" and env["task_metrics"]["seconds"] > 0
    best = env["early_stopping"]
    assert best["metric"] == "classification.accuracy" and best["better"] == "higher"
    assert best["best_value"] == max(v for _, v in accuracy)
    report = (run / "report.md").read_text()
    assert "task metrics while training" in report and (run / "report" / "task_metrics.png").is_file()
    assert np.isfinite(env["task_metrics"]["seconds"])
