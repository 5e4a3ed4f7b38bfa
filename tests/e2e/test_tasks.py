"""Each tiny twin of the study's classification tasks learns through the real CLI: after `runner train`, held-out
accuracy (micro-F1 for GoEmotions) is far above the untrained model's (`runner eval --base`) and above chance.

The margin over chance: the tiny test splits have n = 100 examples, so the standard error of an accuracy near a
chance level p is sqrt(p(1 - p) / n) <= 0.05. Requiring the trained score to beat the best data-derived chance
baseline (majority class or uniform guessing; for multi-label, the best constant prediction) by 0.30 puts it at
least 6 standard errors above what a model that ignores its input can reach. The absolute floors sit below the
scores measured on 1 and 2 CPU threads alike (AG News 1.00, MNLI 0.78, GoEmotions micro-F1 0.985), leaving room
for the small numeric differences between machines and thread counts.
"""

from __future__ import annotations

import csv
import json
import random
import re
import shlex
from collections import Counter
from pathlib import Path

import pytest

from evaluators.base import Record
from evaluators.multilabel import Multilabel, split_names
from tests.conftest import ROOT, run_cli

MARGIN = 0.30
# task -> (evaluator, metric, floor)
TASKS = {
    "agnews_tiny": ("classification", "accuracy", 0.85),
    "goemotions_tiny": ("multilabel", "micro_f1", 0.80),
    "mnli_tiny": ("classification", "accuracy", 0.65),
}


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def folder(result) -> Path:
    return Path(next(line for line in result.stdout.splitlines() if line.startswith("done: "))[6:])


def references(run_dir: Path) -> list[str]:
    return [json.loads(line)["reference"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def chance(evaluator: str, refs: list[str], labels: list[str]) -> float:
    """The best score a model that ignores its input can expect on these references."""
    if evaluator == "classification":
        return max(Counter(refs).most_common(1)[0][1] / len(refs), 1 / len(labels))
    names = sorted({n for r in refs for n in split_names(r, ",")})
    constants = [[n] for n in names] + [names]  # each single label, and all of them
    scores = []
    for guess in constants:
        records = [Record(index=i, prompt="", reference=r, prediction=", ".join(guess)) for i, r in enumerate(refs)]
        scores.append(Multilabel(labels=labels).evaluate(records, Path("."))["micro_f1"])
    return max(scores)


@pytest.mark.parametrize("task", [pytest.param(task, marks=pytest.mark.twins(task)) for task in TASKS])
def test_tiny_twin_learns(task, trained):
    evaluator, metric, floor = TASKS[task]
    run = trained(task)
    base = ok(run_cli("eval", run.recipe, "--base", f"output_dir={run.output_dir}"))
    run_dir, base_dir = run.run_dir, folder(base)
    after = json.loads((run_dir / "metrics.json").read_text())[evaluator]
    before = json.loads((base_dir / "metrics.json").read_text())[evaluator]
    from runner.cli import recipes

    labels = recipes.load(run.recipe)["evaluation"]["evaluators"][0]["labels"]
    refs = references(run_dir)
    assert len(refs) == 100 and references(base_dir) == refs  # the same held-out examples
    level = chance(evaluator, refs, labels)
    print(f"{task}: {metric} trained {after[metric]:.3f}, untrained {before[metric]:.3f}, chance {level:.3f}")
    assert after[metric] >= floor
    assert after[metric] >= level + MARGIN
    assert after[metric] >= before[metric] + MARGIN
    assert after.get("invalid_rate", 0) <= 0.05  # it answers with label names
    assert (run_dir / "report.md").is_file()


# ---------------------------------------------------------------- README: "Your own task", followed literally


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def review_rows(n: int) -> list[tuple[str, str]]:
    rng = random.Random(0)
    good = ["lasts all day", "is sharp and bright", "works perfectly", "was worth every penny", "feels solid"]
    bad = ["stopped working after a week", "is dim and blurry", "broke on the first day", "was a waste of money",
           "feels cheap"]
    things = ["The battery", "The screen", "This phone", "The charger", "The case", "The speaker"]
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        rows.append((f"{rng.choice(things)} {rng.choice(good if label == 'positive' else bad)}.", label))
    return rows


@pytest.mark.slow
def test_readme_add_your_own_task_works_as_written(tiny, tmp_path):
    section = readme_section("Your own task")
    (csv_text,) = blocks(section, "csv")
    (recipe_text,) = blocks(section, "yaml")
    commands = [line.split("  #")[0].strip() for block in blocks(section, "bash") for line in block.splitlines()
                if line.startswith("runner ")]
    # The user's files, as the README describes them: its CSV rows and more of the same kind, and its YAML.
    header, *example_rows = csv_text.strip().splitlines()
    assert header == "text,label"
    with open(tmp_path / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        f.write(csv_text.strip() + "\n")
        csv.writer(f).writerows(review_rows(400 - len(example_rows)))
    (tmp_path / "my_reviews.yaml").write_text(recipe_text, encoding="utf-8")
    # "run from the project folder, where .cache/tiny/phi is"
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "tiny").symlink_to(tiny)
    # Every command that needs no hub: validate, and the offline block (the others load microsoft/phi-2).
    offline = [c for c in commands if c.split()[1] == "validate" or "model.name_or_path=" in c]
    assert [c.split()[1] for c in offline] == ["validate", "inspect", "train"]
    outputs = {}
    for command in offline:
        result = run_cli(*shlex.split(command)[1:], cwd=tmp_path)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
        outputs[command.split()[1]] = result.stdout
    assert outputs["validate"].startswith("ok: my_reviews.yaml -> my_reviews")
    assert "train: 250 rows" in outputs["inspect"] and "labels (2 names" in outputs["inspect"]
    (run_dir,) = (tmp_path / "runs" / "my_reviews").glob("2*")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["examples"] == 100 and set(metrics["classification"]["per_class"]) == {"positive", "negative"}
    assert (run_dir / "report.md").is_file() and (run_dir / "confusion_matrix.png").is_file()
