"""runner.recipe.templates (parse, render, read back) and data.shorten, the one token-truncation loop that training data
(data.fit_batch) and `runner generate` inputs (infer.fit_prompt) share."""

from __future__ import annotations

import pytest

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.data import data as data_mod
from runner.evaluate import infer
from runner.recipe import templates
from tests.conftest import ROOT

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


def test_fields_render_and_read_back():
    template = "Q: {question}\nContext: {context}\nAgain: {question}"
    assert templates.template_fields(template, "prompt.template") == ["question", "context"]
    row = {"question": "Who?", "context": ["a", "b"]}
    text = templates.render(template, row, "; ")
    assert text == "Q: Who?\nContext: a; b\nAgain: Who?"
    assert templates.unrender(template, text) == {"question": "Who?", "context": "a; b"}
    for bad, words in (("{x!r}", "format spec"), ("{0}", "bad template field"), ("{x", "bad template")):
        with pytest.raises(RecipeError) as err:
            templates.template_fields(bad, "prompt.completion")
        assert err.value.key_path == "prompt.completion" and words in err.value.problem


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from runner.model import model as model_mod

    return model_mod.load_tokenizer(recipes.load(TINY))


def test_shorten_fits_the_prompt_alone_or_with_the_completion(tokenizer):
    recipe = recipes.load(TINY)
    prompt_cfg = recipe["prompt"]
    document = "The council met again today to discuss the plans for the new bridge. " * 40
    row = {"document": document, "summary": "Council meets."}
    full = templates.render(prompt_cfg["template"], row, prompt_cfg["list_separator"])
    count = len(tokenizer(full)["input_ids"])
    cut, cut_count = data_mod.shorten(row, prompt_cfg, tokenizer, count, 60)
    assert cut_count == len(tokenizer(cut)["input_ids"]) <= 60 < count
    kept = templates.unrender(prompt_cfg["template"], cut)["document"]
    assert document.startswith(kept.rstrip()) and len(kept) < len(document)  # cut from the end
    completion = templates.render(prompt_cfg["completion"], row)
    cut, cut_count = data_mod.shorten(row, prompt_cfg, tokenizer, count, 60, completion=completion)
    assert cut_count == len(tokenizer(cut + completion)["input_ids"]) + 1 <= 60  # + EOS, as training counts
    # generate's inputs go through the same loop, leaving room for the new tokens
    prompt, shortened = infer.fit_prompt(row, recipe, tokenizer)
    budget = prompt_cfg["max_length"] - recipe["generation"]["max_new_tokens"]
    assert shortened and len(tokenizer(prompt)["input_ids"]) <= budget
    assert data_mod.shorten(row, prompt_cfg, tokenizer, count, 0) == (None, count)  # nothing can fit: no cut
