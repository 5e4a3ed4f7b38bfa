"""Reliability round 3 (issue 30), class by class: every size a user controls bounded before work starts, damaged
artifacts named, SIGTERM handled like Ctrl-C, machine faults named exit 1, background threads quiet, odd input
text, overrides named by their key path. Each test fails without the fix it covers."""

from __future__ import annotations

import errno
import json
import re
import shutil
import sys

import pytest

from runner.common import errors
from tests.conftest import ROOT
from tests.test_hostile import TINY, one_line, run_main

# ---------------------------------------------------------------- 1. sizes a user controls


@pytest.mark.parametrize(("argv", "where", "words"), [
    (["sweep", TINY, "--seeds", "1000000000", "--dry-run"], "--seeds", ["1,000,000,000 is out of range"]),
    (["sweep", TINY, "training.max_steps=" + ",".join(map(str, range(1, 5000))), "--dry-run"], "sweep",
     ["4,999 (training.max_steps) x 1 seed(s) is 4,999 cells, more than 1,000"]),
    (["sweep", TINY, "lora.r=" + ",".join(map(str, range(1, 40))), "lora.alpha=" + ",".join(map(str, range(1, 40))),
      "--dry-run"], "sweep", ["is 1,521 cells"]),
    (["validate", TINY, "a" * 200_000 + "=1"], "aaaa", ["the key path is 200,000 characters"]),
    (["validate", TINY, ".".join(["a"] * 20_000) + "=1"], "a.a.a", ["in 20,000 parts"]),
])
def test_counts_and_lengths_are_bounded_before_work_starts(argv, where, words):
    code, _, err = run_main(*argv)
    line = one_line(err)
    assert code == 2 and line.startswith(f"error: {where}")
    assert all(w in line for w in words), line
    assert len(line) < 600  # a head...tail of the key, never the key


def test_an_error_line_quotes_a_head_and_tail_of_a_huge_value():
    line = errors.RecipeError("k" * 10_000 + "END", "v" * 10**6 + "TAIL", "h" * 10**5).line()
    assert len(line) < errors.WHERE_CHARS + errors.PROBLEM_CHARS + errors.HINT_CHARS + 20
    assert "kEND: " in line and "vTAIL (" in line and line.count("...") == 3 and line.startswith("error: kkk")
    assert errors.short("x" * 500 + "end", 40).endswith("end") and len(errors.short("x" * 500, 40)) == 40


@pytest.mark.parametrize("key", ["num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"])
@pytest.mark.parametrize("value", [0, -1, 10**7])
def test_plan_refuses_absurd_config_dimensions(tmp_path, tiny, key, value):
    model = tmp_path / "m"
    shutil.copytree(tiny / "phi", model, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, key: value}))
    code, _, err = run_main("plan", TINY, f"model.name_or_path={model}", "--gpu-gb", "80")
    line = one_line(err)
    assert code == 2 and line.startswith("error: model.name_or_path: ")
    assert f"config.json: {key} is {value}, not a model's" in line


# ---------------------------------------------------------------- 10. overrides


def test_an_error_inside_an_overrides_value_names_its_key_path():
    code, _, err = run_main("validate", TINY, "training.max_steps=[[[[.nan]]]]")
    assert code == 2 and one_line(err).startswith("error: training.max_steps[0][0][0][0]: nan is not a finite")
    code, _, err = run_main("validate", TINY, "lora={r: {a: .inf}}")
    assert code == 2 and one_line(err).startswith("error: lora.r.a: inf is not a finite")


@pytest.mark.parametrize("overrides", [["training.max_steps=3", "training.max_steps=4"],
                                       ["lora.r=8", "seed=1", " lora.r =8"]])
def test_the_same_key_twice_on_the_command_line_is_an_error(overrides):
    code, _, err = run_main("validate", TINY, *overrides)
    line = one_line(err)
    assert code == 2 and "is given twice on the command line" in line, line
    assert line.startswith(f"error: {overrides[0].partition('=')[0]}: ")


