"""Data: local formats, splits and holdout, reproducible sampling, label names, token truncation, drop counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.data import data as data_mod
from runner.recipe import compose


def make_recipe(tmp_path: Path, source, **sections) -> dict:
    raw = {"model": {"name_or_path": "unused"}, "data": {"source": source, "eval_samples": None,
                                                           "test_samples": None},
           "prompt": {"template": "Article: {document}\nSummary:", "completion": " {summary}",
                      "max_length": 64, "truncate": "document"},
           "evaluation": {"split": "test"}}
    for key, value in sections.items():
        raw[key] = compose.deep_merge(raw.get(key, {}), value)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return recipes.load(path)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(n, words=5):
    return [{"id": i, "document": " ".join(f"word{i}x{j}" for j in range(words)), "summary": f"sum {i}"}
            for i in range(n)]


def test_truncation_shortens_the_named_field_in_tokens_and_keeps_the_completion(tmp_path, tokenizer):
    long_doc = " ".join(["The council met again today to discuss the plans"] * 30)
    src = write_jsonl(tmp_path / "d.jsonl", [{"document": long_doc, "summary": "Council meets again."},
                                             {"document": "Short one.", "summary": "Short."}])
    recipe = make_recipe(tmp_path, str(src), data={"splits": {"eval": None, "test": None}},
                         evaluation={"split": "train"})
    prepared = data_mod.prepare(recipe, tokenizer, roles=("train",))
    ds = prepared.splits["train"]
    assert len(ds) == 2
    long_row = ds[[i for i, c in enumerate(ds["completion"]) if "Council" in c][0]]
    assert long_row["truncated"] is True
    assert long_row["completion"] == " Council meets again."
    assert long_row["prompt"].startswith("Article: The council met") and long_row["prompt"].endswith("\nSummary:")
    total = len(tokenizer(long_row["prompt"] + long_row["completion"])["input_ids"]) + 1
    assert total == long_row["n_tokens"] <= 64
    assert total >= 60  # cut to fit, not far below the budget
    assert prepared.stats["train"]["truncated"] == 1


def test_examples_that_cannot_fit_are_dropped_and_counted(tmp_path, tokenizer):
    huge_summary = " ".join(["word"] * 200)
    src = write_jsonl(tmp_path / "d.jsonl", [{"document": "a b c", "summary": huge_summary},
                                             {"document": "d e f", "summary": "ok"},
                                             {"document": "g h i", "summary": ""}])
    recipe = make_recipe(tmp_path, str(src), data={"splits": {"eval": None, "test": None}},
                         evaluation={"split": "train"})
    prepared = data_mod.prepare(recipe, tokenizer, roles=("train",))
    assert prepared.stats["train"] == {"rows": 3, "kept": 1, "truncated": 0, "dropped_too_long": 1,
                                       "dropped_empty_completion": 1}
    assert "1 dropped as too long" in data_mod.describe(prepared.stats)


def test_max_tokens_drops_what_is_longer_after_truncation(tmp_path, tokenizer):
    short = [{"id": i, "document": "The council met.", "summary": "Council met."} for i in range(4)]
    src = write_jsonl(tmp_path / "d.jsonl", short + [{"id": 9, "document": " ".join(["x"] * 100), "summary": "long"}])
    recipe = make_recipe(tmp_path, str(src), data={"splits": {"eval": None, "test": None}, "max_tokens": 30},
                         evaluation={"split": "train"})
    recipe["prompt"]["truncate"] = None
    prepared = data_mod.prepare(recipe, tokenizer, roles=("train",))
    assert prepared.stats["train"]["dropped_too_long"] == 1
    assert all(n <= 30 for n in prepared.splits["train"]["n_tokens"])


def test_sampling_is_reproducible_from_the_seed(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(50))
    recipe = make_recipe(tmp_path, str(src), data={"splits": {"eval": None, "test": None}, "train_samples": 10},
                         evaluation={"split": "train"})
    first = data_mod.sample(data_mod.load_raw(recipe), recipe)["train"]["id"]
    again = data_mod.sample(data_mod.load_raw(recipe), recipe)["train"]["id"]
    recipe["seed"] = 7
    other = data_mod.sample(data_mod.load_raw(recipe), recipe)["train"]["id"]
    assert first == again and len(first) == 10
    assert first != other


def test_holdout_carves_disjoint_eval_and_test_rows(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(30))
    recipe = make_recipe(tmp_path, str(src), data={"holdout": {"eval": 5, "test": 7}})
    raw = data_mod.load_raw(recipe)
    ids = {role: set(ds["id"]) for role, ds in raw.items()}
    assert (len(ids["train"]), len(ids["eval"]), len(ids["test"])) == (18, 5, 7)
    assert not (ids["train"] & ids["eval"]) and not (ids["train"] & ids["test"]) and not (ids["eval"] & ids["test"])


def test_missing_split_without_holdout_is_a_clear_error(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", rows(5))
    recipe = make_recipe(tmp_path, str(src))
    with pytest.raises(RecipeError) as err:
        data_mod.load_raw(recipe)
    assert err.value.key_path == "data.splits.eval" and "data.holdout.eval" in err.value.hint


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_local_formats(tmp_path, tokenizer, fmt):
    import pandas as pd

    frame = pd.DataFrame(rows(6))
    path = tmp_path / f"d.{fmt}"
    {"csv": lambda: frame.to_csv(path, index=False), "parquet": lambda: frame.to_parquet(path),
     "json": lambda: path.write_text(json.dumps(rows(6)))}[fmt]()
    recipe = make_recipe(tmp_path, str(path), data={"splits": {"eval": None, "test": None}},
                         evaluation={"split": "train"})
    ds = data_mod.prepare(recipe, tokenizer, roles=("train",)).splits["train"]
    assert len(ds) == 6 and ds["completion"][0].startswith(" sum ")


def test_class_label_integers_become_names(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    ds = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]},
                           features=Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])}))
    recipe = make_recipe(tmp_path, "x.jsonl")
    assert data_mod.name_labels(ds, recipe)["label"] == ["neg", "pos"]
    plain = Dataset.from_dict({"text": ["a", "b"], "gold": [1, 0]})
    recipe["data"]["label_names"] = {"gold": ["no", "yes"]}
    assert data_mod.name_labels(plain, recipe)["gold"] == ["yes", "no"]


def test_examples_without_a_gold_label_are_dropped_and_counted(tmp_path, tokenizer):
    from datasets import ClassLabel, Dataset, Features, Value

    ds = Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, -1, 1]},
                           features=Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])}))
    recipe = make_recipe(tmp_path, "x.jsonl", data={"splits": {"eval": None, "test": None}},
                         evaluation={"split": "train"})
    recipe["prompt"].update(template="Text: {text}\nLabel:", completion=" {label}", truncate="text")
    prepared = data_mod.prepare(recipe, tokenizer, roles=("train",), raw={"train": ds})
    assert prepared.splits["train"]["completion"] == [" neg", " pos"]
    assert prepared.stats["train"]["dropped_empty_completion"] == 1


def test_list_fields_render_joined_and_missing_values_render_empty():
    assert data_mod.render("Labels: {labels}; {extra}", {"labels": ["joy", "love"], "extra": None}) == \
        "Labels: joy, love; "
