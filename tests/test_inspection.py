"""`runner inspect`: token-length statistics against a direct computation, truncation and drop counts equal to
what training will do, label counts, the 95% length, the cache, and the command's table, JSON and PNGs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from runner.cli import recipes
from runner.data import data as data_mod
from runner.data import inspection as inspect_mod

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def write_csv(path, n=60):
    rng = np.random.default_rng(0)
    words = "the match the market the rocket the vote a team a bank a chip a leader won fell rose said".split()
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            length = 3 + (i * 7) % 40  # from short to longer than max_length
            writer.writerow([" ".join(rng.choice(words, length)), LABELS[i % 4] if i % 5 else "Sports"])
    return path


def write_recipe(tmp_path, tiny, **prompt):
    recipe = {
        "model": {"name_or_path": str(tiny / "phi")},
        "data": {"source": str(write_csv(tmp_path / "news.csv")), "holdout": {"test": 12},
                 "splits": {"eval": None}, "max_tokens": 30},
        "prompt": {"template": "Text: {text}\nTopic:", "completion": " {label}", "max_length": 40,
                   "truncate": "text", **prompt},
        "evaluation": {"evaluators": [{"name": "classification", "labels": LABELS}]},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "news.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def setup(tmp_path, tiny):
    from runner.model import model as model_mod

    recipe = recipes.load(write_recipe(tmp_path, tiny))
    return recipe, model_mod.load_tokenizer(recipe)


def test_keep_length_and_percentiles():
    totals = np.arange(1, 101)
    assert inspect_mod.keep_length(totals) == 95
    assert inspect_mod.keep_length(np.array([5, 5, 5, 100])) == 100  # 3 of 4 is less than 95%
    assert inspect_mod.keep_length(np.array([7] * 19 + [300])) == 7  # 19 of 20 = 95%
    s = inspect_mod.summarize(totals)
    assert (s["p50"], s["p90"], s["p95"], s["p99"], s["max"]) == (50, 90, 95, 99, 100)


def test_statistics_match_a_direct_computation(setup, tmp_path):
    recipe, tokenizer = setup
    result = inspect_mod.analyze(recipe, tokenizer, cache_dir=tmp_path / "cache")
    assert set(result["splits"]) == {"train", "test"}
    raw = data_mod.sample(data_mod.load_raw(recipe), recipe)
    prepared = data_mod.prepare(recipe, tokenizer, roles=("train", "test"), raw=raw)
    for role, ds in raw.items():
        s = result["splits"][role]
        rows = ds.to_list()
        assert s["rows"] == len(rows)
        text_lengths = [len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in rows]
        assert s["lengths"]["{text}"]["max"] == max(text_lengths)
        assert s["lengths"]["{text}"]["p50"] == int(np.percentile(text_lengths, 50, method="inverted_cdf"))
        totals = [len(tokenizer(f"Text: {r['text']}\nTopic: {r['label']}")["input_ids"]) + 1 for r in rows]
        assert s["lengths"]["example"]["max"] == max(totals)
        assert s["over_max_length"] == sum(t > 40 for t in totals) > 0
        assert s["max_length_for_95pct"] == sorted(totals)[int(np.ceil(0.95 * len(totals))) - 1]
        # Truncation and drops are what training will do with these rows.
        stats = prepared.stats[role]
        assert (s["truncated"], s["dropped_too_long"], s["kept"]) == (
            stats["truncated"], stats["dropped_too_long"], stats["kept"])
        assert s["dropped_too_long"] > 0  # data.max_tokens 30 < max_length 40
        assert s["labels"] == dict(sorted(
            {k: v for k, v in zip(*np.unique([r["label"] for r in rows], return_counts=True))}.items(),
            key=lambda kv: (-kv[1], kv[0])))


def test_second_look_comes_from_the_cache_and_a_changed_file_is_recomputed(setup, tmp_path):
    recipe, tokenizer = setup
    cache = tmp_path / "cache"
    first = inspect_mod.analyze(recipe, tokenizer, cache_dir=cache)
    second = inspect_mod.analyze(recipe, tokenizer, cache_dir=cache)
    assert not first["cached"] and second["cached"]
    assert second["splits"] == first["splits"]
    with open(recipe["data"]["source"], "a", encoding="utf-8") as f:
        f.write("one more row about a team,Sports\n")
    third = inspect_mod.analyze(recipe, tokenizer, cache_dir=cache)
    assert not third["cached"]
    assert third["splits"]["train"]["rows"] == first["splits"]["train"]["rows"] + 1
    changed = recipes.validate({**recipe, "prompt": {**recipe["prompt"], "max_length": 64}})
    assert not inspect_mod.analyze(changed, tokenizer, cache_dir=cache)["cached"]


def test_no_label_counts_without_a_classification_evaluator(setup, tmp_path):
    recipe, tokenizer = setup
    summary = recipes.validate({**recipe, "evaluation": {"evaluators": [{"name": "samples"}], "split": "test"}})
    result = inspect_mod.analyze(summary, tokenizer, cache_dir=tmp_path / "cache")
    assert "labels" not in result["splits"]["train"]


@pytest.mark.slow
def test_the_command_prints_a_table_and_saves_json_and_histograms(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny)
    out = tmp_path / "inspected"
    result = cli("inspect", path, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    for words in ("train: 48 rows", "test: 12 rows", "prompt+completion+EOS", "p95", "truncated",
                  "dropped", "95% of examples fit whole in", "labels (4 names"):
        assert words in result.stdout, words
    saved = json.loads((out / "inspect.json").read_text())
    assert saved["splits"]["train"]["rows"] == 48 and saved["max_length"] == 40
    for role in ("train", "test"):
        assert (out / f"lengths_{role}.png").read_bytes()[:8] == PNG_SIGNATURE
    # The default folder is <output_dir>/<name>/inspect; the second look is served from the cache.
    again = cli("inspect", path)
    assert again.returncode == 0 and "(from the cache)" in again.stdout
    assert (tmp_path / "runs" / "news" / "inspect" / "inspect.json").is_file()


@pytest.mark.slow
def test_a_template_field_that_is_no_column_is_a_one_line_error(tmp_path, tiny, cli):
    path = write_recipe(tmp_path, tiny, template="Text: {txt}\nTopic:", truncate=None)
    result = cli("inspect", path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: prompt.template: field {txt} is not a column")
    assert not (tmp_path / "runs").exists()
