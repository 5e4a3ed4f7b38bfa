"""training.early_stopping: stop after N evaluations without improvement, keep the best evaluation's adapter (its
checkpoint is never rotated away), and say in env.json and report.md which step was kept and why."""

from __future__ import annotations

import json

import pytest

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.store import checkpoints
from tests.conftest import ROOT, run_folder

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


def test_early_stopping_needs_an_eval_split_and_a_checkpoint_at_each_evaluation(tiny):
    with pytest.raises(RecipeError) as err:
        recipes.load(TINY, ["training.early_stopping={patience: 2}", "data.splits.eval=null"])
    assert err.value.key_path == "training.early_stopping"
    with pytest.raises(RecipeError) as err:
        recipes.load(TINY, ["training.early_stopping={patience: 2}", "training.eval_every=5",
                               "training.save_every=10"])
    assert err.value.key_path == "training.save_every"
    recipe = recipes.load(TINY, ["training.early_stopping={patience: 2}", "training.eval_every=5"])
    assert recipe["training"]["early_stopping"] == {"patience": 2, "metric": "eval_loss", "min_delta": 0.0,
                                                    "restore_best": True}


def test_rotation_keeps_the_best_checkpoint_besides_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"x" * step)
        checkpoints._mark_complete(ckpt, {})
    checkpoints.rotate(tmp_path, keep=1, best=tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_a_run_whose_eval_loss_rises_stops_and_keeps_the_best_steps_adapter(tiny, cli, tmp_path):
    """A learning rate far too high makes the eval loss jump after the first step (measured 6.7 -> 8.7): with
    patience 1 the run stops at step 2 of 10 and the adapter is step 1's, even though the trainer's rotation
    (save_total_limit 1) would otherwise have deleted that checkpoint."""
    from safetensors.torch import load_file

    result = cli("train", TINY, f"output_dir={tmp_path}", "training.max_steps=10", "training.eval_every=1",
                 "training.learning_rate=0.3", "training.warmup_ratio=0", "training.early_stopping={patience: 1}",
                 "training.save_total_limit=1", "training.micro_batch_size=4", "data.train_samples=200",
                 "data.eval_samples=8", "training.report_to=none", "--no-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_folder(result.stdout)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    evals = {row["step"]: row["eval_loss"] for row in log if "eval_loss" in row}
    assert sorted(evals) == [1, 2] and evals[2] > evals[1]
    best = json.loads((run / "env.json").read_text())["early_stopping"]
    assert best["stopped_early"] and best["last_step"] == 2 and best["max_steps"] == 10
    assert best["best_step"] == 1 and best["kept_step"] == 1 and best["restored_best"]
    assert best["best_value"] == pytest.approx(evals[1])
    assert best["evaluations_without_improvement"] == 1
    # the run's adapter is step 1's checkpoint, not step 2's
    kept = load_file(run / "adapter" / "adapter_model.safetensors")
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    first = load_file(run / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    second = load_file(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert kept.keys() == first.keys()
    assert all((kept[k] == first[k]).all() for k in kept)
    assert any((kept[k] != second[k]).any() for k in kept)
    assert "early stopping: kept step 1's adapter, the lowest eval_loss" in result.stdout
    report = (run / "report.md").read_text()
    assert "| adapter kept (early stopping) | kept step 1's adapter, the lowest eval_loss" in report
    assert "stopped at step 2 of 10: 1 evaluation(s) in a row without an improvement" in report