def test_different_keys_and_list_items_are_not_repeats():
    code, _, err = run_main("validate", TINY, "lora.r=8", "lora.alpha=16", "seed=3")
    assert code == 0, err




# ---------------------------------------------------------------- 8. SIGTERM


def test_sigterm_ends_a_command_like_ctrl_c_with_exit_143(monkeypatch):
    import os
    import signal

    from runner.cli import recipes

    before = signal.getsignal(signal.SIGTERM)

    def stopped(args):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(recipes, "settle_recipe", stopped)
    code, _, err = run_main("validate", TINY)
    assert code == 143 and err.strip() == "terminated (SIGTERM): nothing was written", err
    assert signal.getsignal(signal.SIGTERM) is before  # main() leaves the process's handler as it found it


def test_a_rank_ended_by_sigterm_says_so_truthfully():
    from runner.cli import outcome
    from runner.common import dist

    line = outcome.terminated_rank(dist.World(rank=1, size=2, local_rank=1))
    assert line.startswith("error: rank 1: terminated (SIGTERM)") and "another rank failed first" in line


@pytest.mark.slow
def test_the_makefile_launcher_ends_in_the_runners_line_and_its_status(tmp_path):
    """`make train NPROC=N` runs runner.cli.launch (torchrun's own entry point): a failed job shows the runner's error
    line and one launcher line with the rank's exit status, not torchrun's traceback."""
    import subprocess

    from tests.conftest import cli_env
    from tests.e2e.test_distributed import _free_port

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {TINY}\ntraining: {{max_steps: 0}}\n")
    result = subprocess.run([sys.executable, "-m", "runner.cli.launch", "--nproc-per-node", "2", "--master-port",
                             str(_free_port()), "validate", str(bad)], capture_output=True, text=True, cwd=ROOT,
                            env=cli_env(), timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0] == "error: training.max_steps: 0 is out of range (must be >= 1)", lines
    # Both ranks refuse the recipe: which one ends first is up to the scheduler.
    assert re.fullmatch(r"error: launcher: rank [01] ended first, with exit status 2; the launcher stopped the "
                        r"others \(the error line above says why\)", lines[-1]), lines
    # rank 1, stopped by the launcher before it ended on its own, may say so (truly); nothing else
    assert all(line.startswith("error: rank 1: terminated (SIGTERM)") for line in lines[1:-1]), lines
    assert "runner.cli.launch --nproc-per-node $(NPROC)" in (ROOT / "Makefile").read_text()


# ---------------------------------------------------------------- 6. machine faults


def test_a_cache_folder_that_cannot_be_written_is_the_machines_fault_not_the_datas(tmp_path, tiny, monkeypatch):
    """HOME or the datasets cache read-only or not a folder: exit 1 naming the cache, not "cannot read train.jsonl"
    with exit 2 (root ignores permissions, so a file where the cache folder should be stands in for it)."""
    import datasets.config

    from runner.data import files

    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    with pytest.raises(errors.RecipeError) as caught:
        files.read_local(str(tiny / "data" / "xsum_tiny" / "validation.jsonl"), "data.source.eval")
    assert caught.value.exit_code == 1
    line = caught.value.line()
    assert line.startswith(f"error: {cache}: a part of the path is a file") and "HF_HOME" in line, line


@pytest.mark.parametrize(("exc", "where", "words"), [
    (OSError(errno.ELOOP, "Too many levels of symbolic links", "/x/loop/run"), "/x/loop/run", ["symbolic link loop"]),
    (RuntimeError("can't start new thread"), "threads", ["cannot start a thread", "ulimit -u"]),
    (ValueError("x"), "internal", []),
])
def test_symlink_loops_and_threads_that_cannot_start_are_machine_faults(exc, where, words):
    error = errors.classify(exc)
    assert error.exit_code == 1
    assert error.key_path == where and all(w in error.line() for w in words), error.line()


