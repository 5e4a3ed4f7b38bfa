"""Generation and ranking: decoding settings, stop strings, left-padded batches that change nothing, an interrupted
evaluation that resumes, label scores equal to the model's own log-likelihoods, and rank vs generate on a tiny
classification task before and after training."""

from __future__ import annotations

import copy
import json

import pytest

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.data import data as data_mod
from runner.evaluate import evaluate as evaluate_mod
from runner.evaluate import generate as generate_mod
from runner.evaluate import rank as rank_mod
from tests.conftest import ROOT

TINY_XSUM = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


def with_keys(recipe: dict, **sections) -> dict:
    out = copy.deepcopy(recipe)
    for section, values in sections.items():
        out[section].update(values)
    return recipes.validate(out)


@pytest.fixture(scope="module")
def untrained(tiny):
    import torch

    from runner.model import model as model_mod

    torch.set_num_threads(2)
    recipe = recipes.load(TINY_XSUM)
    return recipe, model_mod.load_tokenizer(recipe), model_mod.load_trained(recipe, None)


# ---------------------------------------------------------------- decoding settings


def test_greedy_beam_and_nucleus_settings_reach_the_generation_config(untrained):
    recipe, tokenizer, _ = untrained
    greedy = generate_mod.generation_config(with_keys(recipe, generation={"do_sample": False}), tokenizer)
    assert not greedy.do_sample and greedy.num_beams == 1
    beam = generate_mod.generation_config(with_keys(recipe, generation={"num_beams": 4}), tokenizer)
    assert beam.num_beams == 4 and not beam.do_sample
    nucleus = generate_mod.generation_config(with_keys(recipe, generation={
        "do_sample": True, "top_p": 0.9, "temperature": 0.7, "repetition_penalty": 1.2, "stop": []}), tokenizer)
    assert (nucleus.do_sample, nucleus.top_p, nucleus.temperature, nucleus.repetition_penalty) == (True, 0.9, 0.7, 1.2)
    assert nucleus.stop_strings is None
    assert greedy.stop_strings == ["\n"]  # the tiny recipe's generation.stop
    assert greedy.eos_token_id == tokenizer.eos_token_id and greedy.max_new_tokens == recipe["generation"]["max_new_tokens"]


@pytest.mark.parametrize("text, stops, expected", [
    (" Storms close schools.\nMore text", ["\n"], "Storms close schools."),
    ("\n Storms close schools.\nMore", ["\n"], "Storms close schools."),  # a leading newline is not the end
    ("Sports### World", ["###", "\n"], "Sports"),
    ("no stop here ", ["\n"], "no stop here"),
])
def test_cut_at_stop(text, stops, expected):
    assert generate_mod.cut_at_stop(text, stops) == expected


def test_length_sorted_batches_cover_every_index_once():
    batches = list(generate_mod.length_sorted_batches([5, 50, 7, 30, 6, 40, 8], 3))
    assert batches == [[1, 5, 3], [6, 2, 4], [0]]


def test_batched_left_padded_generation_equals_one_at_a_time(untrained):
    recipe, tokenizer, net = untrained
    recipe = with_keys(recipe, generation={"max_new_tokens": 8, "stop": []})
    prompts = ["Article: Heavy snow forced four schools in Harwick to close on Monday.\nSummary:",
               "Summary:", "Article: Norcom said it would cut jobs.\nSummary:",
               "Instruction: Summarize the following news article in a concise and abstractive way.\n"
               "Article: Rovers beat City by two goals in a league match played in Dunmore on Friday.\nSummary:"]
    batched = generate_mod.generate(net, tokenizer, prompts, with_keys(recipe, generation={"batch_size": 4}))
    alone = generate_mod.generate(net, tokenizer, prompts, with_keys(recipe, generation={"batch_size": 1}))
    assert batched == alone
    assert all(batched[i] for i in range(len(prompts)))


def test_beam_search_and_sampling_run_and_sampling_follows_the_seed(untrained):
    recipe, tokenizer, net = untrained
    prompts = ["Article: Norcom said it would cut jobs.\nSummary:", "Summary:"]
    beam = generate_mod.generate(net, tokenizer, prompts, with_keys(recipe, generation={"num_beams": 3,
                                                                                         "max_new_tokens": 6}))
    assert set(beam) == {0, 1}
    sample = with_keys(recipe, generation={"do_sample": True, "top_p": 0.9, "temperature": 1.5, "max_new_tokens": 6,
                                           "stop": []})
    first, again = (generate_mod.generate(net, tokenizer, prompts, sample) for _ in range(2))
    other = generate_mod.generate(net, tokenizer, prompts, {**sample, "seed": sample["seed"] + 1})
    assert first == again and first != other


