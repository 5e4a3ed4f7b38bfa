"""report.md for every run: the tiny AG News twin's run through `runner train` leaves a report with every section,
and every image it shows exists and is a valid PNG."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from runner.report import report
from tests.conftest import ROOT

pytestmark = pytest.mark.twins("agnews_tiny")  # the twin `trained` gives this module's tests (docs/testing.md)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECIPE = ROOT / "recipes" / "tiny" / "agnews_tiny.yaml"
SECTIONS = ["# Report: agnews_tiny", "## Recipe", "## Data", "## Training", "## Metrics", "## Samples"]


def images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def assert_png(path: Path):
    import matplotlib.image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


@pytest.fixture(scope="module")
def run_dir(trained):
    line = next(line for line in trained("agnews_tiny").stdout.splitlines() if line.startswith("report: "))
    path = Path(line.removeprefix("report: "))
    assert path.name == "report.md"
    return path.parent


def test_report_has_every_section_in_order(run_dir):
    text = (run_dir / "report.md").read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["prompt"]["template"] in text
    env = json.loads((run_dir / "env.json").read_text())
    assert f"{env['trainable']:,} of {env['total']:,}" in text  # trainable parameters
    assert f"{env['train_seconds']:.1f} s" in text and "peak process memory (RSS)" in text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    accuracy = metrics["classification"]["accuracy"]
    assert re.search(rf"\| classification \| accuracy \| {accuracy:.4g} \| \[", text)
    assert "| class | precision | recall | f1 | support |" in text
    data = text[text.index("## Data"):text.index("## Training")]
    assert "**train** (2000 rows" in data and "| `{text}` |" in data and "Labels: " in data
    samples = text[text.index("## Samples"):]
    first = json.loads((run_dir / "predictions.jsonl").read_text().splitlines()[0])
    assert f"| {first['reference']} |" in samples


def test_every_image_exists_and_is_a_png(run_dir):
    text = (run_dir / "report.md").read_text()
    shown = images(text)
    expected = {"report/loss.png", "confusion_matrix.png", "report/lengths_train.png", "report/lengths_eval.png",
                "report/lengths_test.png"}
    assert expected <= set(shown)
    for rel in shown:
        assert_png(run_dir / rel)
    stats = json.loads((run_dir / "report" / "inspect.json").read_text())
    assert stats["splits"]["test"]["rows"] == yaml.safe_load(RECIPE.read_text())["data"]["test_samples"]


def test_loss_curve_has_train_and_eval_points(run_dir):
    training = yaml.safe_load(RECIPE.read_text())["training"]
    train, evals = report.loss_points(report.read_log(run_dir))
    every, steps = training["eval_every"], training["max_steps"]
    assert len(train) >= 3 and [step for step, _ in evals] == list(range(every, steps + 1, every))


def test_a_run_without_evaluation_still_gets_a_report(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("adapter", "checkpoints"))
    for name in ("metrics.json", "predictions.jsonl", "samples.md", "confusion_matrix.png", "report.md"):
        (copy / name).unlink(missing_ok=True)
    with open(copy / "train_log.jsonl", "a") as f:
        f.write('{"step": 999, "lo')  # an interrupted run's torn last line
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    path = report.write(copy, recipe)  # no tokenizer: no data statistics, the rest from the folder
    text = path.read_text()
    assert all(s in text for s in SECTIONS)
    assert "Not evaluated" in text and "No predictions" in text and "Data statistics were not computed" in text
    for rel in images(text):
        assert_png(copy / rel)


def test_the_report_shows_the_settings_that_trained_not_only_the_recipes(tmp_path):
    """A speed profile may split the step and checkpoint otherwise than the recipe writes: report.md says what ran
    (env.json's speed), recipe.yaml notes it in a comment and still loads as the same recipe."""
    from runner.cli import recipes
    from runner.speed import profiles
    from runner.store import runs

    recipe = recipes.load(RECIPE, ["training.micro_batch_size=4", "training.gradient_accumulation_steps=4",
                                      "training.gradient_checkpointing=true"])
    ran = profiles.Speed("fast", 16, 1, False, fixed_shapes=True, keep_dtype=True, world_size=2, distributed="ddp")
    (tmp_path / "env.json").write_text(json.dumps({"speed": ran.as_dict(), "global_step": 3}))
    runs.note_resolved(tmp_path, recipe, ran.as_dict())
    text = report.write(tmp_path, recipe).read_text()
    assert "micro-batch 4 x 4 accumulation" in text  # the recipe section: the recipe as written
    assert ("| settings used | profile fast: micro-batch 16 x 1 per process x 2 processes (ddp), no gradient "
            "checkpointing, fixed rows, bf16 |") in text
    saved = (tmp_path / "recipe.yaml").read_text()
    assert "#   micro_batch_size: 16\n" in saved and "#   gradient_checkpointing: false\n" in saved
    assert yaml.safe_load(saved) == recipe and runs.mismatch(tmp_path, recipe, None) is None


def test_the_recipe_section_lists_only_the_splits_the_recipe_uses():
    from runner.cli import recipes

    both = "\n".join(report.recipe_section(recipes.load(RECIPE)))
    assert re.search(r"samples: train \S+, eval \S+, test \S+", both)
    no_eval = recipes.load(RECIPE, ["data.splits.eval=null", "data.holdout.eval=0", "training.eval_every=null"])
    text = "\n".join(report.recipe_section(no_eval))
    assert re.search(r"samples: train \S+, test \S+ \|", text) and "eval " not in text.split("samples:")[1].split("|")[0]
