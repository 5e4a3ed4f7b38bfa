"""The one-line contract beyond schema mistakes: hostile YAML (alias bombs, deep nesting, non-text and repeated
keys, NaN/inf, 5.0 for an integer), override indexing mistakes, evaluator references that are no Evaluator,
non-UTF-8 inputs, the environment (disk full, read-only, memory, a missing module), `runner plan` without a GPU,
user code that cannot shadow a library, and text too long to fit cut before it is tokenized."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import textwrap
from pathlib import Path

import pytest
import yaml

from runner.cli import cli, recipes
from runner.common import errors
from runner.common.errors import RecipeError
from runner.recipe import loader
from runner.recipe import recipe as recipe_mod
from tests.conftest import ROOT

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


def run_main(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def validate_text(tmp_path: Path, text: str, *overrides: str) -> tuple[int, str]:
    path = tmp_path / "r.yaml"
    path.write_text(f"extends: {TINY}\n" + textwrap.dedent(text))
    code, _, err = run_main("validate", path, *overrides)
    return code, (one_line(err) if code else "")


BOMB = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 9) + "]\n" for i in range(9))


@pytest.mark.parametrize(("text", "where", "words"), [
    (BOMB + "data: {label_names: {document: *l8}}\n", "l", ["expands to more than 50,000 values"]),
    ("prompt: {max_length: " + "[" * 500 + "]" * 500 + "}\n", "r.yaml", ["nested deeper than 40 levels", "line 2"]),
    ("".join(f"a{i}: &a{i} [[[[[[[[[[[[[[[[[[[[{f'*a{i - 1}' if i else 1}]]]]]]]]]]]]]]]]]]]]\n" for i in range(6)),
     "a", ["nested deeper than 80 levels"]),
    ("training: &t {x: *t}\n", "training.x", ["refers to itself"]),
    ("1: x\n", "r.yaml", ["line 2", "key 1 is not text", "quote it"]),
    ("on: true\n", "r.yaml", ["key True is not text"]),
    ("seed: 1\nseed: 2\n", "r.yaml", ["line 3", "'seed' is repeated (first at line 2)"]),
    ("training:\n  learning_rate: .nan\n", "training.learning_rate", ["nan is not a finite number"]),
    ("prompt: {max_length: .inf}\n", "prompt.max_length", ["inf is not a finite number"]),
    ("training: {micro_batch_size: 5.0}\n", "training.micro_batch_size", ["expected integer", "5.0"]),
    ("evaluation: {evaluators: [{name: samples, count: 4.0}]}\n", "evaluation.evaluators[0].count",
     ["expected integer"]),
    ("seed: 123456789012345678901234567890\n", "seed", ["too large"]),
    ("seed: !!python/object/apply:os.system ['echo pwned']\n", "r.yaml", ["YAML"]),
    ("name: " + "x" * 100_000 + "\nseed: [" + "1, " * 5000 + "1]\n", "seed", ["expected integer"]),
])
def test_hostile_recipe_is_one_line_exit_2(tmp_path, text, where, words):
    code, line = validate_text(tmp_path, text)
    assert code == 2, line
    assert line.startswith(f"error: {where}") or f"/{where}:" in line, line
    for word in words:
        assert word in line, line
    assert len(line) < 400, line  # what an error quotes is bounded


def test_recipe_file_that_is_not_utf8_or_too_large(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: x\nseed: \xff\xfe\n")
    assert "not UTF-8 text (byte 14)" in one_line(run_main("validate", bad)[2])
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * 2_000_000 + b"\n")
    assert "larger than 1000 kB" in one_line(run_main("validate", big)[2])


@pytest.mark.parametrize(("override", "where", "words"), [
    ("evaluation.evaluators.name=x", "evaluation.evaluators.name", ["is a list, not a section",
                                                                    "evaluation.evaluators[0].name"]),
    ("training[0]=1", "training[0]", ["is a mapping, not a list"]),
    ("seed.x=1", "seed.x", ["is an integer, not a section"]),
    ("lora.target_modules[0]=x", "lora.target_modules[0]", ["is a string, not a list"]),
    ("evaluation.evaluators[5].count=1", "evaluation.evaluators[5]", ["no such list item", "has 2 item(s)"]),
    ("training.learning_rate=.nan", "training.learning_rate", ["not a finite number"]),
    ("training.max_steps=5.0", "training.max_steps", ["expected integer"]),
    ("data.label_names={1: [a]}", "data.label_names", ["key 1 is not text"]),
    ("x=" + "[" * 100 + "]" * 100, "x", ["nested deeper"]),
    ("\r=auto", "", ["bad key path segment"]),
])
def test_override_mistakes_are_one_line(override, where, words):
    code, _, err = run_main("validate", TINY, override)
    line = one_line(err)
    assert code == 2 and line.startswith(f"error: {where}"), line
    for word in words:
        assert word in line, line


@pytest.mark.parametrize(("name", "words"), [
    ("os:system", ["is a builtin_function_or_method, not a class"]),
    ("json:JSONDecoder", ["is a class but not an Evaluator"]),
    (":X", ["not a package.module:ClassName reference"]),
    ('"os:"', ["not a package.module:ClassName reference"]),
    ("no_such_module_xyz:Thing", ["cannot import 'no_such_module_xyz'"]),
    ("evaluators.rouge:Nope", ["has no 'Nope'"]),
])
def test_evaluator_reference_that_is_no_evaluator(name, words):
    code, _, err = run_main("validate", TINY, f"evaluation.evaluators[0].name={name}")
    line = one_line(err)
    assert code == 2 and line.startswith("error: evaluation.evaluators[0].name: "), line
    for word in words:
        assert word in line, line


def test_evaluator_module_that_fails_or_has_a_bad_schema(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_evals.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "odd_evals.py").write_text(textwrap.dedent("""
        from evaluators.base import Evaluator
        class Odd(Evaluator):
            params_schema = {"properties": {"k": {"type": "no-such-type"}}}
    """))
    code, _, err = run_main("validate", TINY, "evaluation.evaluators[0].name=broken_evals:X")
    assert code == 2 and "importing 'broken_evals' failed: RuntimeError: boom at import" in one_line(err)
    code, _, err = run_main("validate", TINY, "evaluation.evaluators[0].name=odd_evals:Odd")
    assert code == 2 and "params_schema is not a valid JSON Schema" in one_line(err)


def test_command_line_mistakes_are_one_line():
    code, _, err = run_main("validate")
    assert code == 2 and one_line(err).startswith("error: command line: ")
    code, _, err = run_main("train", TINY, "--no-such-flag")
    assert code == 2 and "unrecognized arguments: --no-such-flag" in one_line(err)


# ---------------------------------------------------------------- the environment: exit 1, one line


@pytest.mark.parametrize(("exc", "words"), [
    (OSError(errno.ENOSPC, "No space left on device", "/x/runs/r/env.json"), ["/x/runs/r/env.json",
                                                                              "no space left", "output_dir="]),
    (OSError(errno.EROFS, "Read-only file system", "/ro/runs"), ["/ro/runs", "read-only", "output_dir="]),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), ["permission denied"]),
    (RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                  "data/0: file write failed"), ["output", "no space left"]),
    (Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
               'on device" })'), ["no space left"]),
    (MemoryError(), ["memory", "out of memory"]),
    (ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes"),
     ["dependency", "'bitsandbytes' is not installed"]),
    (ZeroDivisionError("division by zero"), ["internal", "ZeroDivisionError", "RUNNER_DEBUG=1"]),
])
def test_environment_failures_are_one_line_exit_1(monkeypatch, exc, words):
    def fail(args):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "validate", (*cli.COMMANDS["validate"][:2], fail))
    code, _, err = run_main("validate", TINY)
    line = one_line(err)
    assert code == 1, line
    for word in words:
        assert word in line, line


def test_classify_follows_the_cause_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/d/f")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as exc:
        err = errors.classify(exc)
    assert err.exit_code == 1 and err.key_path == "/d/f" and "no space left" in err.problem


# ---------------------------------------------------------------- inputs, plan, shadowing


@pytest.mark.parametrize("text", [b"model: [unclosed\n", b"\xff\xfe not text", b"- a list\n", b"a: 1\na: 2\n"])
def test_a_run_whose_recipe_yaml_is_unreadable_is_not_a_traceback(tmp_path, text):
    """eval/compare/generate/export --run and a sweep's finished cells read a run's saved recipe: one that does not
    read as a recipe is treated as missing (nothing to check it against), not an internal error."""
    from runner.store import runs

    (tmp_path / "recipe.yaml").write_bytes(text)
    assert runs.saved_recipe(tmp_path) is None
    assert runs.trained_with(recipes.load(TINY), tmp_path) is None
    assert runs.mismatch(tmp_path, recipes.load(TINY), None) == "its recipe.yaml is missing or unreadable"


def test_generate_input_that_is_not_utf8(tmp_path):
    from runner.evaluate import infer

    path = tmp_path / "in.txt"
    path.write_bytes(b"first line\nsecond: caf" + b"\xe9\n")
    with pytest.raises(RecipeError) as info:
        infer.open_input(str(path))
    assert info.value.key_path == "--input" and "not UTF-8 text (line 2" in info.value.problem


@pytest.mark.parametrize("where", ["folder", "/dev/null", "missing"])
def test_generate_input_that_is_no_file_says_what_it_is(tmp_path, where):
    from runner.evaluate import infer

    path = {"folder": tmp_path, "/dev/null": "/dev/null", "missing": tmp_path / "nope.txt"}[where]
    with pytest.raises(RecipeError) as info:
        infer.open_input(str(path))
    said = {"folder": "is a directory, not a file", "/dev/null": "is not a regular file", "missing": "file not found"}
    assert info.value.key_path == "--input" and said[where] in info.value.problem


def test_generate_input_a_broken_chat_record_is_refused():
    from runner.evaluate import infer

    recipe = recipes.load(ROOT / "recipes" / "tiny" / "chat_tiny.yaml")
    with pytest.raises(RecipeError) as info:
        infer.read_inputs(["What is the news?", '{"messages": [{"role": "user", "content": "hi"}'], recipe)
    assert info.value.key_path == "--input" and info.value.problem == "line 2: not valid JSON"


def test_plan_without_gpu_and_without_gpu_gb():
    from runner.speed import plan

    text = plan.report(recipes.load(TINY), None)
    for name in ("none", "fast", "balanced", "low_memory"):
        assert any(line.startswith(name) and line.endswith("GiB") for line in text.splitlines()), text
    assert "no GPU here" in text


@pytest.mark.parametrize("command", [["plan", TINY], ["sweep", TINY, "lora.r=4,8", "--dry-run"]])
@pytest.mark.parametrize("size", ["-3", "nan", "0", "inf", "-inf"])
def test_gpu_gb_that_no_card_has_is_one_line_exit_2(tmp_path, command, size):
    code, out, err = run_main(*command, f"--gpu-gb={size}", f"output_dir={tmp_path}")
    assert code == 2 and one_line(err).startswith(f"error: --gpu-gb: {size} is not a card's memory (give its size")
    assert "sweep folder" not in out and not any(tmp_path.iterdir())


@pytest.mark.parametrize("out", ["f", "f/sub"])
def test_inspect_out_at_a_file_is_one_line_exit_2(tmp_path, out):
    (tmp_path / "f").write_text("")
    code, out_text, err = run_main("inspect", TINY, "--out", tmp_path / out, f"output_dir={tmp_path}")
    assert code == 2 and one_line(err) == f"error: --out: {tmp_path / 'f'} is a file (give a folder)"
    assert not out_text  # refused before the data is tokenized


def test_working_directory_cannot_shadow_a_library(tmp_path, cli):
    """A stray jsonschema.py or trl.py beside the user's recipes loses to the installed library, while the
    user's own evaluator module there is still found."""
    for name in ("jsonschema", "trl", "yaml"):
        (tmp_path / f"{name}.py").write_text("raise SystemExit('SHADOWED: the working directory won')\n")
    (tmp_path / "myevals.py").write_text(textwrap.dedent("""
        from evaluators.base import Evaluator
        class Mine(Evaluator):
            def evaluate(self, records, out_dir):
                return {}
    """))
    result = cli("validate", TINY, "evaluation.evaluators[1].name=myevals:Mine", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "SHADOWED" not in result.stdout + result.stderr


# ---------------------------------------------------------------- text that cannot fit is cut before tokenizing


class CountingTokenizer:
    """The tiny tokenizer, recording the longest text it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, text, **kw):
        texts = text if isinstance(text, list) else [text]
        self.longest = max([self.longest, *(len(t) for t in texts)])
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny):
    from runner.model import model as model_mod

    return model_mod.load_tokenizer(recipes.load(TINY))


def test_a_huge_record_is_cut_before_tokenizing_and_fits_the_same(tiny_tokenizer):
    from runner.data import data as data_mod

    recipe = recipes.load(TINY)
    cap = data_mod.char_cap(tiny_tokenizer, recipe["prompt"]["max_length"])
    words = "The council met again today to discuss the plans for the new bridge. " * (30_000_000 // 70)
    rows = {"document": [words, words[: 3 * cap]], "summary": ["Council meets.", "Council meets."],
            "id": ["huge", "short"]}
    counting = CountingTokenizer(tiny_tokenizer)
    out = data_mod.fit_batch(rows, recipe, counting)
    assert counting.longest < 3 * cap  # never the 30 MB text, only what can matter (a field, plus template)
    assert out["prompt"][0] == out["prompt"][1]  # the same truncation as from a text only 3x the cap
    assert out["truncated"] == [True, True] and max(out["n_tokens"]) <= recipe["prompt"]["max_length"]
    # a completion that cannot fit is dropped without being tokenized whole
    rows = {"document": ["Short."], "summary": [words], "id": ["x"]}
    out = data_mod.fit_batch(rows, recipe, counting)
    assert out["n_tokens"][0] > recipe["prompt"]["max_length"] and counting.longest < 3 * cap


def test_inspect_measures_a_huge_record_on_its_first_characters(tiny_tokenizer):
    from datasets import Dataset

    from runner.data import data as data_mod
    from runner.data import inspection as inspect_mod

    recipe = recipes.load(TINY)
    rows = [{"id": str(i), "document": "Storms closed roads in the north.", "summary": "Storms."} for i in range(5)]
    rows.append({"id": "huge", "document": "word " * 6_000_000, "summary": "Long."})
    counting = CountingTokenizer(tiny_tokenizer)
    stats, _ = inspect_mod.inspect_split(Dataset.from_list(rows), recipe, counting, "train")
    cap = data_mod.char_cap(tiny_tokenizer, recipe["prompt"]["max_length"])
    assert counting.longest < 3 * cap
    assert stats["cut_before_tokenizing"] == {"values": 1, "characters": cap}
    assert stats["truncated"] == 1 and stats["kept"] == 6
    assert stats["lengths"]["{document}"]["max"] >= 2 * recipe["prompt"]["max_length"]  # a lower bound, and shown
    assert "lower bounds" in inspect_mod.table({**json.loads(json.dumps({"recipe": "r", "tokenizer": "t",
                                                                           "max_length": 128, "max_tokens": 128,
                                                                           "truncate": "document"})),
                                                "splits": {"train": stats}})


def test_dump_of_a_recipe_round_trips_through_the_bounded_loader():
    recipe = recipes.load(TINY)
    assert loader.parse_yaml(recipe_mod.dump(recipe), "x") == yaml.safe_load(recipe_mod.dump(recipe))


def test_a_native_writer_failing_on_a_full_disk_is_named_so(tmp_path, monkeypatch):
    """torch.save on a full disk says only "[enforce fail at inline_container.cc] unexpected pos": the folder
    being written tells whether the disk is full."""
    import shutil
    from collections import namedtuple

    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 163648 vs 163540")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(600 * 1024, 600 * 1024 - 100, 100))
    err = errors.classify(exc, [tmp_path])
    assert err.exit_code == 1 and err.key_path == str(tmp_path) and "no space left on the device" in err.problem
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**40, 2**30, 2**40 - 2**30))
    err = errors.classify(exc, [tmp_path])
    assert err.exit_code == 1 and err.problem.startswith("writing a file failed: ") and "disk" in err.hint
