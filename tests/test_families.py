"""The model families (runner.model.families): the registry's declared contracts against each family's real
transformers classes (through its tiny twin, runner.model.twins), the presets, `runner validate`'s torch-free
target check, and each family's twin trained, evaluated (generate and rank) and exported through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from runner.cli import recipes
from runner.model import families
from runner.model import lora as lora_mod
from tests.conftest import ROOT, ahead, cli_env, run_cli, run_folder

TWINNED = ("llama", "qwen3", "gemma3", "mistral", "phi3", "qwen3_moe")  # runner.model.twins.CONFIGS
PRESETS = {f.name: ROOT / "recipes" / "families" / f"{f.name}_xsum.yaml" for f in families.FAMILIES}
PRESETS["phi2"] = ROOT / "recipes" / "xsum_phi2.yaml"  # the study's own recipe
# Test accuracy on the 48 test conversations of the chat twin (4 topics: chance 0.25), generate and rank mode.
# Measured (120 steps): see each family's twin recipe; the floor leaves room for the seed-to-seed spread.
FLOOR = 0.45

_build_lock = threading.Lock()  # the jobs run in two lanes (threads): one builds the twins, the other waits


def _twins():
    from runner.model import twins

    with _build_lock:
        return twins.build()


@pytest.fixture(scope="module")
def built():
    return _twins()


def _twin_recipe(name: str):
    return ROOT / "recipes" / "tiny" / f"{name}_tiny.yaml"


# ---------------------------------------------------------------- the registry against transformers


@pytest.mark.parametrize("name", TWINNED)
def test_declared_linear_modules_are_the_models(name, built):
    """What the registry declares (and `runner validate` checks without torch) is what the family's transformers
    class builds: every nn.Linear leaf but the head, the embeddings tied or not, the sliding window, the experts."""
    from transformers import AutoConfig

    from runner.model import model

    family = families.BY_NAME[name]
    config = AutoConfig.from_pretrained(built / name)
    assert families.for_model_type(config.model_type) is family
    meta = model.meta_model(config)
    assert lora_mod.linear_module_names(meta) == sorted(family.linear_for(config.to_dict()))
    assert config.tie_word_embeddings is family.tied_embeddings
    assert bool(getattr(config, "sliding_window", None)) is bool(family.sliding_window)
    params = {n.split("layers.0.", 1)[-1] for n, _ in meta.named_parameters() if ".layers.0." in n}
    assert set(family.experts + family.router) <= params, params
    if not family.gated_mlp:
        assert not {"gate_proj", "gate_up_proj"} & set(family.linear)


def test_phi2_declaration_matches_the_phi_twin(tiny):
    from transformers import AutoConfig

    from runner.model import model

    config = AutoConfig.from_pretrained(tiny / "phi")
    family = families.for_model_type(config.model_type)
    assert family is families.BY_NAME["phi2"]
    assert lora_mod.linear_module_names(model.meta_model(config)) == sorted(family.linear)


def test_a_mixture_of_experts_with_dense_layers_has_their_mlp_linears():
    moe = families.BY_NAME["qwen3_moe"]
    assert moe.linear_for({"mlp_only_layers": [], "decoder_sparse_step": 1}) == families.ATTENTION
    assert set(families.GATED_MLP) <= set(moe.linear_for({"mlp_only_layers": [0]}))


@pytest.mark.parametrize("name", TWINNED)
def test_twin_tokenizer_carries_the_family_tokens_and_template(name, built):
    from transformers import AutoTokenizer

    family = families.BY_NAME[name]
    tok = AutoTokenizer.from_pretrained(built / name)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (family.bos, family.eos, family.pad)
    for token in family.special_tokens:
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id and len(tok(token, add_special_tokens=False)
                                                                           ["input_ids"]) == 1, token
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) is family.add_bos
    assert tok.chat_template == family.chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                       tokenize=False)
    assert rendered.rstrip().endswith(family.turn_end) or family.turn_end + "\n" in rendered


@pytest.mark.parametrize("name", TWINNED)
def test_twin_recipe_writes_out_the_familys_template(name):
    recipe = recipes.load(_twin_recipe(name))
    assert recipe["prompt"]["chat_template"] == families.BY_NAME[name].chat_template


@pytest.mark.parametrize("name", [f.name for f in families.FAMILIES])
def test_each_family_has_a_preset_with_its_hub_id_and_targets(name):
    family = families.BY_NAME[name]
    recipe = recipes.load(PRESETS[name])
    assert recipe["model"]["name_or_path"] == family.preset
    assert recipe["lora"]["target_modules"] == (family.lora_targets if isinstance(family.lora_targets, str)
                                                else list(family.lora_targets))
    assert families.check_targets(recipe) is family  # from the hub id alone: no config here
    if family.turn_end:
        assert family.turn_end in recipe["generation"]["stop"]


# ---------------------------------------------------------------- runner validate, without torch


def _validate(*args):
    code = ("import sys; from runner.cli.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, "validate", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=cli_env())


def test_validate_names_the_familys_linear_modules_for_a_target_it_lacks(built):
    """From the local config.json (the twin) and from a preset's hub id: one error line, exit 2, no torch."""
    out = _validate(_twin_recipe("phi3"), "lora.target_modules=[qkv_proj,q_proj]")
    assert out.returncode == 2 and "HEAVY []" in out.stdout
    assert out.stderr == ("error: lora.target_modules[1]: Phi-3 (phi3) has no linear module 'q_proj' (did you mean "
                          "'qkv_proj'? its linear "
                          "modules: qkv_proj, o_proj, gate_up_proj, down_proj)\n"), out.stderr
    out = _validate(PRESETS["gemma3"], "lora.target_modules=[q_proj,dense]")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "Gemma 3 (text) (gemma3_text) has no linear module 'dense'" in out.stderr
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in out.stderr
    out = _validate(_twin_recipe("qwen3_moe"), "lora.target_modules=[q_proj,gate_proj]")
    assert out.returncode == 2 and "its experts (mlp.experts.gate_up_proj" in out.stderr


