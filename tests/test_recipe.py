"""Recipes: every bundled YAML validates; extends, overrides, defaults and paths resolve as documented."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from runner.cli import recipes, sweep
from runner.common.errors import RecipeError
from runner.recipe import compose, loader, validation
from runner.recipe import recipe as recipe_mod
from tests.conftest import ROOT, cli_env

BUNDLED = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_bundled_recipes_exist():
    names = {p.name for p in BUNDLED}
    assert {"xsum_phi2.yaml", "xsum_tiny.yaml"} <= names


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bundled_recipe_validates(path):
    recipe = recipes.load(path)
    assert recipe["name"]
    assert recipe["evaluation"]["evaluators"]
    # The resolved recipe is complete: validating it again changes nothing.
    assert recipes.validate(yaml.safe_load(recipe_mod.dump(recipe))) == recipe


def test_xsum_phi2_has_the_study_settings():
    r = recipes.load(ROOT / "recipes" / "xsum_phi2.yaml")
    assert r["model"]["name_or_path"] == "microsoft/phi-2"
    assert r["data"]["source"] == "EdinburghNLP/xsum"
    assert r["quantization"] == {"method": "bnb_4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}
    assert (r["lora"]["r"], r["lora"]["alpha"]) == (16, 32)
    assert r["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "dense"]
    assert r["data"]["train_samples"] == 5000 and r["data"]["max_tokens"] == 512
    assert r["prompt"]["max_length"] == 512 and r["prompt"]["truncate"] == "document"
    assert r["prompt"]["template"].startswith(
        "Instruction: Summarize the following news article in a concise and abstractive way.\nArticle: {document}")
    assert r["prompt"]["template"].endswith("Summary:")
    t = r["training"]
    assert (t["epochs"], t["optimizer"], t["gradient_checkpointing"]) == (1, "paged_adamw_8bit", True)
    g = r["generation"]
    assert g["do_sample"] and g["top_p"] < 1 and g["repetition_penalty"] > 1
    assert [e["name"] for e in r["evaluation"]["evaluators"]] == ["rouge", "samples"]


def test_defaults_are_filled_from_the_schema(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {source: d.jsonl}\nprompt: {template: 'Q: {q}', completion: ' {a}'}\n")
    r = recipes.load(path)
    assert r["name"] == "r"
    assert r["seed"] == 42 and r["training"]["learning_rate"] == 2e-4
    assert r["quantization"]["method"] == "none" and r["lora"] is None
    assert r["evaluation"]["evaluators"] == [{"name": "samples", "count": 8, "input_chars": 300}]
    assert r["data"]["source"] == str(tmp_path / "d.jsonl")  # relative to the recipe file
    assert r["model"]["name_or_path"] == "m"  # not a path: a hub id


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "name": "base", "model": {"name_or_path": "./model"}, "data": {"source": "train.jsonl"},
        "prompt": {"template": "{x}", "completion": " {y}"},
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "training": {"epochs": 3}}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(yaml.safe_dump({
        "extends": "../base.yaml", "lora": {"target_modules": ["dense"]}, "training": {"max_steps": 7}}))
    r = recipes.load(tmp_path / "sub" / "child.yaml")
    assert r["name"] == "child"
    assert r["lora"]["r"] == 8 and r["lora"]["target_modules"] == ["dense"]
    assert r["training"]["epochs"] == 3 and r["training"]["max_steps"] == 7
    assert r["model"]["name_or_path"] == str(tmp_path / "model")  # relative to the file that set it


def test_overrides_parse_values_as_yaml_and_index_lists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = recipes.load(ROOT / "recipes" / "xsum_phi2.yaml", [
        "training.max_steps=5", "training.packing=true", "lora.target_modules=[q_proj, dense]",
        "evaluation.evaluators[1].count=3", "data.source=mine.jsonl", "generation.top_k=null", "name=other"])
    assert r["training"]["max_steps"] == 5 and r["training"]["packing"] is True
    assert r["lora"]["target_modules"] == ["q_proj", "dense"]
    assert r["evaluation"]["evaluators"][1]["count"] == 3
    assert r["data"]["source"] == str(tmp_path / "mine.jsonl")  # relative to where the command runs
    assert r["name"] == "other"


def test_override_past_the_end_of_a_list_is_an_error():
    with pytest.raises(RecipeError) as err:
        recipes.load(ROOT / "recipes" / "xsum_phi2.yaml", ["evaluation.evaluators[5].count=3"])
    assert err.value.key_path == "evaluation.evaluators[5]"


def test_cross_checks():
    base = recipes.load(ROOT / "recipes" / "xsum_phi2.yaml")
    raw = yaml.safe_load(recipe_mod.dump(base))
    raw["prompt"]["truncate"] = "summary"
    with pytest.raises(RecipeError, match="not a field of prompt.template"):
        recipes.validate(raw)
    raw = yaml.safe_load(recipe_mod.dump(base))
    raw["data"]["splits"]["eval"] = None
    with pytest.raises(RecipeError) as err:
        recipes.validate(raw)
    assert err.value.key_path == "training.eval_every"


@pytest.mark.parametrize("name", ["xsum_phi2", "tiny/xsum_tiny", "tiny/chat_tiny"])
def test_validate_imports_neither_torch_nor_transformers(name, tiny):
    """Also where it reads the local data's columns and looks for the local model's folder."""
    code = (f"import sys; from runner.cli.cli import main; rc = main(['validate', 'recipes/{name}.yaml']); "
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'trl', 'peft') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert f"ok: recipes/{name}.yaml -> {name.split('/')[-1]}" in out.stdout


def test_validate_print_saves_a_recipe_that_validates_again(tmp_path):
    """`validate --print > r.yaml` is a recipe: stdout holds the YAML alone, the ok line goes to stderr."""
    printed = subprocess.run([sys.executable, "-m", "runner", "validate", "recipes/tiny/xsum_tiny.yaml", "--print"],
                             capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert printed.returncode == 0, printed.stderr
    assert printed.stderr.startswith("ok: recipes/tiny/xsum_tiny.yaml -> xsum_tiny")
    saved = tmp_path / "r.yaml"
    saved.write_text(printed.stdout)
    again = subprocess.run([sys.executable, "-m", "runner", "validate", str(saved)], capture_output=True, text=True,
                           cwd=ROOT, env=cli_env())
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"ok: {saved} -> xsum_tiny")  # without --print, the ok line stays on stdout


def _extend(tmp_path, parent: dict, child: dict) -> dict:
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(parent))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"extends": "parent.yaml", **child}))
    return recipes.load(tmp_path / "child.yaml")


PARENT = {"model": {"name_or_path": "m"}, "prompt": {"template": "{x}", "completion": " {y}"},
          "data": {"source": {"train": "p_train.jsonl", "eval": "p_eval.jsonl", "test": "p_test.jsonl"}},
          "training": {"learning_rate": 0.5, "eval_every": 10}}


def test_extends_replaces_data_source_as_a_whole(tmp_path):
    """The issue's case: a child naming its own train and test files does not keep the parent's eval file."""
    r = _extend(tmp_path, PARENT, {"data": {"source": {"train": "a.csv", "test": "b.jsonl"}},
                                   "training": {"eval_every": None}})
    assert r["data"]["source"] == {"train": str(tmp_path / "a.csv"), "test": str(tmp_path / "b.jsonl")}
    assert r["data"]["splits"]["eval"] is None  # no eval file: the role is unused


def test_extends_null_removes_an_inherited_key_unless_null_is_its_value(tmp_path):
    r = _extend(tmp_path, PARENT, {"data": {"source": {"train": "a.csv", "eval": None, "test": "b.jsonl"}},
                                   "training": {"learning_rate": None, "eval_every": None}})
    assert "eval" not in r["data"]["source"]  # was a one-line error: eval is a file name, never null
    assert r["training"]["learning_rate"] == validation.schema()["properties"]["training"]["properties"][
        "learning_rate"]["default"]  # removed: the default applies
    assert r["training"]["eval_every"] is None  # null is a value here ("no eval loss"): kept
    r = _extend(tmp_path, {**PARENT, "data": {"source": "d.jsonl", "splits": {"eval": "validation"}}},
                {"data": {"splits": {"eval": None}}, "training": {"eval_every": None}})
    assert r["data"]["splits"]["eval"] is None  # "no eval split", not the default "validation"


def _validate_print(*args) -> dict:
    """The resolved recipe `runner validate --print` shows (the ok line after it dropped)."""
    out = subprocess.run([sys.executable, "-m", "runner", "validate", *map(str, args), "--print"], capture_output=True,
                         text=True, cwd=ROOT, env=cli_env())
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout.rsplit("\nok: ", 1)[0])


def test_numbers_with_an_exponent_and_no_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-4 as text; recipes, overrides and sweep axes read it as the number it is."""
    text = (ROOT / "recipes" / "tiny" / "xsum_tiny.yaml").read_text().replace("learning_rate: 5.0e-3",
                                                                               "learning_rate: 5e-3")
    (tmp_path / "r.yaml").write_text(text.replace("../../.cache", str(ROOT / ".cache")))
    assert _validate_print(tmp_path / "r.yaml")["training"]["learning_rate"] == 5e-3
    r = _validate_print(tmp_path / "r.yaml", "training.learning_rate=1e-4", "training.warmup_ratio=5E-2",
                        "training.epochs=1e1")
    assert (r["training"]["learning_rate"], r["training"]["warmup_ratio"], r["training"]["epochs"]) == (1e-4, .05, 10)
    _, cells, _, _ = sweep.cells(tmp_path / "r.yaml", ["training.learning_rate=1e-4,2e-4"], 1)
    assert [c.recipe["training"]["learning_rate"] for c in cells] == [1e-4, 2e-4]


