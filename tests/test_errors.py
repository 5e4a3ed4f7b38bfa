"""Every mistake a user can make in a recipe ends in one line `error: <key.path>: ...`, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from runner.recipe import validation, wording
from tests.conftest import ROOT

TINY_RECIPE = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


def write_recipe(tmp_path: Path, tiny: Path, edit=None, text: str | None = None) -> Path:
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe["model"]["name_or_path"] = str(tiny / "phi")
    recipe["data"]["source"] = {k: str(tiny / "data" / "xsum_tiny" / f"{s}.jsonl")
                                for k, s in (("train", "train"), ("eval", "validation"), ("test", "test"))}
    recipe["output_dir"] = str(tmp_path / "runs")
    if edit:
        edit(recipe)
    path = tmp_path / "recipe.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(recipe, sort_keys=False))
    return path


def assert_user_error(result, key_path: str, *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {key_path}: "), lines[0]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(tmp_path: Path):
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(p for p in runs.rglob("*") if p.is_file()), list(runs.rglob("*"))


@pytest.mark.parametrize("command", ["validate", "train"])
def test_unknown_key_suggests_the_right_one(tmp_path, tiny, cli, command):
    path = write_recipe(tmp_path, tiny, lambda r: r["training"].update(learning_rat=1e-4))
    line = assert_user_error(cli(command, path), "training.learning_rat", "unknown key", "did you mean 'learning_rate'")
    assert line.endswith(")")
    assert_nothing_written(tmp_path)


def test_unknown_top_level_key(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r.update(evalution={"split": "test"}))
    assert_user_error(cli("train", path), "evalution", "did you mean 'evaluation'")


def test_a_section_key_given_at_the_top_names_its_section(cli):
    """`max_steps=5` on the command line: the key exists, in training; the hint says where (issue 24)."""
    assert_user_error(cli("validate", "recipes/tiny/xsum_tiny.yaml", "max_steps=5"), "max_steps", "unknown key",
                      "(did you mean training.max_steps?)")


def test_a_section_key_written_at_the_top_of_a_recipe_file_names_its_section(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r.update(learning_rate=1e-4))
    assert_user_error(cli("validate", path), "learning_rate", "unknown key", "(did you mean training.learning_rate?)")


def test_a_top_level_key_of_several_sections_lists_them(monkeypatch):
    """No key of today's schema is in two sections; should one be, the hint names each place it could go."""
    monkeypatch.setattr(wording, "sections_with", lambda key: ["data", "training"])
    assert wording._unknown_key_hint("seed", ["model"], top=True) == "did you mean data.seed or training.seed?"
    monkeypatch.setattr(wording, "sections_with", lambda key: ["data", "lora", "training"])
    assert wording._unknown_key_hint("r", ["model"], top=True) == "did you mean data.r, lora.r or training.r?"


def test_an_evaluators_unknown_key_is_not_sent_to_a_recipe_section(tmp_path, tiny, cli):
    """An evaluator's own keys are checked against its params_schema, whose top is not the recipe's: a key named
    like a recipe section's (max_steps) gets the evaluator's allowed keys, not training.max_steps."""
    path = write_recipe(tmp_path, tiny, lambda r: r["evaluation"]["evaluators"][0].update(max_steps=3))
    line = assert_user_error(cli("validate", path), "evaluation.evaluators[0].max_steps", "unknown key")
    assert "training." not in line


def test_wrong_type(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r["training"].update(micro_batch_size="four"))
    assert_user_error(cli("train", path), "training.micro_batch_size", "expected integer", "'four'")
    assert_nothing_written(tmp_path)


def test_value_out_of_range(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r["lora"].update(dropout=1.5))
    assert_user_error(cli("train", path), "lora.dropout", "out of range", "< 1")


def test_bad_enum_value_suggests(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r["quantization"].update(quant_type="nf5"))
    assert_user_error(cli("train", path), "quantization.quant_type", "did you mean 'nf4'")


def test_missing_required_key(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r["prompt"].pop("completion"))
    assert_user_error(cli("train", path), "prompt.completion", "missing required key")
    assert_nothing_written(tmp_path)


