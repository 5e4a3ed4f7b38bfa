"""Chat data (prompt.messages): recipe rules, conversation checks, the chat template on the tokenizer, loss on the
assistant turns only (through TRL), and the same template in train, eval, compare and generate (the chat twin)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.data import chat
from runner.data import data as data_mod
from runner.evaluate import rank
from tests.conftest import ROOT

CONVERSATION = [{"role": "system", "content": "Answer with the topic."},
                {"role": "user", "content": "Fans of Albion celebrated the league title."},
                {"role": "assistant", "content": "Sports"},
                {"role": "user", "content": "And this one? Shares of Norcom rose five percent."},
                {"role": "assistant", "content": "Business"}]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_recipe(tmp_path: Path, rows=None, **prompt) -> dict:
    src = write_jsonl(tmp_path / "chats.jsonl", rows if rows is not None else
                      [{"id": i, "messages": CONVERSATION} for i in range(4)])
    raw = {"model": {"name_or_path": "unused"},
           "data": {"source": str(src), "splits": {"eval": None, "test": None}, "eval_samples": None},
           "prompt": {"messages": "messages", "chat_template": "chatml", "max_length": 256, **prompt},
           "evaluation": {"split": "train"}}
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(raw))
    return recipes.load(path)


def attached(tokenizer, recipe):
    import copy

    tok = copy.deepcopy(tokenizer)
    chat.attach(recipe, tok)
    return tok


# ---------------------------------------------------------------- recipe rules (runner validate)


@pytest.mark.parametrize("prompt, key, words", [
    ({"template": "Q: {messages}"}, "prompt.template", "prompt.messages makes this a chat recipe"),
    ({"completion": " {x}"}, "prompt.completion", "remove prompt.completion"),
    ({"truncate": "messages"}, "prompt.truncate", "chat data is not truncated"),
    ({"chat_template": "chatlm"}, "prompt.chat_template", "did you mean 'chatml'?"),
    ({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}, "prompt.chat_template",
     "no {% generation %} markers"),
])
def test_a_chat_recipe_that_mixes_in_a_prompt_template_or_a_bad_chat_template_is_refused(tmp_path, prompt, key, words):
    with pytest.raises(RecipeError) as err:
        chat_recipe(tmp_path, **prompt)
    assert err.value.key_path == key and words in err.value.line(), err.value.line()


def test_a_chat_template_without_chat_data_and_a_recipe_with_neither_are_refused(tmp_path):
    raw = {"model": {"name_or_path": "unused"}, "data": {"source": "x.jsonl"},
           "prompt": {"template": "{a}", "completion": " {b}", "chat_template": "chatml"}}
    with pytest.raises(RecipeError, match="no chat data") as err:
        recipes.validate(raw)
    assert err.value.key_path == "prompt.chat_template"
    with pytest.raises(RecipeError, match="missing required key") as err:
        recipes.validate({**raw, "prompt": {"max_length": 64}})
    assert err.value.key_path == "prompt.template"


# ---------------------------------------------------------------- conversations in the data


@pytest.mark.parametrize("turns, words", [
    ([{"role": "user", "content": "hi"}, {"role": "assitant", "content": "Sports"}],
     "row 7: messages[1].role 'assitant' is not a chat role (did you mean 'assistant'?"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "row 7: messages[1].content is empty"),
    ([{"role": "user", "content": "hi"}], "row 7: the conversation ends with a user turn"),
    ([{"role": "user"}], "row 7: messages[0] is not a {role, content} turn"),
    ("just text", "row 7: is not a list of {role, content} turns"),
])
def test_a_bad_conversation_is_a_one_line_error_naming_the_row_and_turn(tmp_path, tokenizer, turns, words):
    recipe = chat_recipe(tmp_path, rows=[{"id": 1, "messages": CONVERSATION}, {"id": 7, "messages": turns}])
    with pytest.raises(RecipeError) as err:
        data_mod.prepare(recipe, attached(tokenizer, recipe), roles=("train",))
    assert err.value.key_path == "prompt.messages" and words in err.value.line(), err.value.line()


def test_a_prompt_template_pasting_conversations_in_as_text_is_refused(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CONVERSATION, "label": "x"}])
    raw = {"model": {"name_or_path": "unused"}, "data": {"source": str(src), "splits": {"eval": None, "test": None}},
           "prompt": {"template": "Chat: {messages}\nAnswer:", "completion": " {label}"},
           "evaluation": {"split": "train"}}
    with pytest.raises(RecipeError) as err:
        data_mod.prepare(recipes.validate(raw), tokenizer, roles=("train",))
    assert err.value.key_path == "prompt.template"
    assert "holds chat conversations" in err.value.line() and "set prompt.messages: messages" in err.value.line()


def test_a_missing_conversation_column_names_the_columns(tmp_path, tokenizer):
    recipe = chat_recipe(tmp_path, rows=[{"dialog": CONVERSATION}])
    with pytest.raises(RecipeError, match="'messages' is not a column of the train data") as err:
        data_mod.prepare(recipe, attached(tokenizer, recipe), roles=("train",))
    assert err.value.key_path == "prompt.messages"


# ---------------------------------------------------------------- the template and the rendered examples


def test_examples_are_the_turns_before_the_last_answer_rendered_by_the_template_and_that_answer(tmp_path, tokenizer):
    recipe = chat_recipe(tmp_path)
    tok = attached(tokenizer, recipe)
    assert tok.chat_template == chat.CHATML and chat.turn_end(tok) == "<|im_end|>"
    ds = data_mod.prepare(recipe, tok, roles=("train",)).splits["train"]
    row = ds[0]
    assert row["prompt"] == tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert row["prompt"].endswith("And this one? Shares of Norcom rose five percent.<|im_end|>\n<|im_start|>assistant\n")
    assert row["completion"] == "Business"
    assert row["messages"] == CONVERSATION  # what TRL trains on
    whole = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert row["n_tokens"] == len(whole)
    # generation stops at the template's end of turn; a prediction cut inside the marker loses that part of it
    assert chat.stop_strings(recipe, tok) == ["<|im_end|>"]
    assert chat.cut_partial_end(recipe, tok, "Sports<|im") == "Sports"
    assert chat.cut_partial_end(recipe, tok, "a < b") == "a < b"
    # rank mode and the loss evaluator score an answer as trained: the label, then the end-of-turn marker
    assert rank.candidate(recipe, "Sports") == "Sports" and chat.completion_end(recipe, tok) == "<|im_end|>"


def test_loss_covers_the_assistant_turns_and_their_end_markers_only(tmp_path, tokenizer):
    recipe = chat_recipe(tmp_path)
    tok = attached(tokenizer, recipe)
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])
    assert trained == "Sports<|im_end|>Business<|im_end|>"


def test_the_tokenizers_own_template_is_required_when_none_is_named(tmp_path, tokenizer):
    recipe = chat_recipe(tmp_path, chat_template=None)
    with pytest.raises(RecipeError, match="the tokenizer has none") as err:
        attached(tokenizer, recipe)
    assert err.value.key_path == "prompt.chat_template"


def test_a_template_leaving_the_end_of_turn_out_of_the_loss_is_refused(tmp_path, tokenizer):
    leaky = chat.CHATML.replace("{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}",
                                "{{- message['content'] -}}{% endgeneration %}{{- '<|im_end|>' -}}")
    recipe = chat_recipe(tmp_path, chat_template=leaky)
    with pytest.raises(RecipeError, match="never learns to stop"):
        attached(tokenizer, recipe)


@pytest.mark.slow
def test_trl_builds_labels_from_the_assistant_turns_only(tmp_path, tiny):
    """The trainer the runner builds for a chat recipe trains on the assistant turns (content + end marker) only."""
    from trl import SFTTrainer

    from runner.model import model as model_mod
    from runner.train import train

    recipe = chat_recipe(tmp_path, max_length=256)
    recipe["model"]["name_or_path"] = str(tiny / "phi")
    defaults = recipes.load(ROOT / "recipes" / "tiny" / "chat_tiny.yaml")["lora"]  # every lora key, filled in
    recipe["lora"] = {**defaults, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    tok = model_mod.load_tokenizer(recipe)
    ds = data_mod.prepare(recipe, tok, roles=("train",)).splits["train"]
    args = train._setup_training(recipe, tmp_path / "run", has_eval=False)
    assert args.assistant_only_loss and not args.completion_only_loss
    trainer = SFTTrainer(model=model_mod.load_for_training(recipe), args=args,
                         train_dataset=ds.select_columns(["messages"]), processing_class=tok)
    labels = trainer.train_dataset[0]["labels"]
    assert tok.decode([t for t in labels if t != -100]) == "Sports<|im_end|>Business<|im_end|>"


@pytest.mark.slow
def test_the_runners_scoring_path_scores_an_answer_with_its_end_of_turn_marker(tiny):
    """Loss-style evaluators read log-likelihoods that runner.evaluate.evaluate.scored_records computes: for chat data, of
    the answer followed by the template's end of turn, as it was trained (not by EOS)."""
    from runner.evaluate import evaluate
    from runner.model import model as model_mod

    recipe = recipes.load(ROOT / "recipes" / "tiny" / "chat_tiny.yaml", ["data.test_samples=3"])
    tok = model_mod.load_tokenizer(recipe)
    examples = data_mod.prepare(recipe, tok, roles=("test",)).splits["test"]
    records = evaluate.scored_records(recipe, model_mod.load_for_inference(recipe, None), tok, examples)
    prompts, answers = list(examples["prompt"]), list(examples["completion"])
    with_end = rank.tokenize_pairs(tok, prompts, answers, "<|im_end|>")
    with_eos = rank.tokenize_pairs(tok, prompts, answers, tok.eos_token)
    assert [r.tokens for r in records] == [n for _, n in with_end] != [n for _, n in with_eos]
    assert all(r.logprob < 0 for r in records)