def test_a_symlink_loop_in_an_output_folder_is_one_line_exit_1(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    code, _, err = run_main("inspect", TINY, "--out", tmp_path / "a" / "x")
    line = one_line(err)
    assert code == 1 and "symbolic link loop" in line, line


# ---------------------------------------------------------------- 7. background threads


def test_a_tensorboard_writer_failing_on_a_full_disk_prints_no_traceback(tmp_path, monkeypatch):
    """The writer's thread fails (disk full) and torch raises it again at the next write, in the main thread: the
    command ends in its one line, with no thread traceback beside it."""
    from torch.utils.tensorboard import SummaryWriter

    from runner.cli import recipes

    def settle(args):
        writer = SummaryWriter(log_dir=str(tmp_path / "tb"))

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "tb" / "events"))

        monkeypatch.setattr(writer.file_writer.event_writer._general_file_writer, "write", full)
        writer.add_scalar("loss", 1.0, 1)
        writer.flush()  # the thread fails and the main thread hears of it here

    import threading

    monkeypatch.setattr(recipes, "settle_recipe", settle)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # Python's own, not pytest's
    code, _, err = run_main("validate", TINY)
    assert code == 1 and "Traceback" not in err and "Exception in thread" not in err, err
    assert one_line(err).startswith(f"error: {tmp_path / 'tb' / 'events'}: no space left on the device")


def test_a_background_failure_under_a_command_that_succeeds_is_one_warning(monkeypatch):
    import threading

    from runner.cli import recipes

    original = recipes.settle_recipe

    def settle(args):
        def fail():
            raise OSError(errno.ENOSPC, "No space left on device", "/x/events")

        thread = threading.Thread(target=fail, name="tb-writer")
        thread.start()
        thread.join()
        original(args)

    monkeypatch.setattr(recipes, "settle_recipe", settle)
    code, _, err = run_main("validate", TINY)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 0 and "Traceback" not in err
    assert lines[-1].startswith("warning: a background thread (tb-writer) failed") and "/x/events: no space" in lines[-1]


# ---------------------------------------------------------------- 2. damaged artifacts


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(("name", "damage", "words"), [
    ("model.safetensors", lambda p: _truncate(p), ["the model's weights or config is damaged: cut short"]),
    ("model.safetensors", lambda p: p.write_bytes(b"\xff" * 64), ["header is cut short or garbled"]),
    ("config.json", lambda p: _truncate(p), ["is damaged: not valid JSON"]),
    ("tokenizer.json", lambda p: p.write_bytes(b"\x00\xff garbage"), ["is damaged: not"]),
])
def test_damaged_model_files_are_named_in_one_line(tmp_path, tiny, name, damage, words):
    model = tmp_path / "m"
    shutil.copytree(tiny / "phi", model)
    damage(model / name)
    code, _, err = run_main("plan", TINY, f"model.name_or_path={model}", "--gpu-gb", "80")
    line = one_line(err)
    assert code == 1 and line.startswith(f"error: {model / name}: "), line
    assert all(w in line for w in words) and "internal" not in line, line


