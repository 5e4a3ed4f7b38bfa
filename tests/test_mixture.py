"""Dataset mixtures (data.sources): recipe rules, field mappings, weighted reproducible draws, inspect's shares."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.data import data as data_mod
from runner.data import inspection as inspect_mod
from runner.data import mixture


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    """news: 60 rows with the template's own columns; briefs: 12 rows with other column names."""
    news = write_jsonl(tmp_path / "news.jsonl", [{"id": i, "document": f"news story {i}", "summary": f"news {i}"}
                                                  for i in range(60)])
    briefs = write_jsonl(tmp_path / "briefs.jsonl", [{"text": f"brief text {i}", "headline": f"brief {i}"}
                                                     for i in range(12)])
    return news, briefs


def mix_recipe(tmp_path: Path, sources, **data) -> dict:
    raw = {"model": {"name_or_path": "unused"},
           "data": {"sources": sources, "splits": {"eval": None, "test": None}, **data},
           "prompt": {"template": "Article: {document}\nSummary:", "completion": " {summary}", "max_length": 64},
           "evaluation": {"split": "train"}}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return recipes.load(path)


def two_sources(news, briefs, w_news=3, w_briefs=1):
    return [{"source": news.name, "weight": w_news},
            {"source": briefs.name, "weight": w_briefs, "fields": {"document": "text", "summary": "headline"}}]


# ---------------------------------------------------------------- recipe rules


def test_source_and_sources_are_exclusive_and_one_is_required(tmp_path, files):
    news, briefs = files
    with pytest.raises(RecipeError, match="is set together with data.source") as err:
        mix_recipe(tmp_path, two_sources(news, briefs), source=str(news))
    assert err.value.key_path == "data.sources"
    with pytest.raises(RecipeError, match="missing required key") as err:
        mix_recipe(tmp_path, None)
    assert err.value.key_path == "data.source"
    with pytest.raises(RecipeError, match="a mixture gives each source its own") as err:
        mix_recipe(tmp_path, two_sources(news, briefs), config="default")
    assert err.value.key_path == "data.config"


def test_a_mapping_to_a_field_the_prompt_does_not_use_is_refused_with_a_suggestion(tmp_path, files):
    news, briefs = files
    sources = two_sources(news, briefs)
    sources[1]["fields"] = {"documnt": "text"}
    with pytest.raises(RecipeError) as err:
        mix_recipe(tmp_path, sources)
    assert err.value.key_path == "data.sources[1].fields.documnt" and "did you mean 'document'?" in err.value.line()


def test_source_paths_are_relative_to_the_recipe_and_weights_must_be_positive(tmp_path, files):
    news, briefs = files
    recipe = mix_recipe(tmp_path, two_sources(news, briefs))
    assert recipe["data"]["sources"][0]["source"] == str(news.resolve())
    sources = two_sources(news, briefs)
    sources[0]["weight"] = 0
    with pytest.raises(RecipeError, match="out of range") as err:
        mix_recipe(tmp_path, sources)
    assert err.value.key_path == "data.sources[0].weight"


# ---------------------------------------------------------------- the draw


def test_each_source_gives_its_weighted_share_mapped_onto_the_template(tmp_path, files, tokenizer):
    news, briefs = files
    recipe = mix_recipe(tmp_path, two_sources(news, briefs), train_samples=40)
    prepared = data_mod.prepare(recipe, tokenizer, roles=("train",))
    train = prepared.splits["train"]
    origin = Counter(i.split("-")[0] for i in train["id"])
    assert origin == {"news": 30, "briefs": 10}
    assert prepared.stats["train"]["sources"] == {"news": 30, "briefs": 10}
    assert "drawn from news 75%, briefs 25%" in data_mod.describe(prepared.stats)
    brief = train[train["id"].index(next(i for i in train["id"] if i.startswith("briefs")))]
    assert brief["prompt"].startswith("Article: brief text ") and brief["completion"].startswith(" brief ")


def test_the_draw_is_reproducible_from_the_seed_and_changes_with_it(tmp_path, files):
    news, briefs = files

    def ids(seed):
        recipe = mix_recipe(tmp_path, two_sources(news, briefs), train_samples=20, seed=seed)
        return data_mod.load_raw(recipe)["train"]["id"]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)


def test_without_a_sample_size_the_mixture_stops_where_the_first_source_runs_out(tmp_path, files):
    news, briefs = files
    # briefs (12 rows) at weight 1 of 4 runs out at 48 rows: 36 news + 12 briefs, no row twice.
    train = data_mod.load_raw(mix_recipe(tmp_path, two_sources(news, briefs)))["train"]
    assert Counter(train[mixture.SOURCE_COLUMN]) == {"news": 36, "briefs": 12}
    assert len(set(train["id"])) == len(train)


def test_a_source_smaller_than_its_share_repeats_its_rows_evenly(tmp_path, files):
    news, briefs = files
    train = data_mod.load_raw(mix_recipe(tmp_path, two_sources(news, briefs, 1, 1), train_samples=50))["train"]
    brief_ids = Counter(i for i in train["id"] if i.startswith("briefs"))
    assert sum(brief_ids.values()) == 25 and set(brief_ids.values()) == {2, 3}  # every brief twice, one more for 1


def test_a_mapped_column_missing_from_its_source_names_the_source_and_its_columns(tmp_path, files, tokenizer):
    news, briefs = files
    sources = two_sources(news, briefs)
    sources[1]["fields"] = {"document": "body", "summary": "headline"}
    with pytest.raises(RecipeError) as err:
        data_mod.prepare(mix_recipe(tmp_path, sources), tokenizer, roles=("train",))
    assert err.value.key_path == "data.sources[1].fields.document"
    assert "'body' is not a column of briefs" in err.value.line() and "text" in err.value.line()
    sources[1]["fields"] = {"summary": "headline"}  # {document} is neither mapped nor a column of briefs
    with pytest.raises(RecipeError, match="briefs has no column 'document'") as err:
        data_mod.prepare(mix_recipe(tmp_path, sources), tokenizer, roles=("train",))
    assert err.value.key_path == "data.sources[1].fields"


def test_inspect_shows_each_sources_share_after_sampling(tmp_path, files, tokenizer):
    news, briefs = files
    recipe = mix_recipe(tmp_path, two_sources(news, briefs), train_samples=40)
    result = inspect_mod.analyze(recipe, tokenizer, use_cache=False)
    assert result["splits"]["train"]["sources"] == {"news": 30, "briefs": 10}
    assert "sources (share of the 40 rows drawn): news 30 (75.0%), briefs 10 (25.0%)" in inspect_mod.table(result)


def test_allocation_adds_up_and_follows_the_weights():
    assert mixture.allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert mixture.allocate(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # 3.5, 1.75, 1.75: the largest remainders round up
    assert sum(mixture.allocate(1001, [0.3, 0.3, 0.4])) == 1001
