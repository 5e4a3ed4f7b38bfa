"""training.method end to end through the real CLI on the tiny twins: DPO started from the AG News twin's adapter
(its frozen copy the reference) learns the preference on held-out pairs without losing the task it started from,
names the adapter it started from, reports TRL's signals and compares against its start with a paired CI; raw-text
pretraining lowers the held-out loss.

Thresholds: the eval pairs' preference accuracy starts at 0 (policy = reference: every margin is 0, none counts as
won) and measured 0.94 after 16 steps on 1 and 2 threads; 0.75 is far above chance (0.5) for 48 pairs (standard
error <= 0.07). The SFT twin scores 1.00 on the test rows; DPO must not fall below it by more than one example in a
hundred. The pretrain twin's eval loss measured 4.68 at step 10 and 3.42 at step 20.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, run_folder

pytestmark = pytest.mark.twins("agnews_tiny")
RECIPES = ROOT / "recipes" / "tiny"


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def metric(run_dir: Path, name: str) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["classification"][name]


def log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dpo(trained, tmp_path_factory):
    """(the SFT twin's run, the DPO run started from it)."""
    sft = trained("agnews_tiny").run_dir
    out = tmp_path_factory.mktemp("dpo")
    result = ok(run_cli("train", RECIPES / "agnews_dpo_tiny.yaml", f"model.adapter={sft}", f"output_dir={out}"))
    return sft, run_folder(result.stdout)


def test_dpo_from_the_sft_adapter_learns_the_preference(dpo):
    sft, run = dpo
    evals = [r for r in log(run) if "eval_rewards/accuracies" in r]
    assert evals and evals[-1]["eval_rewards/accuracies"] >= 0.75
    assert evals[-1]["eval_rewards/margins"] > 0
    assert metric(run, "accuracy") >= metric(sft, "accuracy") - 0.01
    env = json.loads((run / "env.json").read_text())
    assert env["started_from"]["run"] == str(sft) and env["started_from"]["loaded"] == str(sft / "adapter")
    # the saved adapter is the policy alone: no frozen reference copy beside it
    assert not (run / "adapter" / "ref").exists()
    report = (run / "report.md").read_text()
    assert f"training.method **dpo**, started from `{sft}`" in report
    assert "| eval pairs, step 16 |" in report and "preference accuracy" in report


def test_compare_sft_with_dpo_gives_the_paired_difference(dpo):
    sft, run = dpo
    result = ok(run_cli("compare", "--run", sft, "--run", run))
    assert "training.method sft -> dpo" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("classification.accuracy:"))
    assert "paired 95% CI" in line


def test_pretrain_lowers_the_held_out_loss(tmp_path):
    result = ok(run_cli("train", RECIPES / "xsum_pretrain_tiny.yaml", f"output_dir={tmp_path}"))
    run = run_folder(result.stdout)
    losses = [r["eval_loss"] for r in log(run) if "eval_loss" in r]
    assert len(losses) == 2 and losses[-1] < losses[0] - 0.5
    assert "training.method **pretrain**" in (run / "report.md").read_text()
