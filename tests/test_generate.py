"""Generation and ranking: decoding settings, stop strings, left-padded batches that change nothing, an interrupted
evaluation that resumes, label scores equal to the model's own log-likelihoods, and rank vs generate on a tiny
classification task before and after training."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from runner import data as data_mod
from runner import evaluate as evaluate_mod
from runner import generate as generate_mod
from runner import rank as rank_mod
from runner import recipe as recipe_mod
from runner.errors import RecipeError
from tests.conftest import ROOT

TINY_XSUM = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


def with_keys(recipe: dict, **sections) -> dict:
    out = copy.deepcopy(recipe)
    for section, values in sections.items():
        out[section].update(values)
    return recipe_mod.validate(out)


@pytest.fixture(scope="module")
def untrained(tiny):
    import torch

    from runner import model as model_mod

    torch.set_num_threads(2)
    recipe = recipe_mod.load(TINY_XSUM)
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


def test_an_interrupted_evaluation_resumes_where_it_stopped(untrained, tmp_path, monkeypatch):
    recipe, tokenizer, net = untrained
    recipe = with_keys(recipe, generation={"max_new_tokens": 6, "batch_size": 4},
                       evaluation={"evaluators": [{"name": "rouge"}]})
    examples = data_mod.prepare(recipe, tokenizer, roles=("test",)).splits["test"].select(range(12))
    full = tmp_path / "full"
    full.mkdir()
    evaluate_mod.evaluate(recipe, net, tokenizer, full, examples=examples)
    real = generate_mod.generate

    def killed_after_two_batches(model, tok, prompts, recipe, skip=frozenset(), on_batch=None):
        seen = []

        def stream(batch):
            on_batch(batch)
            seen.append(batch)
            if len(seen) == 2:
                raise KeyboardInterrupt

        return real(model, tok, prompts, recipe, skip=skip, on_batch=stream)

    out = tmp_path / "resumed"
    out.mkdir()
    monkeypatch.setattr(generate_mod, "generate", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=examples)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and not (out / "metrics.json").exists()
    written = {json.loads(line)["index"] for line in lines}
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"index": 99, "predic')  # a line torn by the kill

    skipped = {}

    def remember_skip(model, tok, prompts, recipe, skip=frozenset(), on_batch=None):
        skipped["indices"] = set(skip)
        return real(model, tok, prompts, recipe, skip=skip, on_batch=on_batch)

    monkeypatch.setattr(generate_mod, "generate", remember_skip)
    metrics = evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=examples)
    assert skipped["indices"] == written  # only the 4 missing examples were generated again
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


def test_rank_mode_needs_labels_and_a_one_field_completion():
    recipe = recipe_mod.load(TINY_XSUM)
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


# ---------------------------------------------------------------- rank vs generate on a tiny classification task

# The tiny news summaries name their event: a five-topic classification task from the same data and tokenizer.
TOPIC_OF = {" hurt as ": "Accident", " elected mayor ": "Election", " beat ": "Sport", " to cut ": "Jobs",
            " closes ": "Weather"}


def write_topics(tiny, folder):
    for split in ("train", "validation", "test"):
        rows = []
        for line in (tiny / "data" / "xsum_tiny" / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            label = next(name for cue, name in TOPIC_OF.items() if cue in f" {row['summary']}")
            rows.append(json.dumps({"id": row["id"], "document": row["document"], "label": label}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def topics_recipe(tiny, folder) -> dict:
    write_topics(tiny, folder)
    recipe = {
        "name": "topics_tiny", "seed": 42, "output_dir": str(folder / "runs"),
        "model": {"name_or_path": str(tiny / "phi")},
        "quantization": {"method": "bnb_4bit"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"source": {"train": str(folder / "train.jsonl"), "eval": str(folder / "validation.jsonl"),
                            "test": str(folder / "test.jsonl")},
                 "train_samples": 960, "eval_samples": 16, "test_samples": 60},
        "prompt": {"template": "Article: {document}\nTopic:", "completion": " {label}", "max_length": 128,
                   "truncate": "document"},
        "training": {"max_steps": 60, "micro_batch_size": 16, "gradient_accumulation_steps": 1,
                     "learning_rate": 3.0e-3, "warmup_ratio": 0.05, "optimizer": "adamw_torch", "resume": "never"},
        "generation": {"max_new_tokens": 4, "batch_size": 20, "stop": ["\n"], "labels": list(TOPIC_OF.values())},
        "evaluation": {"split": "test", "evaluators": [{"name": "samples"}]},
    }
    path = folder / "topics_tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipe_mod.load(path)


def accuracy(out_dir) -> float:
    rows = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    return sum(" ".join(r["prediction"].split()).lower() == r["reference"].lower() for r in rows) / len(rows)


@pytest.fixture(scope="module")
def topics(tiny, tmp_path_factory):
    """A tiny topic classifier trained once (60 steps), with its untrained base one disable_adapter() away."""
    from runner import train

    folder = tmp_path_factory.mktemp("topics")
    recipe = topics_recipe(tiny, folder)
    _, net, tokenizer, prepared = train.train(recipe)
    return recipe, net, tokenizer, prepared.splits["test"], folder


def evaluate_in(mode: str, topics, adapter: bool) -> tuple[float, list]:
    recipe, net, tokenizer, test, folder = topics
    out = folder / f"{mode}-{'adapter' if adapter else 'base'}"
    out.mkdir()
    recipe = with_keys(recipe, generation={"mode": mode})
    if adapter:
        evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=test)
    else:
        with net.disable_adapter():
            evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=test)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return accuracy(out), [r["prediction"] for r in rows]


def test_rank_and_generate_agree_with_gold_after_training(topics):
    labels = set(TOPIC_OF.values())
    results = {(mode, adapter): evaluate_in(mode, topics, adapter)
               for mode in ("generate", "rank") for adapter in (False, True)}
    acc = {key: value[0] for key, value in results.items()}
    print({f"{mode} {'trained' if a else 'untrained'}": round(v, 3) for (mode, a), v in acc.items()})
    assert all(p in labels for p in results[("rank", False)][1] + results[("rank", True)][1])  # always a label
    # Measured at 60 steps: generate 0.83 (its misses are misspelt labels like "Accc"), rank 1.0; untrained 0.0 / 0.28.
    assert acc[("generate", True)] >= 0.6 and acc[("rank", True)] >= 0.9
    for mode in ("generate", "rank"):
        assert acc[(mode, True)] > acc[(mode, False)] + 0.3
    assert acc[("rank", True)] >= acc[("generate", True)]