# `runner validate` checks what it can read without loading anything: the same line as train's, seconds earlier.
VALIDATE_AND_TRAIN = ["validate", pytest.param("train", marks=pytest.mark.slow)]


@pytest.mark.parametrize("command", VALIDATE_AND_TRAIN)
def test_template_field_not_in_columns(tmp_path, tiny, cli, command):
    def edit(r):
        r["prompt"]["template"] = "Article: {documnt}\nSummary:"
        r["prompt"]["truncate"] = "documnt"
    path = write_recipe(tmp_path, tiny, edit)
    assert_user_error(cli(command, path), "prompt.template", "{documnt}", "not a column of the train data",
                      "did you mean {document}")
    assert_nothing_written(tmp_path)


def test_validate_reads_the_columns_of_every_split_and_format(tmp_path, tiny, cli):
    """A CSV's header, and the test file's columns too: validate names the split whose file lacks the field."""
    csv = tmp_path / "test.csv"
    csv.write_text("\ufeffdocument,summry\n\"a, b\",c\n")
    path = write_recipe(tmp_path, tiny, lambda r: r["data"]["source"].update(test=str(csv)))
    assert_user_error(cli("validate", path), "prompt.completion", "{summary} is not a column of the test data",
                      "did you mean {summry}")


def test_validate_checks_each_mixture_source_s_columns(tmp_path, tiny, cli):
    briefs = tmp_path / "briefs.jsonl"
    briefs.write_text('{"text": "a", "headline": "b"}\n')

    def edit(r):
        xsum = r["data"].pop("source")
        r["data"]["sources"] = [{"source": xsum}, {"source": str(briefs), "fields": {"document": "body"}}]
    path = write_recipe(tmp_path, tiny, edit)
    assert_user_error(cli("validate", path), "data.sources[1].fields.document", "'body' is not a column of briefs")


@pytest.mark.slow
def test_lora_target_the_architecture_lacks(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r["lora"].update(target_modules=["q_proj", "o_proj"]))
    line = assert_user_error(cli("train", path), "lora.target_modules[1]", "'o_proj'", "dense")
    assert "phi" in line
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("completion", ["", "   "])
def test_empty_completion(tmp_path, tiny, cli, completion):
    path = write_recipe(tmp_path, tiny, lambda r: r["prompt"].update(completion=completion))
    assert_user_error(cli("validate", path), "prompt.completion", "empty")


def test_completion_without_a_field(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r["prompt"].update(completion=" done"))
    assert_user_error(cli("validate", path), "prompt.completion", "no dataset field")