# ---------------------------------------------------------------- resumable predictions


def interrupted_after(batches: int, real):
    """``real`` (runner.evaluate.generate.generate) interrupted as by Ctrl-C once ``batches`` batches are written."""

    def generate(model, tok, prompts, recipe, skip=frozenset(), on_batch=None, choice=None):
        seen = []

        def stream(batch):
            on_batch(batch)
            seen.append(batch)
            if len(seen) == batches:
                raise KeyboardInterrupt

        return real(model, tok, prompts, recipe, skip=skip, on_batch=stream, choice=choice)

    return generate


def test_an_interrupted_evaluation_resumes_where_it_stopped(untrained, tmp_path, monkeypatch):
    recipe, tokenizer, net = untrained
    recipe = with_keys(recipe, generation={"max_new_tokens": 6, "batch_size": 4},
                       evaluation={"evaluators": [{"name": "rouge"}]})
    examples = data_mod.prepare(recipe, tokenizer, roles=("test",)).splits["test"].select(range(12))
    full = tmp_path / "full"
    full.mkdir()
    evaluate_mod.evaluate(recipe, net, tokenizer, full, examples=examples)
    out = tmp_path / "resumed"
    out.mkdir()
    real = generate_mod.generate
    monkeypatch.setattr(generate_mod, "generate", interrupted_after(2, real))
    with pytest.raises(KeyboardInterrupt):
        evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=examples)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and not (out / "metrics.json").exists()
    written = {json.loads(line)["index"] for line in lines}
    stale = min(set(range(12)) - written)
    with open(out / "predictions.jsonl", "a") as f:  # a prediction for another prompt, then a line torn by the kill
        f.write(json.dumps({"index": stale, "id": "x", "prompt": "another template", "reference": "r",
                            "prediction": "p"}) + "\n" + '{"index": 99, "predic')

    skipped = {}

    def remember_skip(model, tok, prompts, recipe, skip=frozenset(), on_batch=None, choice=None):
        skipped["indices"] = set(skip)
        return real(model, tok, prompts, recipe, skip=skip, on_batch=on_batch, choice=choice)

    monkeypatch.setattr(generate_mod, "generate", remember_skip)
    metrics = evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=examples)
    assert skipped["indices"] == written  # only the 4 missing examples were generated (the stale one again)
    resumed_rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    full_rows = [json.loads(line) for line in (full / "predictions.jsonl").read_text().splitlines()]
    assert sorted(resumed_rows, key=lambda r: r["index"]) == sorted(full_rows, key=lambda r: r["index"])
    assert metrics["rouge"] == json.loads((full / "metrics.json").read_text())["rouge"]


# ---------------------------------------------------------------- ranking


