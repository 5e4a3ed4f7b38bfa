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

import json
from collections import Counter
from pathlib import Path

import pytest

from evaluators.base import Record
from evaluators.multilabel import Multilabel, split_names
from tests.conftest import run_cli

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

