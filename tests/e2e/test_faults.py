"""A run killed at any moment resumes with `training.resume: auto` into the run it would have been: kill -9
during a step, while a checkpoint is being written and during evaluation (tests/faults.py makes each happen
exactly there), then resume; the adapter, the whole-run record and the predictions equal an uninterrupted run's.
Divergence stops loudly; a full or read-only disk ends in one line and leaves nothing torn."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, overridden, run_python

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
FAULTS = ROOT / "tests" / "faults.py"
# Six steps, a checkpoint every two, every step logged, a small eval; what each variant below runs.
ARGS = ["training.max_steps=6", "training.save_every=2", "training.logging_steps=1", "training.resume=auto",
        "training.eval_every=3", "data.train_samples=48", "data.eval_samples=8", "data.test_samples=8",
        "generation.batch_size=4", "generation.max_new_tokens=8", "training.learning_rate=0.01"]

pytestmark = pytest.mark.slow  # every test here trains or runs the CLI


def train(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = cli_env() | ({"FAULT": fault} if fault else {})
    return run_python([str(FAULTS), "train", str(TINY), f"output_dir={out}", *overridden(ARGS, *extra)], ROOT, env)


def killed(result) -> None:
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-3000:])


def ok(result) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def last_line(stderr: str) -> str:
    """The last line on stderr (progress bars redraw with \\r): the one-line error, if any."""
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def run_folders(out: Path) -> list[Path]:
    root = out / "xsum_tiny"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def adapter_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def nothing_torn(run_dir: Path) -> None:
    from runner.store import checkpoints

    leftovers = [p for p in run_dir.rglob("*") if p.name.endswith(".partial") or ".tmp-" in p.name]
    assert leftovers == [], leftovers
    for ckpt in (run_dir / "checkpoints").glob("checkpoint-*"):
        assert checkpoints.complete(ckpt), ckpt
    assert all(p.stat().st_size > 0 for p in run_dir.rglob("*.json")), "a 0-byte record"


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted")
    ok(train(out))
    (run_dir,) = run_folders(out)
    return run_dir


def test_killed_during_a_step_a_checkpoint_write_and_evaluation_resumes_to_the_same_run(reference, tmp_path):
    # 1. kill -9 when step 3 begins: checkpoint-2 is complete, nothing else is.
    killed(train(tmp_path, fault="step:3"))
    (run_dir,) = run_folders(tmp_path)
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (run_dir / "adapter").exists()

    # 2. resume; kill -9 while checkpoint-4 is being written (weights on disk, optimizer and manifest not).
    result = train(tmp_path, fault="save:4")
    killed(result)
    assert "resuming the interrupted run" in result.stdout and "from checkpoint-2" in result.stdout
    torn = run_dir / "checkpoints" / "checkpoint-4"
    assert (torn / "adapter_model.safetensors").is_file() and not (torn / "optimizer.pt").exists()

    # 3. resume: the torn checkpoint is never chosen; train to the end; kill -9 after one batch of predictions.
    result = train(tmp_path, fault="eval:1")
    killed(result)
    assert "from checkpoint-2" in result.stdout
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and not (run_dir / "metrics.json").exists()
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 4

    # 4. resume: the evaluation goes on where it stopped; the run finishes in the same folder.
    result = ok(train(tmp_path))
    assert "trained, evaluating" in result.stdout and "4 of 8 predictions already" in result.stdout
    assert run_folders(tmp_path) == [run_dir]
    nothing_torn(run_dir)

    # The record is the whole run's: every step logged once, the mean loss over all six steps, time summed.
    rows, ref_rows = log_rows(run_dir), log_rows(reference)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [r["step"] for r in ref_rows if "eval_loss" in r]
    for mine, theirs in zip([r["loss"] for r in rows if "loss" in r], [r["loss"] for r in ref_rows if "loss" in r],
                            strict=True):
        assert mine == pytest.approx(theirs, rel=1e-3)
    env, ref_env = (json.loads((d / "env.json").read_text()) for d in (run_dir, reference))
    assert env["global_step"] == 6
    assert env["train_loss"] == pytest.approx(ref_env["train_loss"], rel=1e-3)
    assert env["train_loss"] == pytest.approx(sum(r["loss"] for r in rows if "loss" in r) / 6, rel=1e-6)
    first_session = json.loads((run_dir / "checkpoints" / "checkpoint-6" / "runner_checkpoint.json").read_text())
    assert env["train_seconds"] >= first_session["train_seconds"] > 0
    summary = [r for r in rows if "train_loss" in r][-1]
    assert summary["train_loss"] == pytest.approx(env["train_loss"])
    # TensorBoard too (three sessions wrote events): the steps a resumed session logged again show once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tb"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    for event, row in zip(board.Scalars("train/loss"), [r for r in rows if "loss" in r], strict=True):
        assert event.value == pytest.approx(row["loss"], rel=1e-6)

    # The adapter and the predictions are those of the uninterrupted run (CPU noise aside).
    import torch

    mine, theirs = adapter_weights(run_dir), adapter_weights(reference)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.allclose(mine[name], theirs[name], rtol=1e-3, atol=1e-4), name
    preds = [json.loads(line)["prediction"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    ref_preds = [json.loads(line)["prediction"] for line in (reference / "predictions.jsonl").read_text().splitlines()]
    assert preds == ref_preds
    assert (run_dir / "report.md").is_file() and (run_dir / "report" / "loss.png").is_file()

    # Finished: the next run of the recipe starts a new folder.
    from runner.cli import recipes
    from runner.store import runs

    recipe = recipes.load(TINY, [f"output_dir={tmp_path}", *ARGS])
    assert runs.unfinished_run(recipe) is None


def test_ctrl_c_says_what_it_kept_and_a_recipe_without_save_every_checkpoints_by_the_clock(tiny, tmp_path):
    """No training.save_every: a checkpoint once save_every_minutes have passed (here a few milliseconds, so after
    every step but the last). Ctrl-C at step 4 keeps the run with checkpoint-3, says so and how to resume."""
    clock = ["training.save_every=null", "training.save_every_minutes=0.00001"]
    result = train(tmp_path, *clock, fault="sigint:4")
    assert result.returncode == 130, result.stderr[-3000:]
    (run_dir,) = run_folders(tmp_path)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    nothing_torn(run_dir)
    said = result.stderr[result.stderr.index("interrupted"):].strip().splitlines()
    assert said == [f"interrupted: kept the run folder {run_dir} with its last complete checkpoint, at step 3",
                    "run the same command again to resume from there (training.resume: auto)"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    again = ok(train(tmp_path, *clock, "--no-eval"))
    assert "resuming the interrupted run" in again.stdout and "from checkpoint-3" in again.stdout
    assert json.loads((run_dir / "env.json").read_text())["global_step"] == 6
    # the last step is not checkpointed by the clock: the adapter is saved right after it
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_sigterm_is_handled_like_ctrl_c_with_exit_143(tiny, tmp_path):
    """A scheduler's, `docker stop`'s or `timeout`'s SIGTERM at step 4: the same account as Ctrl-C, exit 143 (issue
    30, class 8); the run resumes from what it kept."""
    result = train(tmp_path, "--no-eval", fault="sigterm:4")
    assert result.returncode == 143, result.stderr[-3000:]
    (run_dir,) = run_folders(tmp_path)
    nothing_torn(run_dir)
    said = result.stderr[result.stderr.index("terminated"):].strip().splitlines()
    assert said == [f"terminated (SIGTERM): kept the run folder {run_dir} with its last complete checkpoint, at "
                    "step 2", "run the same command again to resume from there (training.resume: auto)"], said
    assert "Traceback" not in result.stderr


def test_divergence_stops_loudly_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    result = train(tmp_path, fault="nangrad:4")
    assert result.returncode == 2, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert line.startswith("error: training.learning_rate: training diverged at step 4: the gradient norm is nan")
    assert "lower training.learning_rate (now 0.01)" in line and "checkpoint-2 is kept" in line
    assert "done:" not in result.stdout
    (run_dir,) = run_folders(tmp_path)
    assert not (run_dir / "adapter").exists() and not (run_dir / "adapter.partial").exists()
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    nothing_torn(run_dir)
    env = json.loads((run_dir / "env.json").read_text())
    assert env["diverged"]["step"] == 4
    # the diverged run is not picked up again
    from runner.cli import recipes
    from runner.store import runs

    assert runs.unfinished_run(recipes.load(TINY, [f"output_dir={tmp_path}", *ARGS])) is None


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk():
    """A 600 KiB tmpfs where this machine lets the test mount one (a checkpoint needs 1 MB); else None. Mounted
    outside pytest's temporary folders, which other sessions may clean up."""
    disk = Path(tempfile.mkdtemp(prefix="runner-small-disk-"))
    mounted = _mount_tmpfs(disk, "600k")
    yield disk if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    if not os.path.ismount(disk):
        shutil.rmtree(disk, ignore_errors=True)


def test_a_full_disk_ends_in_one_line_and_leaves_nothing_torn(tiny, tmp_path, small_disk):
    out = small_disk / "runs" if small_disk else tmp_path / "runs"
    result = train(out, "training.save_every=1", fault=None if small_disk else "enospc:1")
    assert result.returncode == 1, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert "no space left on the device (free some space, or write elsewhere with output_dir=DIR)" in line, line
    assert line.startswith("error: ")
    # nothing could be resumed, so nothing is left: no run folder, no 0-byte file
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_a_read_only_output_folder_ends_in_one_line(tiny, tmp_path, small_disk):
    if small_disk:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "runs" if small_disk else tmp_path / "runs"
    result = train(out, fault=None if small_disk else "erofs:0")
    assert result.returncode == 1, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert line.startswith("error: ") and "the file system is read-only (write elsewhere with output_dir=DIR)" in line

