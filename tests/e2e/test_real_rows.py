"""The study's four recipes run, unchanged, on real rows (../shared/data/<task>/sample.jsonl) through the real CLI.

Only overrides differ from the recipe files: data.source points at the sample (with data.holdout carving eval and
test rows out of it, since it is one file), model.name_or_path at a tiny random Phi built with GPT-2's tokenizer
(Phi-2's vocabulary), and sizes shrink so each run takes seconds. Real text brings what templated data does not:
long documents that must be truncated, label strings with punctuation, lists of labels, HTML escapes, emoji.
Skipped when ../shared/data is absent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from runner.cli import recipes
from tests.conftest import ROOT, SHARED_DATA, ahead, cli_env, run_cli, run_python

RECIPES = {"xsum_phi2": "xsum", "agnews_phi2": "agnews", "goemotions_phi2": "goemotions", "mnli_phi2": "mnli"}
TEST_ROWS = 8
SMALL = ["data.holdout.eval=4", f"data.holdout.test={TEST_ROWS}", "data.train_samples=32", "data.eval_samples=4",
         f"data.test_samples={TEST_ROWS}", "training.max_steps=1", "training.gradient_accumulation_steps=1",
         "generation.max_new_tokens=12"]


def build_gpt2_phi(folder: Path, shared_data: Path) -> Path:
    """A tiny random-init Phi with GPT-2's tokenizer, saved like a hub model."""
    from transformers import AutoTokenizer

    from runner.model.tiny import build_model

    return build_model(folder, AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2"))


@ahead("real rows")
def _train_on_real_rows(out: Path, lane):
    """Each recipe trained on its sample: {name: the `runner train` result}; nothing without ../shared/data."""
    if not SHARED_DATA.is_dir():
        return {}
    built = run_python([__file__, str(out / "gpt2-phi"), str(SHARED_DATA)], ROOT, cli_env(), lane=lane)
    assert built.returncode == 0, built.stderr[-4000:]
    return {name: run_cli("train", ROOT / "recipes" / f"{name}.yaml", f"data.source={SHARED_DATA / task / 'sample.jsonl'}",
                          f"model.name_or_path={out / 'gpt2-phi'}", f"output_dir={out / name}", *SMALL, lane=lane)
            for name, task in RECIPES.items()}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_runs_on_real_rows(name, shared_data, background):
    sample = shared_data / RECIPES[name] / "sample.jsonl"
    recipe_path = ROOT / "recipes" / f"{name}.yaml"
    result = background("real rows")[1][name]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run_dir = Path(next(line for line in result.stdout.splitlines() if line.startswith("done: "))[6:])
    recipe = recipes.load(recipe_path)
    env = json.loads((run_dir / "env.json").read_text())
    assert env["data"]["train"]["kept"] == 32 and env["data"]["eval"]["kept"] == 4
    assert env["data"]["test"]["kept"] == TEST_ROWS and env["global_step"] == 1
    predictions = rows(run_dir / "predictions.jsonl")
    assert len(predictions) == TEST_ROWS
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluator = recipe["evaluation"]["evaluators"][0]
    assert metrics["examples"] == TEST_ROWS and evaluator["name"] in metrics
    stats = json.loads((run_dir / "report" / "inspect.json").read_text())["splits"]
    assert stats["train"]["rows"] == 32
    text = (run_dir / "report.md").read_text()
    assert "## Metrics" in text and "## Samples" in text
    if name == "xsum_phi2":
        # Real articles run past 512 tokens: the document is cut to fit, never the summary, and nothing is lost.
        assert stats["train"]["over_max_length"] > 0 and env["data"]["train"]["truncated"] > 0
        assert env["data"]["train"]["dropped_too_long"] == 0
        assert stats["train"]["lengths"]["example"]["max"] > 512
        references = {r["summary"].strip() for r in rows(sample)}
        assert all(p["reference"] in references for p in predictions)
    else:
        labels = set(evaluator["labels"])
        # The real label strings are the recipe's label names (Sci/Tech, multi-label lists, ...).
        assert set(stats["train"]["labels"]) <= labels
        for p in predictions:
            names = [n.strip() for n in p["reference"].split(",")] if name == "goemotions_phi2" else [p["reference"]]
            assert set(names) <= labels, p["reference"]
        assert "classification" in metrics or "multilabel" in metrics


if __name__ == "__main__":  # run by the job above, in a process of its own: python test_real_rows.py FOLDER DATA
    build_gpt2_phi(Path(sys.argv[1]), Path(sys.argv[2]))
