"""training.method and model.adapter without training: the recipe rules of each method, preference pairs checked
and fitted before any weight loads (template and chat form, one `error:` line naming the key and the row), what
`runner inspect` and the report show of them, the TRL config each method gets, and where model.adapter points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.data import preference
from runner.model import start
from runner.report import signals
from runner.train import methods
from tests.conftest import ROOT, run_cli

DPO_TINY = ROOT / "recipes" / "tiny" / "agnews_dpo_tiny.yaml"
PROMPT = "Instruction: Classify the topic.\nArticle: {text}\nTopic:"


def recipe(*overrides: str) -> dict:
    return recipes.load(DPO_TINY, list(overrides))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(items: list[dict]) -> dict:
    return {k: [r.get(k) for r in items] for k in items[0]}


# ---------------------------------------------------------------- the recipe rules


@pytest.mark.parametrize("override, key", [
    ("evaluation.split=eval", "evaluation.split"),          # eval holds the trainer's pairs, not completions
    ("training.packing=true", "training.packing"),          # a pair's sides are compared as whole sequences
    ("prompt.chosen=answer", "prompt.chosen"),              # a template that names no field
    ("training.task_metrics=8", "training.task_metrics"),  # the task's evaluators cannot score pairs
])
def test_preference_recipe_rules(override, key):
    with pytest.raises(RecipeError) as caught:
        recipe(override)
    assert caught.value.key_path == key


def test_chat_pairs_name_a_column_each(tmp_path):
    with pytest.raises(RecipeError) as caught:
        recipes.load(ROOT / "recipes" / "tiny" / "chat_tiny.yaml",
                     ["training.method=dpo", "prompt.chosen=answer {chosen}"])
    assert caught.value.key_path == "prompt.chosen" and "'{chosen}'" in caught.value.hint


def test_an_adapter_to_start_from_needs_lora():
    with pytest.raises(RecipeError) as caught:
        recipe("quantization.method=none", "lora=null", "model.adapter=/tmp")
    assert caught.value.key_path == "model.adapter"


def test_the_default_method_is_sft_and_nothing_changes_for_it():
    r = recipes.load(ROOT / "recipes" / "tiny" / "agnews_tiny.yaml")
    assert r["training"]["method"] == "sft" and r["model"]["adapter"] is None
    assert r["training"]["dpo"] == {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                    "precompute_reference": False}


# ---------------------------------------------------------------- pairs: checked and fitted


def test_template_pairs_are_rendered_and_counted(tokenizer):
    r = recipe()
    out = preference.fit_batch(rows_of([{"text": "Rain in Norburg.", "label": "World", "rejected": "Sports",
                                         "id": "a"}]), r, tokenizer, "train")
    prompt = out["prompt"][0]
    assert out["chosen"] == [" World"] and out["rejected"] == [" Sports"]
    for side in ("chosen", "rejected"):  # prompt + side + the EOS TRL appends
        assert out[f"n_{side}"][0] == len(tokenizer(prompt + out[side][0])["input_ids"]) + 1
    assert out["n_tokens"][0] == max(out["n_chosen"][0], out["n_rejected"][0]) and out["id"] == ["a"]


def test_a_long_prompt_is_cut_to_fit_the_longer_side(tokenizer):
    r = recipe("prompt.max_length=40", "data.max_tokens=null")
    long_text = "Leaders met in Norburg on Tuesday to talk about the crisis. " * 8
    out = preference.fit_batch(rows_of([{"text": long_text, "label": "World", "rejected": "Sci/Tech"}]), r,
                               tokenizer, "train")
    assert out["truncated"] == [True] and out["n_tokens"][0] <= 40
    assert out["n_rejected"][0] == len(tokenizer(out["prompt"][0] + " Sci/Tech")["input_ids"]) + 1


@pytest.mark.parametrize("row, key, words", [
    ({"text": "x", "label": "World", "rejected": "World"}, "prompt.rejected", "identical"),
    ({"text": "x", "label": "", "rejected": "World"}, "prompt.chosen", "chosen answer is empty"),
    ({"text": "x", "label": "World", "rejected": "  "}, "prompt.rejected", "rejected answer is empty"),
])
def test_a_bad_pair_is_refused_naming_its_row(tokenizer, row, key, words):
    good = {"text": "y", "label": "Sports", "rejected": "World", "id": "ok"}
    with pytest.raises(RecipeError) as caught:
        preference.fit_batch(rows_of([good, {**row, "id": "bad-7"}]), recipe(),
                             tokenizer, "train")
    assert caught.value.key_path == key and words in caught.value.problem
    assert "train row 1 (id bad-7)" in caught.value.problem


def test_a_missing_pair_column_names_the_key(tmp_path, tokenizer):
    from datasets import Dataset

    ds = Dataset.from_list([{"text": "x", "label": "World", "wrong": "Sports"}])
    with pytest.raises(RecipeError) as caught:
        preference.render_split(ds, recipe(), tokenizer, "train")
    assert caught.value.key_path == "prompt.rejected" and "{rejected}" in caught.value.problem


def test_chat_pairs(tokenizer):
    r = recipes.load(ROOT / "recipes" / "tiny" / "chat_tiny.yaml", ["training.method=dpo"])
    from runner.data import chat

    tok = tokenizer
    chat.attach(r, tok)
    turns = [{"role": "user", "content": "Topic of: rain in Norburg?"}]
    out = preference.chat_batch({"messages": [turns], "chosen": ["World"],
                                 "rejected": [[{"role": "assistant", "content": "Sports"}]]}, r, tok, "train")
    assert out["chosen"] == [[{"role": "assistant", "content": "World"}]]
    assert out["n_rejected"][0] == len(tok.apply_chat_template(turns + out["rejected"][0], tokenize=True,
                                                                return_dict=True)["input_ids"])
    with pytest.raises(RecipeError) as caught:  # the prompt must end where the answers begin
        preference.chat_batch({"messages": [turns + [{"role": "assistant", "content": "World"}]],
                               "chosen": ["World"], "rejected": ["Sports"]}, r, tok, "train")
    assert caught.value.key_path == "prompt.messages" and "train row 0" in caught.value.problem


@pytest.mark.slow
def test_train_refuses_bad_pairs_before_any_weight_loads(tmp_path):
    """One `error:` line, exit 2, and no run folder: the pairs are checked with the data, before the model."""
    rows = [{"id": f"r{i}", "text": "Rain in Norburg.", "label": "World", "rejected": "Sports"} for i in range(8)]
    rows[5]["rejected"] = "World"
    data = write_rows(tmp_path / "pairs.jsonl", rows)
    result = run_cli("train", DPO_TINY, f"data.source.train={data}", f"data.source.eval={data}",
                     f"output_dir={tmp_path / 'runs'}", "data.train_samples=null", "data.eval_samples=null")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert errors == [errors[0]] and errors[0].startswith("error: prompt.rejected: ")
    assert "(id r5)" in errors[0] and "identical" in errors[0]
    assert "Loading weights" not in result.stdout + result.stderr
    assert not any((tmp_path / "runs").rglob("recipe.yaml"))


@pytest.mark.slow
def test_a_sweep_over_dpo_beta_checks_and_plans_each_cell(tmp_path):
    result = run_cli("sweep", DPO_TINY, "training.dpo.beta=0.05,0.5", f"output_dir={tmp_path}", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 setting(s) x 1 seed(s) = 2 cells" in result.stdout
    assert "training.dpo.beta=0.05: profile none" in result.stdout and "training.dpo.beta=0.5: " in result.stdout


# ---------------------------------------------------------------- inspect, config, start, report


def test_inspect_reports_both_sides(tokenizer):
    from runner.data import inspection

    result = inspection.analyze(recipe("data.train_samples=16", "data.eval_samples=8", "prompt.max_length=48", "data.max_tokens=null"),
                                tokenizer, use_cache=False)
    train = result["splits"]["train"]
    assert {"prompt", "chosen", "rejected", "prompt+chosen+EOS", "prompt+rejected+EOS"} <= set(train["lengths"])
    assert train["rows"] == 16 and train["truncated"] > 0  # prompts near 50 tokens cut to fit 48
    assert "prompt+rejected+EOS" in inspection.table(result)
    assert "completion" in result["splits"]["test"]["lengths"]  # the evaluation split: as for sft


@pytest.mark.parametrize("name, cls, values", [
    ("dpo", "DPOConfig", {"beta": 0.3, "loss_type": ["ipo"]}),
    ("kto", "KTOConfig", {"beta": 0.3, "desirable_weight": 2.0}),
    ("orpo", "ORPOConfig", {"beta": 0.3}),
    ("pretrain", "SFTConfig", {"packing": True, "completion_only_loss": False, "dataset_text_field": "text"}),
])
def test_each_method_gets_its_trl_config(name, cls, values, tmp_path):
    r = recipe(f"training.method={name}", "training.dpo.beta=0.3", "training.dpo.loss_type=ipo",
               "training.kto.beta=0.3", "training.kto.desirable_weight=2", "training.orpo.beta=0.3")
    args = methods.config(r, dict(output_dir=str(tmp_path), use_cpu=True, packing=False, max_length=96,
                                  completion_only_loss=True, assistant_only_loss=False))
    assert type(args).__name__ == cls
    assert {k: getattr(args, k) for k in values} == values


def test_model_adapter_resolves(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "recipe.yaml").write_text("")
    r = recipe(f"model.adapter={run}")
    with pytest.raises(RecipeError, match="has not finished"):
        start.resolve(r)
    (run / "report.md").write_text("")
    (run / "env.json").write_text(json.dumps({"started_from": {"adapter": "org/sft-adapter"}}))
    assert start.resolve(r) == str(run / "adapter")
    assert start.describe(r)["started_from"] == {"adapter": "org/sft-adapter"}  # the chain
    assert start.resolve(recipe(f"model.adapter={run / 'adapter'}")) == str(run / "adapter")
    with pytest.raises(RecipeError, match="does not exist"):
        start.resolve(recipe(f"model.adapter={tmp_path / 'nowhere'}"))


def test_the_report_shows_the_method_and_its_signals():
    r = recipe()
    env = {"started_from": {"adapter": "runs/a", "run": "runs/a", "started_from": {"adapter": "org/base-sft"}}}
    log = [{"step": 4, "loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.01},
           {"step": 8, "eval_loss": 0.6, "eval_rewards/accuracies": 0.9, "eval_rewards/margins": 0.2,
            "eval_logps/chosen": -1.0, "eval_logps/rejected": -9.0}]
    text = "\n".join(signals.section(r, env, log))
    assert "training.method **dpo**, started from `runs/a`" in text
    assert "`runs/a` ← `org/base-sft`" in text
    assert "| eval pairs, step 8 | 0.9 | 0.2 | -1 | -9 |" in text
    assert signals.section(recipes.load(ROOT / "recipes" / "tiny" / "agnews_tiny.yaml"), {}, log) == []


# ---------------------------------------------------------------- the memory model learns the method


@pytest.mark.parametrize("name, rows, reference", [("sft", 4, False), ("dpo", 8, True), ("orpo", 8, False),
                                                   ("kto", 4, True)])
def test_the_memory_model_counts_the_methods_sequences_and_reference(name, rows, reference):
    """Phi-2's shape: a pair puts two sequences through the policy (DPO, ORPO), KTO one; DPO and KTO hold a frozen
    copy of the adapter as the reference, as large as the trained LoRA weights."""
    from transformers import PhiConfig

    from runner.speed import memory, profiles
    from tests.test_plan import PHI2

    r = recipes.load(ROOT / "recipes" / "agnews_phi2.yaml", [f"training.method={name}"])
    est = memory.estimate(r, PhiConfig(**PHI2), profiles.Speed("none", 4, 4, True))
    sft = memory.estimate(recipes.load(ROOT / "recipes" / "agnews_phi2.yaml"), PhiConfig(**PHI2),
                          profiles.Speed("none", 4, 4, True))
    activations = next(k for k in est.parts if k.startswith("activations"))
    assert f", {rows} x 256 tokens" in activations
    assert est.parts[activations] == pytest.approx(sft.parts[next(k for k in sft.parts if k.startswith("activ"))]
                                                   * rows / 4)
    copy = est.parts.get("reference adapter (frozen LoRA copy)")
    assert (copy is not None) == reference
    if reference:  # the bf16 weights alone: half of weight + gradient (the paged optimizer keeps its state apart)
        assert copy == pytest.approx(est.parts["LoRA weights + grads + optimizer"] / 2)
