"""Crash safety without training: writes that are complete or absent, checkpoints that count only when complete,
which run `resume: auto` picks (and refuses), the claim that keeps two processes out of one folder and that a
killed process does not leave stuck, and what a failed command leaves behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.cli import recipes
from runner.common import safeio
from runner.common.errors import EnvironmentProblem, RecipeError
from runner.recipe import recipe as recipe_mod
from runner.store import checkpoints, runs
from tests.conftest import ROOT

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


@pytest.fixture(autouse=True)
def fresh_tracking():
    runs._tracked.clear()  # folders earlier tests made in this process are not this test's to discard
    yield
    runs._tracked.clear()


# ---------------------------------------------------------------- safeio


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "env.json"
    safeio.write_json(path, {"a": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        safeio.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["env.json"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with pytest.raises(RuntimeError), safeio.folder(target) as partial:
        (partial / "adapter_config.json").write_text("{}")
        raise RuntimeError("killed while saving")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with safeio.folder(target) as partial:
        (partial / "adapter_config.json").write_text("{}")
        assert not target.exists()
    assert (target / "adapter_config.json").is_file() and list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------- checkpoints


def fake_checkpoint(run_dir: Path, step: int, complete: bool = True, loss_sum: float = 1.0) -> Path:
    ckpt = run_dir / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        checkpoints._mark_complete(ckpt, {"loss_sum": loss_sum, "train_seconds": 2.0 * step})
    return ckpt


def test_only_complete_checkpoints_count(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, complete=False)  # killed while writing: no manifest
    cut = fake_checkpoint(tmp_path, 6)
    (cut / "adapter_model.safetensors").write_bytes(b"w" * 10)  # a file cut short after the manifest
    moved = fake_checkpoint(tmp_path, 8)
    (moved / "trainer_state.json").unlink()  # a rotation cut short
    (tmp_path / "checkpoints" / "checkpoint-10").mkdir()  # the empty folder that broke every later resume
    assert checkpoints.complete_checkpoints(tmp_path) == [good]
    checkpoints.tidy(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_rotation_removes_the_manifest_first(tmp_path, monkeypatch):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    removed = []
    monkeypatch.setattr(checkpoints.shutil, "rmtree", lambda p, **kw: removed.append(Path(p)))  # "killed" here
    checkpoints.rotate(tmp_path / "checkpoints", keep=2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]


def test_trim_log_keeps_the_steps_the_checkpoint_covers(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)] + [{"step": 2, "eval_loss": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    checkpoints.trim_log(log, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [rows[0], rows[1], rows[4]]


# ---------------------------------------------------------------- which run resume: auto continues


@pytest.fixture
def recipe(tmp_path):
    return recipes.load(TINY, [f"output_dir={tmp_path / 'runs'}", "training.resume=auto"])


def fake_run(recipe: dict, stamp: str, fingerprint: str = "f1", **env) -> Path:
    run_dir = runs.recipe_root(recipe) / stamp
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe_mod.dump(recipe))
    safeio.write_json(run_dir / "env.json", {"data_fingerprint": fingerprint, **env})
    return run_dir


def test_states_of_a_run(recipe):
    run_dir = fake_run(recipe, "20260101-000000")
    assert runs.run_state(run_dir) == "empty"
    fake_checkpoint(run_dir, 2)
    assert runs.run_state(run_dir) == "train"
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    assert runs.run_state(run_dir) == "evaluate"
    (run_dir / "report.md").write_text("# Report")
    assert runs.run_state(run_dir) == "finished"
    assert runs.run_state(fake_run(recipe, "20260101-000001", diverged={"step": 3})) == "diverged"


def test_auto_resumes_the_newest_interrupted_run_and_trims_its_log(recipe, capsys):
    old = fake_run(recipe, "20260101-000000")
    fake_checkpoint(old, 2)
    run_dir = fake_run(recipe, "20260102-000000")
    fake_checkpoint(run_dir, 2)
    fake_checkpoint(run_dir, 4, complete=False)
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    fake_run(recipe, "20260103-000000")  # started after, died before its first checkpoint: nothing to continue
    assert runs.open_run(recipe, fingerprint="f1") == (run_dir, str(run_dir / "checkpoints" / "checkpoint-2"))
    assert "from checkpoint-2" in capsys.readouterr().out
    assert not (run_dir / "checkpoints" / "checkpoint-4").exists()  # the torn one is gone
    assert [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_auto_starts_fresh_after_a_finished_or_diverged_run(recipe):
    done = fake_run(recipe, "20260101-000000")
    fake_checkpoint(done, 2)
    fake_run(recipe, "20260102-000000", diverged={"step": 3, "what": "loss", "value": "nan"})
    run_dir, resume_from = runs.open_run(recipe, fingerprint="f1")
    assert resume_from is None and run_dir.name not in ("20260101-000000", "20260102-000000")


def test_auto_refuses_a_run_of_another_recipe_or_other_data(recipe):
    run_dir = fake_run(recipe, "20260101-000000")
    fake_checkpoint(run_dir, 2)
    other = recipes.load(TINY, [f"output_dir={recipe['output_dir']}", "training.resume=auto",
                                   "training.learning_rate=0.01"])
    with pytest.raises(RecipeError) as info:
        runs.open_run(other, fingerprint="f1")
    line = info.value.line()
    was = recipe["training"]["learning_rate"]
    assert line.startswith("error: training.resume: ") and f"training.learning_rate was {was:g}" in line
    assert "this recipe has 0.01" in line and "training.resume=never" in line
    with pytest.raises(RecipeError) as info:
        runs.open_run(recipe, fingerprint="f2")
    assert "the data differs (fingerprint f1 then, f2 now)" in info.value.line()
    # how the run was started is not part of what is compared
    saved = {**recipe, "training": {**recipe["training"], "resume": "never"}}
    (run_dir / "recipe.yaml").write_text(recipe_mod.dump(saved))
    assert runs.open_run(recipe, fingerprint="f1")[0] == run_dir


# ---------------------------------------------------------------- claims


HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from runner.store import runs
runs.claim(__import__("pathlib").Path({folder!r}))
print("held", flush=True)
time.sleep(120)
"""


def hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), folder=str(folder))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_held_by_a_live_process_is_never_resumed_and_a_killed_one_lets_go(recipe):
    run_dir = fake_run(recipe, "20260101-000000")
    fake_checkpoint(run_dir, 2)
    proc = hold(run_dir)
    try:
        assert runs.holder(run_dir) == proc.pid
        with pytest.raises(EnvironmentProblem) as info:
            runs.claim(run_dir)
        assert f"another runner process (pid {proc.pid})" in info.value.line() and info.value.exit_code == 1
        assert runs.unfinished_run(recipe) is None  # someone's live run, not an interrupted one
    finally:
        proc.kill()  # kill -9: no cleanup runs in it
        proc.wait()
    deadline = time.time() + 10
    while runs.holder(run_dir) is not None and time.time() < deadline:
        time.sleep(0.05)
    assert runs.holder(run_dir) is None
    assert runs.open_run(recipe, fingerprint="f1")[0] == run_dir


# ---------------------------------------------------------------- what a failed command leaves


def test_a_failed_command_removes_only_what_cannot_be_continued(recipe):
    empty = runs.new_run_dir(recipe)
    (empty / "recipe.yaml").write_text("x")
    kept = runs.new_run_dir(recipe)
    fake_checkpoint(kept, 2)
    fake_checkpoint(kept, 4, complete=False)
    (kept / "adapter.partial").mkdir()
    runs.discard_unfinished()
    assert not empty.exists()
    assert kept.is_dir() and [p.name for p in (kept / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert not (kept / "adapter.partial").exists()


def test_a_failed_first_run_leaves_no_folder_at_all(recipe):
    run_dir = runs.new_run_dir(recipe)
    safeio.write_text(run_dir / "recipe.yaml", "x")
    runs.discard_unfinished()
    assert not runs.recipe_root(recipe).exists()


@pytest.mark.slow
def test_resuming_the_checkpoint_of_the_last_step_trains_nothing_more(tiny, tmp_path, cli):
    """A run stopped after its checkpoint at training.max_steps resumes to exactly max_steps: transformers alone
    trains one step past it; the runner takes the checkpoint's weights instead."""
    from safetensors.torch import load_file

    from tests.conftest import ROOT, run_folder

    common = [ROOT / "recipes" / "tiny" / "xsum_tiny.yaml", "training.max_steps=4", "training.save_every=2",
              "training.eval_every=null", "training.logging_steps=1", "--no-eval"]
    first = cli("train", *common, f"output_dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-2000:]
    last = run_folder(first.stdout) / "checkpoints" / "checkpoint-4"
    again = cli("train", *common, f"output_dir={tmp_path / 'b'}", f"training.resume={last}")
    assert again.returncode == 0, again.stderr[-2000:]
    run = run_folder(again.stdout)
    assert json.loads((run / "env.json").read_text())["global_step"] == 4
    saved, held = (load_file(d / "adapter_model.safetensors") for d in (run / "adapter", last))
    assert saved.keys() == held.keys() and all(saved[k].equal(held[k]) for k in saved)


# ---------------------------------------------------------------- what Ctrl-C says


def test_an_interruption_says_what_was_kept_removed_and_how_to_go_on(recipe):
    from runner.store import leftovers

    assert leftovers.describe(runs.discard_unfinished()) == ["interrupted: nothing was written"]
    empty = runs.new_run_dir(recipe)  # interrupted before its first checkpoint
    (empty / "recipe.yaml").write_text("x")
    assert leftovers.describe(runs.discard_unfinished()) == [
        f"interrupted: removed the run folder {empty}: no complete checkpoint yet, nothing to resume from"]
    assert not empty.exists()

    kept = runs.new_run_dir(recipe)
    fake_checkpoint(kept, 2)
    fake_checkpoint(kept, 4, complete=False)  # Ctrl-C while checkpoint-4 was written
    assert leftovers.describe(runs.discard_unfinished()) == [
        f"interrupted: kept the run folder {kept} with its last complete checkpoint, at step 2; removed the "
        "half-written checkpoints/checkpoint-4", "run the same command again to resume from there (training.resume: auto)"]

    never = recipes.load(TINY, [f"output_dir={recipe['output_dir']}", "training.resume=never"])
    fresh = runs.new_run_dir(never)
    ckpt = fake_checkpoint(fresh, 2)
    (fresh / "adapter.partial").mkdir()
    assert leftovers.describe(runs.discard_unfinished()) == [
        f"interrupted: kept the run folder {fresh} with its last complete checkpoint, at step 2; removed the "
        f"half-written adapter.partial", f"resume it with the same command and training.resume={ckpt}"]


def test_an_interrupted_sweep_speaks_of_the_cell_it_was_in_not_the_finished_ones(recipe):
    from runner.store import leftovers

    done = runs.new_run_dir(recipe)
    (done / "report.md").write_text("# Report")
    assert leftovers.describe(runs.discard_unfinished()) == [f"interrupted: kept the finished run folder {done}"]
    runs._track(done, created=True)
    current = runs.new_run_dir(recipe)
    fake_checkpoint(current, 2)
    assert leftovers.describe(runs.discard_unfinished())[0] == (
        f"interrupted: kept the run folder {current} with its last complete checkpoint, at step 2")


def test_an_interrupted_evaluation_says_how_many_predictions_it_kept(recipe, tmp_path):
    from runner.store import leftovers

    run_dir = fake_run(recipe, "20260101-000000")
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    runs._track(run_dir, created=False, resume_auto=True)
    assert leftovers.describe(runs.discard_unfinished()) == [
        f"interrupted: kept the run folder {run_dir}: trained, its adapter saved, not yet evaluated",
        "run the same command again to evaluate it (training.resume: auto)"]
    out = runs.open_eval_dir(recipe, run_dir)
    (out / "predictions.jsonl").write_text('{"index": 0}\n{"index": 1}\n')
    nothing = runs.open_eval_dir(recipe, None)  # the base model's, interrupted before its first prediction
    assert leftovers.describe(runs.discard_unfinished()) == [
        f"interrupted: kept the evaluation folder {out} (2 predictions written)",
        "run the same command again to go on from there",
        f"removed the evaluation folder {nothing}: no prediction written yet"]


def test_the_clock_checkpoints_as_rank_0_decides(monkeypatch):
    """save_every_minutes: a checkpoint at the first step that ends that long after the last one, not at the last
    step; under a launcher every rank takes rank 0's decision (a rank saving alone would hang the others)."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from runner.common import dist

    now = [1000.0]
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: now[0])
    record = checkpoints.run_record(every_minutes=2)
    state = SimpleNamespace(global_step=1, max_steps=10)
    record.on_train_begin(None, state, TrainerControl())

    def step(at_minute: float, global_step: int = 1) -> bool:
        now[0] = 1000.0 + 60 * at_minute
        state.global_step = global_step
        return record.on_step_end(None, state, TrainerControl()).should_save

    assert not step(1.9) and step(2.0)
    record.last_save = now[0]  # what on_save does
    assert not step(3.9) and step(4.1) and not step(4.1, global_step=10)  # the last step: the adapter follows
    record.last_save = now[0]
    assert not checkpoints.run_record().on_step_end(None, state, TrainerControl()).should_save  # no clock: no save
    sent = []
    monkeypatch.setattr(dist, "world", lambda: dist.World(rank=1, size=2))
    monkeypatch.setattr(dist, "broadcast", lambda obj: sent.append(obj) or True)  # rank 0's clock: it is time
    assert step(4.2) and sent == [None]  # rank 1's own clock (not due) is not asked