@pytest.mark.slow
def test_unreadable_data_file(tmp_path, tiny, cli):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"document": "a", "summary": "b"}\n{"document": "unterminated\n')
    path = write_recipe(tmp_path, tiny, lambda r: r["data"].update(source={"train": str(bad)},
                                                                     holdout={"eval": 0, "test": 1}))
    assert_user_error(cli("train", path), "data.source.train", "cannot read broken.jsonl", "line 2")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("command", VALIDATE_AND_TRAIN)
def test_missing_data_file(tmp_path, tiny, cli, command):
    path = write_recipe(tmp_path, tiny, lambda r: r["data"]["source"].update(test=str(tmp_path / "nope.jsonl")))
    assert_user_error(cli(command, path), "data.source.test", "file not found", "nope.jsonl")
    assert_nothing_written(tmp_path)


def test_yaml_syntax_error_names_the_line(tmp_path, tiny, cli):
    text = "name: broken\nmodel:\n  name_or_path: x\n  dtype: [auto\ndata:\n  source: a.jsonl\n"
    path = write_recipe(tmp_path, tiny, text=text)
    line = assert_user_error(cli("validate", path), str(path), "YAML syntax error at line")
    assert "line 5" in line or "line 4" in line


@pytest.mark.parametrize("command", VALIDATE_AND_TRAIN)
def test_missing_local_model_folder(tmp_path, tiny, cli, command):
    """Not transformers' "Repo id must be in the form ...": the path is local, and it is not there."""
    path = write_recipe(tmp_path, tiny)
    assert_user_error(cli(command, path, "model.name_or_path=./no-model", cwd=tmp_path), "model.name_or_path",
                      f"local folder not found: {tmp_path / 'no-model'}", "relative to")
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_model_that_cannot_be_loaded(tmp_path, tiny, cli):
    (tmp_path / "no-model").mkdir()
    path = write_recipe(tmp_path, tiny, lambda r: r["model"].update(name_or_path=str(tmp_path / "no-model")))
    assert_user_error(cli("train", path), "model.name_or_path", "cannot load", "config.json")
    assert_nothing_written(tmp_path)


def test_validate_wants_a_local_model_folder_with_its_config(tmp_path, tiny, cli):
    (tmp_path / "no-model").mkdir()
    path = write_recipe(tmp_path, tiny, lambda r: r["model"].update(name_or_path=str(tmp_path / "no-model")))
    assert_user_error(cli("validate", path), "model.name_or_path", "has no config.json", "save_pretrained")


def test_validate_leaves_hub_ids_to_loading(tmp_path, tiny, cli):
    """Offline, a hub id cannot be checked: validate passes it (train reports it if it cannot be loaded)."""
    path = write_recipe(tmp_path, tiny, lambda r: r["model"].update(name_or_path="someone/some-model"))
    result = cli("validate", path)
    assert result.returncode == 0, result.stderr
    assert "someone/some-model" in result.stdout


def test_bad_override_syntax(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny)
    assert_user_error(cli("validate", path, "training.max_steps"), "training.max_steps", "key.path=value")
    assert_user_error(cli("validate", path, "training.max_step=5"), "training.max_step", "did you mean 'max_steps'")


def test_quantized_model_needs_lora(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r.update(lora=None))
    assert_user_error(cli("validate", path), "lora", "quantized")


def test_extends_cycle(tmp_path, cli):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    assert_user_error(cli("validate", tmp_path / "a.yaml"), "extends", "cycle")


def test_unknown_evaluator(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r["evaluation"].update(evaluators=[{"name": "rogue"}]))
    assert_user_error(cli("validate", path), "evaluation.evaluators[0].name", "did you mean 'rouge'")


def test_wrong_evaluator_parameter(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, lambda r: r["evaluation"].update(
        evaluators=[{"name": "rouge"}, {"name": "samples", "cuont": 3}]))
    assert_user_error(cli("validate", path), "evaluation.evaluators[1].cuont", "did you mean 'count'")


def test_eval_of_a_folder_without_adapter(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny)
    assert_user_error(cli("eval", path, "--run", tmp_path), "--run", "no trained adapter")


@pytest.mark.parametrize(("override", "key_path", "example", "as_list"), [
    ("lora.target_modules=q_proj,v_proj", "lora.target_modules", "e.g. q_proj) to adapt", "[q_proj,v_proj]"),
    ("lora.modules_to_save=lm_head", "lora.modules_to_save", "e.g. lm_head, embed_tokens)", "[lm_head]"),
    ("generation.stop=x", "generation.stop", 'e.g. ["\\n"] for one-line answers', "[x]"),
])
def test_a_list_given_as_text_is_shown_as_a_list(tmp_path, tiny, cli, override, key_path, example, as_list):
    line = assert_user_error(cli("validate", write_recipe(tmp_path, tiny), override), key_path, example,
                             f"a list is written in brackets: {as_list})")
    assert line.endswith(")")


def _descriptions(node, path=""):
    if isinstance(node, dict):
        if isinstance(node.get("description"), str):
            yield path, node
        for key, value in node.items():
            yield from _descriptions(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _descriptions(value, f"{path}[{i}]")


@pytest.mark.parametrize(("path", "node"), list(_descriptions(validation.schema())), ids=lambda v: v if
                         isinstance(v, str) else "")
def test_every_key_hint_is_a_whole_sentence(path, node):
    """The hint of an error is the first sentence of the key's schema description: never cut at "e.g." or inside
    brackets."""
    hint = wording._describe(node)
    assert hint and not hint.endswith(wording._ABBREVIATIONS), hint
    for open_, close in ("()", "[]", "{}"):
        assert hint.count(open_) == hint.count(close), hint
    assert node["description"].startswith(hint)


@pytest.mark.parametrize("command", ["validate", "train"])
def test_extends_as_an_override_is_refused(tmp_path, tiny, cli, command):
    """extends is read with the file, before overrides apply: as an override it was silently ignored."""
    path = write_recipe(tmp_path, tiny)
    args = (command, path, "extends=does_not_exist.yaml", "training.max_steps=1", *(["--no-eval"] * (command == "train")))
    assert_user_error(cli(*args), "extends", "only be written in the recipe file", "add extends:")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(("where", "what"), [("folder", "is a directory, not a file"),
                                             ("/dev/null", "is not a regular file")])
def test_recipe_path_that_is_no_file(tmp_path, cli, where, what):
    path = tmp_path if where == "folder" else Path(where)
    assert_user_error(cli("validate", path), str(path), what, "give the recipe's YAML file")


def test_recipe_of_several_yaml_documents(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny)
    path.write_text(path.read_text() + "---\nname: second\n")
    line = assert_user_error(cli("validate", path), str(path), "a second YAML document starts at line",
                             "a recipe is one YAML document")
    assert "indentation" not in line


def test_unknown_evaluator_without_a_close_name(tmp_path, tiny, cli):
    line = assert_user_error(cli("validate", write_recipe(tmp_path, tiny), "evaluation.evaluators[0].name=nope"),
                             "evaluation.evaluators[0].name", "'nope' is not allowed")
    assert line.endswith("multiple_choice; or give your own as package.module:ClassName)"), line


@pytest.mark.parametrize("name", ["..", ".", ".hidden"])
def test_name_of_dots_says_why(tmp_path, tiny, cli, name):
    assert_user_error(cli("validate", write_recipe(tmp_path, tiny), f"name={name}"), "name",
                      f"{name!r} must start with a letter or digit", "so not '.', '..' or a hidden folder")


@pytest.mark.slow
def test_data_file_that_is_no_file_or_has_no_rows(tmp_path, tiny, cli):
    header_only = tmp_path / "empty.csv"
    header_only.write_text("document,summary\n")
    for source, what in ((tmp_path, "is a directory, not a file"), ("/dev/null", "is not a regular file"),
                         (header_only, "empty.csv has no rows")):
        path = write_recipe(tmp_path, tiny, lambda r, s=source: r["data"]["source"].update(train=str(s)))
        line = assert_user_error(cli("train", path, "--no-eval"), "data.source.train", what)
        assert "corresponds to no data" not in line and "not found" not in line
        assert_nothing_written(tmp_path)


def assert_environment_error(result, key_path: str, *words: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key_path}: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(("override", "key_path", "instead"), [
    ("data.source=qlora-recipes-tests/never-cached", "data.source", "point data.source at local files"),
    ("model.name_or_path=qlora-recipes-tests/never-cached", "model.name_or_path", "use a local directory")])
def test_hub_out_of_reach_is_the_machines_problem(tmp_path, tiny, cli, override, key_path, instead):
    """The tests run with HF_HUB_OFFLINE=1 (cli_env): a hub id not in the cache cannot be loaded, exit 1."""
    result = cli("train", write_recipe(tmp_path, tiny), override, "training.max_steps=1", "--no-eval")
    assert_environment_error(result, key_path, "cannot reach the Hugging Face hub", "HF_HUB_OFFLINE is set", instead)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("command", ["validate", "train"])
def test_holdout_rows_for_a_null_split_are_refused_before_training(tmp_path, tiny, cli, command):
    """data.holdout carves rows only for a named split: with data.splits.test null it gave no test rows, and train
    trained, saved the adapter, then failed in evaluation as an internal KeyError: 'test'."""
    source = tiny / "data" / "xsum_tiny" / "train.jsonl"
    assert source.is_file()
    result = cli(command, TINY_RECIPE, f"data.source={source}", "data.splits.test=null", "data.holdout.test=8",
                 f"output_dir={tmp_path / 'runs'}", "training.max_steps=1")
    assert_user_error(result, "data.holdout.test", "data.splits.test is null")
    assert_nothing_written(tmp_path)