def test_text_keys_keep_exponent_like_text(tmp_path):
    """Where the schema wants text, `1e3` stays the text written (as YAML 1.1 read it), and the saved recipe quotes
    it, so a resume reads back the same recipe."""
    r = recipes.load(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml", ["name=1e3", "generation.stop=[2E5]"])
    assert r["name"] == "1e3" and r["generation"]["stop"] == ["2E5"]
    assert loader.parse_yaml(recipe_mod.dump(r), "recipe.yaml") == r
    with pytest.raises(RecipeError) as err:  # an integer key is not given a float, as 5.0 is not
        recipes.load(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml", ["training.max_steps=1e3"])
    assert (err.value.key_path, err.value.problem) == ("training.max_steps", "expected integer or null, got number 1000.0")


def test_null_override_removes_a_key_so_data_source_can_become_sources(tmp_path):
    """`key=null` removes a key null is not a value of, as `key: null` in an extending recipe: the way from
    data.source to data.sources on the command line."""
    files = {role: str(ROOT / ".cache" / "tiny" / "data" / "xsum_tiny" / f"{split}.jsonl")
             for role, split in (("train", "train"), ("eval", "validation"), ("test", "test"))}
    r = _validate_print(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml", "data.source=null",
                        f"data.sources=[{{source: {json.dumps(files)}, weight: 2}}]", "training.learning_rate=null")
    assert "source" not in r["data"]
    assert r["data"]["sources"][0]["source"] == files and r["data"]["sources"][0]["weight"] == 2
    assert r["training"]["learning_rate"] == 2e-4  # removed: the default applies
    r = _validate_print(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml", "training.eval_every=null", "lora=null",
                        "quantization.method=none")
    assert r["training"]["eval_every"] is None and r["lora"] is None  # null is a value of these: kept


# ---------------------------------------------------------------- validation reads, never writes


def _typed(value):
    """``value`` with each leaf's type beside it (an exponent number turned into a plain float is a change)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


def _unsettled(resolved: dict) -> dict:
    """A resolved recipe whose data.splits name every role again, as a file would before used_splits decides."""
    probe = copy.deepcopy(resolved)
    probe["data"]["splits"] = {"train": "train", "eval": "validation", "test": "test"}
    return probe


def _checks_write_nothing(resolved: dict) -> None:
    probe = _unsettled(resolved)
    before = copy.deepcopy(probe)
    for check in recipes.CHECKS:
        check(probe)
    assert _typed(probe) == _typed(before)


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: str(p.relative_to(ROOT)))
def test_validation_leaves_the_recipe_it_is_given_as_it_was(path):
    """The study recipes and their tiny twins: validate fills a copy; the checks only read."""
    raw = compose.compose(path, ["training.learning_rate=1e-4"])  # an exponent number, as a command line writes it
    raw["name"] = "r"
    before = copy.deepcopy(raw)
    resolved = recipes.validate(raw)
    assert _typed(raw) == _typed(before)
    assert resolved["training"]["learning_rate"] == 1e-4 and type(resolved["training"]["learning_rate"]) is float
    _checks_write_nothing(resolved)


@pytest.mark.parametrize("data", [
    {"source": {"train": "a.jsonl", "test": "b.jsonl"}},
    {"sources": [{"source": {"train": "a.jsonl"}}, {"source": {"train": "b.jsonl", "test": "c.jsonl"}}]},
], ids=["files", "mixture"])
def test_splits_no_file_provides_are_null_in_the_result_only(data):
    """A role no file provides is unused (null) in the resolved recipe; neither the recipe given nor a check
    writes that."""
    raw = {"name": "r", "model": {"name_or_path": "m"}, "prompt": {"template": "{x}", "completion": " {y}"},
           "data": {**data, "splits": {"eval": "validation"}}, "training": {"eval_every": None},
           "evaluation": {"split": "test"}}
    before = copy.deepcopy(raw)
    resolved = recipes.validate(raw)
    assert raw == before
    assert resolved["data"]["splits"] == {"train": "train", "eval": None, "test": "test"}
    _checks_write_nothing(resolved)
