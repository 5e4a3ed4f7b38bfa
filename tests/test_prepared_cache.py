"""Tokenize once (runner.data.prepared_cache): the prepared data is reused when nothing that decides it changed,
prepared again when anything did, and the cache never hands out half an entry."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest

from runner.cli import recipes
from runner.data import data as data_mod
from runner.data import prepared_cache
from tests.conftest import ROOT

AGNEWS = ROOT / "recipes" / "tiny" / "agnews_tiny.yaml"
SMALL = ["data.train_samples=64", "data.eval_samples=8", "data.test_samples=8"]


def _recipe(tmp_path: Path, *overrides: str, rows: int = 200) -> dict:
    """agnews_tiny on a copy of its train file (so the test may change it), few examples."""
    data = tmp_path / "train.jsonl"
    if not data.exists():
        source = ROOT / ".cache" / "tiny" / "data" / "agnews_tiny" / "train.jsonl"
        data.write_text("".join(source.read_text().splitlines(keepends=True)[:rows]))
    return recipes.load(AGNEWS, [f"data.source.train={data}", *SMALL, *overrides])


def _prepare(recipe, tokenizer, folder, roles=("train", "eval")):
    return prepared_cache.prepared(recipe, tokenizer, roles, data_mod.prepare, folder=folder)


def _rows(prepared) -> dict:
    return {role: ds.to_list() for role, ds in prepared.splits.items()}


def test_a_second_preparation_is_the_cached_one_with_the_same_rows(tiny, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    first = _prepare(_recipe(tmp_path), tokenizer, cache)
    second = _prepare(_recipe(tmp_path), tokenizer, cache)
    fresh = data_mod.prepare(_recipe(tmp_path), tokenizer, roles=("train", "eval"))
    assert first.cached is None and second.cached is not None
    assert (cache / second.cached / "prepared.json").is_file()
    assert _rows(second) == _rows(first) == _rows(fresh)  # the same examples, in the same order
    assert second.stats == first.stats == json.loads(json.dumps(fresh.stats))
    assert second.fingerprint == first.fingerprint == fresh.fingerprint  # resume's data check sees no change
    # the evaluation of one role takes it from the run's entry: the same rows, nothing prepared again
    test = _prepare(_recipe(tmp_path), tokenizer, cache, roles=("eval",))
    assert test.cached == second.cached and _rows(test) == {"eval": _rows(fresh)["eval"]}
    assert len(list(cache.iterdir())) == 1


def test_what_decides_the_rows_misses_and_what_does_not_hits(tiny, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    base = _prepare(_recipe(tmp_path), tokenizer, cache)
    assert base.cached is None
    for unrelated in ("training.learning_rate=0.001", "lora.r=4", "training.max_steps=3", "data.cache=true"):
        assert _prepare(_recipe(tmp_path, unrelated), tokenizer, cache).cached is not None, unrelated
    entries = {p.name for p in cache.iterdir()}
    for changed in ("prompt.max_length=112", "data.train_samples=32", "seed=7", "generation.stop=['\\n\\n']",
                    "prompt.template='Topic of: {text}\\nAnswer:'"):
        again = _prepare(_recipe(tmp_path, changed), tokenizer, cache)
        assert again.cached is None, changed
    assert len({p.name for p in cache.iterdir()} - entries) == 5
    # the source file's content: the same path, one row changed
    data = tmp_path / "train.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    row = json.loads(lines[0])
    row["text"] = row["text"] + " Changed."
    data.write_text(json.dumps(row) + "\n" + "".join(lines[1:]))
    assert _prepare(_recipe(tmp_path), tokenizer, cache).cached is None
    # the tokenizer: one more special token
    other = type(tokenizer).from_pretrained(tiny / "phi")
    other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    assert _prepare(_recipe(tmp_path), other, cache).cached is None


def test_a_damaged_entry_is_prepared_again_and_a_switched_off_cache_keeps_nothing(tiny, tokenizer, tmp_path,
                                                                                    capsys):
    cache = tmp_path / "cache"
    first = _prepare(_recipe(tmp_path), tokenizer, cache)
    (entry,) = cache.iterdir()
    shutil.rmtree(entry / "train")  # a file removed by hand, a disk error
    again = _prepare(_recipe(tmp_path), tokenizer, cache)
    assert again.cached is None and _rows(again) == _rows(first)
    assert "does not load" in capsys.readouterr().out
    assert _prepare(_recipe(tmp_path), tokenizer, cache).cached == entry.name  # whole again
    off = tmp_path / "off"
    assert _prepare(_recipe(tmp_path, "data.cache=false"), tokenizer, off).cached is None
    assert not off.exists()


def test_two_writers_of_one_key_leave_one_whole_entry(tiny, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    recipe = _recipe(tmp_path)
    prepared = data_mod.prepare(recipe, tokenizer, roles=("train",))
    name = prepared_cache.key(recipe, tokenizer, ("train",), "x")
    prepared_cache._store(prepared, cache, name)
    prepared_cache._store(prepared, cache, name)  # as a second rank or sweep cell finishing later
    assert [p.name for p in cache.iterdir()] == [name]  # no temporary folder left behind
    loaded = prepared_cache._load(cache / name, data_mod.Prepared, ("train",))
    assert len(loaded.splits["train"]) == len(prepared.splits["train"])


def test_the_cap_removes_the_entries_used_longest_ago(tmp_path, monkeypatch):
    for i, name in enumerate(("old", "used", "new")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_bytes(b"x" * 1000)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    os.utime(tmp_path / "used", (2000, 2000))  # read since: the newest
    assert prepared_cache.evict(tmp_path, cap=2500) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "used"]
    assert prepared_cache.evict(tmp_path, cap=10) == ["new"]  # the one used last stays, even over the cap
    monkeypatch.setenv(prepared_cache.CAP_ENV, "0.5")
    assert prepared_cache.cap_bytes() == 500_000_000
    monkeypatch.setenv(prepared_cache.CAP_ENV, "lots")
    with pytest.raises(Exception, match="RUNNER_CACHE_GB: is 'lots', not a number of GB"):
        prepared_cache.cap_bytes()


@pytest.mark.parametrize("command", ["train", "eval", "sweep"])
def test_no_cache_on_the_command_line_is_data_cache_false(command, tmp_path):
    args = argparse.Namespace(command=command, recipe=str(AGNEWS), overrides=["data.cache=true"], no_cache=True)
    assert recipes.for_command(args)["data"]["cache"] is False
    args.no_cache = False
    assert recipes.for_command(args)["data"]["cache"] is True


def test_large_data_is_prepared_by_several_processes_small_data_by_one(monkeypatch):
    from runner.common import cpu

    monkeypatch.setattr(cpu, "cores", lambda: 8)
    assert cpu.data_workers(2_000) is None and cpu.data_workers(39_999) is None
    assert cpu.data_workers(60_000) == 3 and cpu.data_workers(1_000_000) == 8


def test_several_processes_prepare_the_same_rows_as_one(tiny, tokenizer, tmp_path, monkeypatch):
    from runner.common import cpu

    recipe = _recipe(tmp_path, "data.train_samples=null", "prompt.max_length=40",
                     "data.max_tokens=null")  # some rows truncated
    alone = data_mod.prepare(recipe, tokenizer, roles=("train",))
    monkeypatch.setattr(cpu, "data_workers", lambda rows: 2)
    shared = data_mod.prepare(recipe, tokenizer, roles=("train",))
    assert alone.stats["train"]["truncated"] > 0
    assert _rows(shared) == _rows(alone) and shared.fingerprint == alone.fingerprint