def test_rank_scores_are_the_models_log_likelihoods(untrained):
    import torch

    _, tokenizer, net = untrained
    prompts = ["Article: Riverton police said two people were hurt.\nTopic:", "Topic:", "Article: snow.\nTopic:"]
    completions = [" Accident", " Weather report", " Sport"]
    rows = rank_mod.tokenize_pairs(tokenizer, prompts, completions)
    scores = rank_mod.score_rows(net, tokenizer, rows)
    for (ids, n), score, completion in zip(rows, scores, completions):
        assert n == len(tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        with torch.inference_mode():  # the row alone, unpadded
            logits = net(input_ids=torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert float(score) == pytest.approx(float(logprobs[-n:].sum()), abs=1e-3)


def test_generation_runs_cudnn_attention_and_scoring_does_not_whatever_training_left(untrained):
    """Training turns cuDNN's attention off for the whole process (runner.speed.profiles); generation wants it back (one
    shape per batch, thousands of decoding steps), scoring passes not (a new shape every pass): each sets its own and
    restores what it found (runner.model.attention)."""
    import torch

    recipe, tokenizer, net = untrained
    seen: list[bool] = []
    hook = net.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    short = with_keys(recipe, generation={"max_new_tokens": 2, "do_sample": False})
    ranked = with_keys(recipe, generation={"mode": "rank", "labels": ["a", "b"]})
    prompts = ["Article: snow fell.\nSummary:", "Article: rain.\nSummary:"]
    try:
        for before in (False, True):
            torch.backends.cuda.enable_cudnn_sdp(before)
            seen.clear()
            generate_mod.generate(net, tokenizer, prompts, short)
            assert seen and all(seen), "generation ran without cuDNN's attention"
            assert torch.backends.cuda.cudnn_sdp_enabled() is before
            seen.clear()
            rank_mod.completion_logprobs(net, tokenizer, prompts, [" snow", " rain"], recipe)
            rank_mod.rank(net, tokenizer, prompts, ranked)
            assert seen and not any(seen), "a scoring pass ran with cuDNN's attention"
            assert torch.backends.cuda.cudnn_sdp_enabled() is before
    finally:
        hook.remove()
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_rank_mode_needs_labels_and_a_one_field_completion():
    recipe = recipes.load(TINY_XSUM)
    with pytest.raises(RecipeError) as err:
        with_keys(recipe, generation={"mode": "rank"})
    assert err.value.key_path == "generation.mode"
    two_fields = copy.deepcopy(recipe)
    two_fields["prompt"]["completion"] = " {summary} {document}"
    with pytest.raises(RecipeError) as err:
        with_keys(two_fields, generation={"mode": "rank", "labels": ["a", "b"]})
    assert err.value.key_path == "prompt.completion"
    from_evaluator = copy.deepcopy(recipe)
    from_evaluator["evaluation"]["evaluators"] = [{"name": "classification", "labels": ["x", "y"]}]
    from_evaluator["generation"]["mode"] = "rank"
    assert rank_mod.rank_labels(from_evaluator) == ["x", "y"]
    assert rank_mod.candidate(from_evaluator, "Sci/Tech") == " Sci/Tech"


# ---------------------------------------------------------------- rank vs generate on the tiny AG News twin

AGNEWS_TINY = ROOT / "recipes" / "tiny" / "agnews_tiny.yaml"


@pytest.fixture(scope="module")
def agnews(trained, tmp_path_factory):
    """The session's trained AG News twin, its adapter loaded in-process; the untrained base is one
    disable_adapter() away."""
    from runner.model import model as model_mod

    run = trained("agnews_tiny")
    folder = tmp_path_factory.mktemp("agnews")
    recipe = recipes.load(AGNEWS_TINY, ["data.test_samples=60", f"output_dir={folder}"])
    tokenizer = model_mod.load_tokenizer(recipe)
    net = model_mod.load_trained(recipe, run.run_dir / "adapter")
    test = data_mod.prepare(recipe, tokenizer, roles=("test",)).splits["test"]
    return recipe, net, tokenizer, test, folder


def evaluate_in(mode: str, agnews, adapter: bool) -> tuple[dict, list[str]]:
    recipe, net, tokenizer, test, folder = agnews
    out = folder / f"{mode}-{'adapter' if adapter else 'base'}"
    out.mkdir()
    recipe = with_keys(recipe, generation={"mode": mode})
    if adapter:
        metrics = evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=test)
    else:
        with net.disable_adapter():
            metrics = evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=test)
    predictions = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics["classification"], predictions


@pytest.mark.twins("agnews_tiny")
def test_rank_and_generate_agree_with_gold_at_least_as_often_after_training(agnews):
    """Rank takes its labels from the classification evaluator's `labels` (the twin sets no generation.labels)."""
    recipe = agnews[0]
    labels = next(e["labels"] for e in recipe["evaluation"]["evaluators"] if e["name"] == "classification")
    assert recipe["generation"]["labels"] is None and rank_mod.rank_labels(recipe) == labels
    results = {(mode, adapter): evaluate_in(mode, agnews, adapter)
               for mode in ("generate", "rank") for adapter in (False, True)}
    acc = {key: value[0]["accuracy"] for key, value in results.items()}
    print({f"{mode} {'trained' if t else 'untrained'}": v for (mode, t), v in acc.items()})
    for adapter in (False, True):  # ranking always answers with a label, trained or not
        assert set(results[("rank", adapter)][1]) <= set(labels) and results[("rank", adapter)][0]["invalid"] == 0
    assert acc[("generate", True)] >= 0.8 and acc[("rank", True)] >= 0.8
    for mode in ("generate", "rank"):
        assert acc[(mode, True)] >= acc[(mode, False)] + 0.3
    assert acc[("rank", True)] >= acc[("generate", True)]