# ---------------------------------------------------------------- the chat twin: learns, one template everywhere


@pytest.mark.twins("chat_tiny")
def test_the_chat_twin_learns_and_evaluates_with_the_template_it_trained_with(trained):
    from transformers import AutoTokenizer

    run = trained("chat_tiny").run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    # Four topics about equally often: input-blind guessing scores about 0.3; the untrained model names no label.
    assert metrics["classification"]["accuracy"] >= 0.6, metrics["classification"]
    saved = AutoTokenizer.from_pretrained(run / "adapter")
    assert saved.chat_template == chat.CHATML  # saved with the adapter: plain transformers renders chats the same
    test = [json.loads(line) for line in (ROOT / ".cache/tiny/data/chat_tiny/test.jsonl").read_text().splitlines()]
    by_id = {row["id"]: row["messages"] for row in test}
    for row in map(json.loads, (run / "predictions.jsonl").read_text().splitlines()):
        history = by_id[row["id"]][:-1]
        assert row["prompt"] == saved.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert "<|im_end|>" not in row["prediction"]
    report = (run / "report.md").read_text()
    assert "Chat data in `messages`" in report and "`chatml`" in report


@pytest.mark.twins("chat_tiny")
def test_generate_and_compare_use_the_same_template_as_evaluation(trained, cli, tmp_path):
    twin = trained("chat_tiny")
    preds = [json.loads(line) for line in (twin.run_dir / "predictions.jsonl").read_text().splitlines()][:6]
    test = {row["id"]: row for row in map(json.loads, (ROOT / ".cache/tiny/data/chat_tiny/test.jsonl")
                                          .read_text().splitlines())}
    inputs = "".join(json.dumps({"messages": test[p["id"]]["messages"][:-1]}) + "\n" for p in preds)
    out = cli("generate", twin.recipe, "--run", twin.run_dir, "--input", "-", "--jsonl", input=inputs)
    assert out.returncode == 0, out.stderr[-2000:]
    got = [json.loads(line)["completion"] for line in out.stdout.splitlines() if line.startswith("{")]
    assert got == [p["prediction"] for p in preds]  # greedy: the same prompt gives the same answer
    bad = cli("generate", twin.recipe, "--run", twin.run_dir, "--input", "-",
              input=json.dumps({"messages": test[preds[0]["id"]]["messages"]}) + "\n")
    assert bad.returncode == 2 and "ends with an assistant turn" in bad.stderr, bad.stderr
    compared = cli("compare", twin.recipe, "--run", twin.run_dir, f"output_dir={twin.output_dir}")
    assert compared.returncode == 0, compared.stderr[-2000:]
    folder = Path(compared.stdout.strip().splitlines()[-1].removeprefix("done: ")).parent
    adapter = [json.loads(line) for line in (folder / "adapter" / "predictions.jsonl").read_text().splitlines()]
    mine = {p["index"]: p for p in map(json.loads, (twin.run_dir / "predictions.jsonl").read_text().splitlines())}
    assert [(p["prompt"], p["prediction"]) for p in adapter] == [(mine[p["index"]]["prompt"], mine[p["index"]]["prediction"])
                                                               for p in adapter]