def test_a_damaged_adapter_is_named_before_the_base_model_loads(tmp_path):
    from runner.common import artifacts

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "x", ')
    with pytest.raises(errors.EnvironmentProblem) as caught:
        artifacts.check_folder(adapter, "the run's adapter", "train it again")
    assert caught.value.line().startswith(f"error: {adapter / 'adapter_config.json'}: the run's adapter is damaged")
    (adapter / "adapter_config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (adapter / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 10)
    with pytest.raises(errors.EnvironmentProblem) as caught:
        artifacts.check_folder(adapter, "the run's adapter", "train it again")
    assert "cut short: " in caught.value.line() and "adapter_model.safetensors" in caught.value.key_path
    (adapter / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    artifacts.check_folder(adapter, "the run's adapter", "train it again")  # whole again: no error


def test_resume_passes_over_a_damaged_newest_checkpoint_to_the_last_good_one(tmp_path):
    from runner.store import checkpoints

    run = tmp_path / "run"
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_model.safetensors").write_bytes(bytes([step]) * 100)
        checkpoints._mark_complete(ckpt, {})
    newest = run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    newest.write_bytes(b"\x07" * 100)  # garbled, the same size: the manifest's sizes still match
    assert checkpoints.complete(newest.parent)
    ckpt, passed = checkpoints.newest_loadable(run)
    assert ckpt == run / "checkpoints" / "checkpoint-2"
    assert passed == [f"{newest.parent} is damaged: adapter_model.safetensors does not hold what was saved; passed over"]
    assert checkpoints.complete_checkpoints(run) == [ckpt]  # the damaged one no longer counts for anything


# ---------------------------------------------------------------- 4. provenance without a recipe record


def _run_with_adapter(tmp_path, base: str, recipe_text: str | None):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    if recipe_text is not None:
        (run / "recipe.yaml").write_text(recipe_text)
    return run


@pytest.mark.parametrize("record", [None, "name: x\n", "model: {}\nquantization: 3\n", "- a list\n"])
def test_without_a_recipe_record_the_adapters_own_config_names_its_base(tmp_path, record):
    from runner.cli import recipes
    from runner.store import runs

    recipe = recipes.load(TINY)
    base = recipe["model"]["name_or_path"]
    note = runs.trained_with(recipe, _run_with_adapter(tmp_path / "a", base, record))
    assert note.startswith("note: ") and f"its adapter's config names the base {base}" in note
    with pytest.raises(errors.RecipeError) as caught:
        runs.trained_with(recipe, _run_with_adapter(tmp_path / "b", "/models/other-model", record))
    assert caught.value.key_path == "--run" and "its adapter was trained on '/models/other-model'" in caught.value.line()


def test_a_run_record_without_model_keys_is_named_as_the_runs(tmp_path):
    run = _run_with_adapter(tmp_path, "x", "name: x\n")
    code, _, err = run_main("export", "--run", run, "--out", tmp_path / "out")
    line = one_line(err)
    assert code == 2 and f"in the run's record {run / 'recipe.yaml'}" in line and "runner export RECIPE --run" in line


# ---------------------------------------------------------------- 9. odd input text, weights, many labels


def test_a_lone_surrogate_in_generate_input_names_the_line():
    from runner.cli import recipes
    from runner.evaluate import infer

    lines = infer._decode(b'{"document": "fine"}\n{"document": "half \\ud800 a pair"}\n', "input.jsonl")
    with pytest.raises(errors.RecipeError) as caught:
        infer.read_inputs(lines, recipes.load(TINY))
    assert caught.value.line().startswith("error: --input: line 2: document: character 6 is a lone surrogate (\\ud800)")


def test_input_lines_end_at_newlines_only():
    from runner.evaluate import infer

    assert infer._decode('{"document": "a\u2028b"}\r\nnext\n'.encode(), "x") == ['{"document": "a\u2028b"}', "next", ""]


def test_a_lone_surrogate_in_the_data_names_the_line(tmp_path):
    from runner.data import files

    path = tmp_path / "train.jsonl"
    path.write_text('{"document": "a", "summary": "b"}\n{"document": "c", "summary": "x \\udc00"}\n')
    assert files._first_bad_json_line(path) == ("line 2: summary: character 3 is a lone surrogate (\\udc00), not text "
                                                "(a \\uD800-\\uDFFF escape is half of a character)")


@pytest.mark.parametrize("weights", [[1e308, 1e308], [1e-300, 1.0], [1.0, 5e-324]])
def test_mixture_weights_that_overflow_or_vanish(tmp_path, weights):
    import yaml

    from runner.cli import recipes
    from runner.data import mixture

    data = tmp_path / "d.jsonl"
    data.write_text('{"document": "a", "summary": "b"}\n')
    files = {role: str(data) for role in ("train", "eval", "test")}
    raw = {"extends": str(TINY), "data": {"source": None, "sources": [{"source": files, "weight": w} for w in weights]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    if weights[0] == weights[1]:  # equal huge weights: an even split, not inf / inf
        assert mixture.allocate(10, weights) == [5, 5]
        recipes.load(tmp_path / "r.yaml")
        return
    with pytest.raises(errors.RecipeError) as caught:
        recipes.load(tmp_path / "r.yaml")
    assert caught.value.key_path.endswith("].weight") and "would draw no rows" in caught.value.line()


def test_very_many_labels_keep_the_confusion_matrix_bounded(tmp_path):
    from evaluators.base import Record
    from evaluators.classification import MATRIX_CLASSES, OTHER, Classification

    records = [Record(i, "p", f"l{i % 3000}", f"l{(i * 7) % 3000}") for i in range(6000)]
    records += [Record(6000 + i, "p", "l1", "l1") for i in range(50)]
    out = Classification().evaluate(records, tmp_path)
    cm = out["confusion_matrix"]
    assert len(cm["rows"]) == MATRIX_CLASSES + 1 and cm["rows"][-1] == OTHER and "l1" in cm["rows"]
    assert sum(map(sum, cm["counts"])) == len(records) and "most frequent of 3000 classes" in cm["note"]
    assert (tmp_path / "confusion_matrix.png").stat().st_size < 2_000_000 and len(out["per_class"]) == 3000


# ---------------------------------------------------------------- 5. concurrent writers


def test_a_destination_that_appeared_meanwhile_is_refused_never_replaced(tmp_path):
    from runner.common import safeio

    out = tmp_path / "export"
    with pytest.raises(FileExistsError), safeio.folder(out, replace=False) as mine:
        (mine / "weights").write_text("mine")
        with safeio.folder(out, replace=False) as theirs:  # another writer, finishing first
            (theirs / "weights").write_text("theirs")
        assert mine != theirs and mine.exists()  # each writer's temporary folder is its own
    assert (out / "weights").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_temporary_names_are_each_writers_own_and_abandoned_ones_go(tmp_path):
    import threading

    from runner.common import safeio

    target = tmp_path / "sweep.json"
    failures = []

    def write(n):
        try:
            for i in range(30):
                safeio.write_json(target, {"writer": n, "i": i})
        except Exception as exc:  # two writers sharing a temporary name: one renames the other's file away
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and json.loads(target.read_text())["i"] == 29
    dead = tmp_path / "out.999999999-dead.partial"  # a killed writer's (no such process)
    dead.mkdir()
    with safeio.folder(tmp_path / "out", replace=False) as tmp:
        (tmp / "x").write_text("x")
    assert not dead.exists() and (tmp_path / "out" / "x").is_file()


# ---------------------------------------------------------------- 3. data that changes under a run


def test_data_changed_while_training_is_said_and_no_report_marks_the_run_done(tmp_path, monkeypatch):
    import os

    from runner.cli import pipeline, recipes
    from runner.report import report
    from runner.train import train

    data = tmp_path / "train.jsonl"
    shutil.copy(ROOT / ".cache" / "tiny" / "data" / "xsum_tiny" / "train.jsonl", data)
    recipe = recipes.load(TINY, [f"data.source.train={data}"])
    run_dir = tmp_path / "run"

    def trained(recipe, trackers):  # training reads the file; meanwhile someone rewrites it
        with open(data, "a") as f:
            f.write('{"document": "a row added mid-run", "summary": "x"}\n')
        os.utime(data, ns=(1, 1))
        return run_dir, None, None, None

    monkeypatch.setattr(train, "train", trained)
    monkeypatch.setattr(report, "write", lambda *a, **k: pytest.fail("a report of other data than trained on"))
    with pytest.raises(errors.RecipeError) as caught:
        pipeline.train_evaluate_report(recipe, TINY, evaluate_after=False)
    line = caught.value.line()
    assert line.startswith(f"error: data.source.train: {data} changed while this run was training"), line
    assert caught.value.exit_code == 2


def test_unchanged_data_files_pass(tmp_path):
    from runner.cli import recipes
    from runner.data import files

    recipe = recipes.load(TINY)
    before = files.signature(recipe)
    assert sorted(key for key, _, _ in before.values()) == ["data.source.eval", "data.source.test", "data.source.train"]
    assert files.changed_since(before, recipe) is None