def test_validate_passes_the_familys_own_targets_and_names_the_family(built):
    out = _validate(_twin_recipe("llama"), "lora.target_modules=[q_proj,v_proj,down_proj]")
    assert out.returncode == 0, out.stderr
    assert "(Llama 3.x family)" in out.stdout and "HEAVY []" in out.stdout


def test_a_model_of_no_registered_family_is_left_to_training(tmp_path, tiny):
    """No family, no torch-free verdict on the targets: validate passes and the meta-device check decides later."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    out = _validate(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml", f"model.name_or_path={model_dir}",
                    "lora.target_modules=[query_key_value]")
    assert out.returncode == 0, out.stderr
    assert "family)" not in out.stdout


@pytest.mark.slow
def test_a_model_of_no_registered_family_trains_with_all_linear(tmp_path, tiny):
    """GPT-NeoX (not in the registry): `runner train` from name_or_path with all-linear."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    assert families.for_model_type("gpt_neox") is None
    tok = AutoTokenizer.from_pretrained(tiny / "phi")
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=-(-len(tok) // 64) * 64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=256,
                           bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    tok.save_pretrained(tmp_path / "neox")
    result = run_cli("train", ROOT / "recipes" / "tiny" / "xsum_tiny.yaml", f"model.name_or_path={tmp_path / 'neox'}",
                     f"output_dir={tmp_path / 'runs'}", "training.max_steps=2", "data.test_samples=4",
                     "generation.max_new_tokens=4", "lora.target_modules=all-linear")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_folder(result.stdout) / "metrics.json").read_text())
    assert "rouge" in json.dumps(metrics)


# ---------------------------------------------------------------- each twin through the real CLI


def _family_job(name: str):
    """Train the family's chat twin as written (generate-mode evaluation), evaluate the run again in rank mode,
    export it: (train, rank eval, export) results and the export folder."""

    def job(out, lane):
        _twins()
        recipe = _twin_recipe(name)
        train = run_cli("train", recipe, f"output_dir={out}", lane=lane)
        if train.returncode != 0:
            return train, None, None, None
        run = run_folder(train.stdout)
        rank = run_cli("eval", recipe, "--run", run, f"output_dir={out}", "generation.mode=rank", lane=lane)
        export = run_cli("export", recipe, "--run", run, "--out", out / "merged", lane=lane)
        return train, rank, export, out / "merged"

    return job


for _name in TWINNED:
    ahead(f"family {_name}")(_family_job(_name))


def _accuracy(folder) -> float:
    return json.loads((folder / "metrics.json").read_text())["classification"]["accuracy"]


@pytest.fixture(scope="module")
def family_runs(background):
    def get(name: str):
        _, (train, rank, export, merged) = background(f"family {name}")
        assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-4000:]
        return train, rank, export, merged

    return get


@pytest.mark.parametrize("name", TWINNED)
def test_family_twin_learns_in_generate_and_rank_mode(name, family_runs):
    train, rank, _, _ = family_runs(name)
    run = run_folder(train.stdout)
    assert _accuracy(run) >= FLOOR, train.stdout[-1500:]
    assert rank.returncode == 0, rank.stderr[-3000:]
    assert _accuracy(run_folder(rank.stdout)) >= FLOOR, rank.stdout[-1500:]
    saved = json.loads((run / "adapter" / "tokenizer_config.json").read_text())
    template = saved.get("chat_template") or (run / "adapter" / "chat_template.jinja").read_text()
    assert template == families.BY_NAME[name].chat_template  # the recipe's template went with the adapter


@pytest.mark.parametrize("name", TWINNED)
def test_family_twin_exports_a_plain_model_with_the_adapters_logits(name, family_runs):
    from transformers import AutoConfig

    _, _, export, merged = family_runs(name)
    assert export.returncode == 0, export.stderr[-3000:]
    record = json.loads((merged / "export.json").read_text())
    check = record["check_vs_adapter"]
    assert check["same_next_token"] and check["max_abs_logit_diff"] <= 1e-3 * max(1.0, check["max_abs_logit"]), check
    assert AutoConfig.from_pretrained(merged).model_type in families.BY_NAME[name].model_types


@pytest.mark.parametrize("name, prefix", [("mistral", " "), ("llama", ""), ("gemma3", ""), ("phi3", "")])
def test_rank_mode_scores_each_label_as_the_template_writes_an_answer(name, prefix, built):
    """Mistral writes "[/INST] answer": rank mode scores " Sports" after the prompt, as trained (it scored "Sports",
    which the model never saw there, and ranked at chance)."""
    from transformers import AutoTokenizer

    from runner.data import chat
    from runner.evaluate import rank

    recipe = recipes.load(_twin_recipe(name))
    tok = AutoTokenizer.from_pretrained(built / name)
    chat.attach(recipe, tok)
    assert chat.answer_prefix(tok) == prefix
    assert rank.candidate(recipe, "Sports", tok) == prefix + "Sports"
