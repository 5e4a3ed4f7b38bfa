"""`runner plan` on each family's real config (config.json only, tests/families.py): the memory model reads what the
config and the meta-device model declare, and its numbers move with each family feature (GQA, head_dim, gated MLPs,
norms, tied embeddings, vocabulary, sliding windows, softcapping, experts), not with the family's name."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from runner.cli import recipes
from runner.speed import memory, plan, profiles
from tests import families
from tests.conftest import ROOT

XSUM = ROOT / "recipes" / "xsum_phi2.yaml"
FAST = profiles.Speed("fast", 16, 1, False, fixed_shapes=True, keep_dtype=True, fused_activation=True,
                      cudnn_sdpa=False)
NONE = profiles.Speed("none", 4, 4, True)
ATTENTION = "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]"


def xsum(*overrides: str) -> dict:
    return recipes.load(XSUM, ["lora.target_modules=all-linear", *overrides])


def shape(name: str, **overrides) -> dict:
    return memory.model_shape(families.config(name, **overrides))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: families.write(name, tmp_path_factory.mktemp(name)) for name in families.REAL}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(families.REAL))
def test_plan_runs_on_each_familys_config_alone(name, folders, cli):
    result = cli("plan", XSUM, f"model.name_or_path={folders[name]}", "lora.target_modules=all-linear",
                 "lora.dropout=0", "--gpu-gb", "141")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"({families.config(name).model_type})" in out.splitlines()[0]
    # every profile has a row: a setting with its prediction, or (a budget too small for the family, e.g. the 8B
    # models in low_memory's 3.8 GiB, or Qwen3-30B-A3B's unquantized experts in 20 GiB) the smallest need
    for profile in ("none", "fast", "balanced", "low_memory"):
        row = rf"^{profile}\s+(\d+ x \d+\s+(yes|no)\s+[\d.]+ GiB|-\s+-\s+nothing fits [\d.]+ GiB: .* needs [\d.]+ GiB)$"
        assert re.search(row, out, re.M), out
    for profile in ("none", "fast"):  # a 141 GiB card holds every family
        assert re.search(rf"^{profile}\s+\d+ x \d+\s+(yes|no)\s+[\d.]+ GiB$", out, re.M), out
    parts = [float(v) for v in re.findall(r"^  (?![=+(]).*?\s([\d.]+) GiB$", out, re.M)]
    total = float(re.search(r"= peak reserved by torch\s+([\d.]+) GiB", out).group(1))
    assert sum(parts) == pytest.approx(total, abs=0.01 * len(parts))
    assert ("unquantized experts" in out) == ("num_experts" in families.REAL[name][1])


@pytest.mark.slow
def test_the_report_counts_each_familys_published_parameters(folders):
    # published sizes (billions of parameters) the meta-device models must reproduce
    sizes = {"llama-3.2-1b": 1.24, "llama-3.1-8b": 8.03, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02, "qwen3-8b": 8.19,
             "gemma-3-1b": 1.00, "mistral-7b-v0.3": 7.25, "phi-3-mini": 3.82, "phi-2": 2.78, "qwen3-30b-a3b": 30.5}
    for name, billions in sizes.items():
        text = plan.report(xsum(f"model.name_or_path={folders[name]}", "lora.dropout=0"), card_gb=80.0)
        total = int(re.search(r"all params: ([\d,]+)", text).group(1).replace(",", ""))
        lora = total - int(re.search(r"trainable params: ([\d,]+)", text).group(1).replace(",", ""))
        assert lora / 1e9 == pytest.approx(billions, rel=0.01), name


# ---------------------------------------------------------------- what each feature changes


def test_shapes_are_read_from_config_and_modules_not_from_the_family_name():
    llama, qwen, gemma, phi3, phi2 = (shape(n) for n in ("llama-3.2-1b", "qwen3-4b", "gemma-3-1b", "phi-3-mini", "phi-2"))
    moe = shape("qwen3-30b-a3b", num_hidden_layers=2)
    assert (llama["q_dim"], llama["kv_dim"], llama["gated"], llama["tied"]) == (2048, 512, True, True)  # GQA 32/8
    assert (qwen["q_dim"], qwen["kv_dim"]) == (4096, 1024)  # head_dim 128 is not 2560 / 32
    assert qwen["qk_norm_width"] == 4096 + 1024 and llama["qk_norm_width"] == 0  # Qwen 3 normalises q and k
    assert (gemma["q_dim"], gemma["kv_dim"], gemma["norms"]) == (1024, 256, 4)  # four norms around two branches
    assert gemma["windows"].count(512) == 22 and gemma["windows"].count(None) == 4  # five local layers to a global
    assert phi3["gated"] and phi3["layer0"]["gate_up_proj"] == (3072, 2 * 8192)  # one fused gate/up projection
    assert phi3["windows"] == [2047] * 32
    assert not phi2["gated"] and phi2["parallel"] and not phi2["python_norms"] and not phi2["tied"]
    assert llama["python_norms"] and not llama["parallel"] and llama["norms"] == 2
    assert (moe["experts"], moe["top_k"], moe["expert_inter"], moe["expert_gated"], moe["dense_mlp"]) == (
        128, 8, 768, True, False)
    # a renamed model type changes nothing: the facts come from the config's values and the modules
    renamed = families.config("llama-3.2-1b")
    renamed.model_type = "not-a-family"
    assert memory.model_shape(renamed, memory.model_mod.meta_model(families.config("llama-3.2-1b"))) == llama


def test_gqa_keeps_fewer_keys_and_values_in_training_and_in_the_kv_cache():
    recipe = xsum(ATTENTION)
    grouped, full = shape("llama-3.2-1b"), shape("llama-3.2-1b", num_key_value_heads=32)
    assert full["kv_dim"] == 4 * grouped["kv_dim"]
    diff = memory.layer_activation_bytes(full, recipe, False, True) - memory.layer_activation_bytes(
        grouped, recipe, False, True)
    assert diff == 2 * 2 * (full["kv_dim"] - grouped["kv_dim"])  # k and v, bf16
    assert memory.kv_bytes(full, 2, 1000) == 4 * memory.kv_bytes(grouped, 2, 1000)


def test_head_dim_set_apart_from_hidden_over_heads_sizes_q_and_the_attention_output():
    recipe = xsum(ATTENTION)
    own = shape("qwen3-4b")
    derived = shape("qwen3-4b", head_dim=2560 // 32)
    diff = memory.layer_activation_bytes(own, recipe, False, True) - memory.layer_activation_bytes(
        derived, recipe, False, True)
    # q and the attention output (2 x q_dim) plus k and v (2 x kv_dim), bf16, the fp32 copies q/k norms keep, and
    # o_proj's LoRA input (q_dim wide: its copy and its dropout mask)
    assert diff == (2 * 2 * (4096 - 2560) + 2 * 2 * (1024 - 640) + 4 * ((4096 + 1024) - (2560 + 640))
                    + (2 + 1) * (4096 - 2560))


def test_a_gated_mlp_keeps_three_tensors_of_its_width_and_gelu_new_four_unfused():
    recipe = xsum(ATTENTION)
    gated = shape("phi-3-mini")
    plain = {**gated, "gated": False, "act": "gelu_new"}
    w = gated["inter"]
    assert memory.layer_activation_bytes(gated, recipe, False, True) - memory.layer_activation_bytes(
        plain, recipe, False, True) == (3 - 1) * 2 * w  # fused: a plain MLP keeps only the activation's input
    assert memory.layer_activation_bytes(plain, recipe, False, False) - memory.layer_activation_bytes(
        plain, recipe, False, True) == (4 - 1) * 2 * w  # gelu_new written in Python keeps four


def test_tied_embeddings_hold_one_vocabulary_matrix_untied_two():
    recipe = xsum()
    tied, untied = families.config("qwen3-1.7b"), families.config("qwen3-1.7b", tie_word_embeddings=False)
    a, b = memory.estimate(recipe, tied, FAST), memory.estimate(recipe, untied, FAST)
    key = "unquantized weights (bf16)"
    assert b.parts[key] - a.parts[key] == 151936 * 2048 * 2
    up_a, up_b = memory.estimate(recipe, tied, NONE), memory.estimate(recipe, untied, NONE)
    assert up_b.parts["unquantized weights (fp32, upcast)"] - up_a.parts["unquantized weights (fp32, upcast)"] == (
        151936 * 2048 * 4)  # profile none: peft upcasts the head too


def test_a_large_vocabulary_is_weights_in_training_and_logits_in_evaluation():
    recipe = xsum()
    gemma = families.config("gemma-3-1b")
    small = families.config("gemma-3-1b", vocab_size=32768)
    a, b = memory.estimate(recipe, gemma, FAST), memory.estimate(recipe, small, FAST)
    assert a.parts["unquantized weights (bf16)"] - b.parts["unquantized weights (bf16)"] == (
        (262144 - 32768) * 1152 * 2)  # tied: one matrix
    # the fused LM head projects tiles of at most HEAD_VOCAB entries: the vocabulary does not widen them
    assert a.parts["logits/loss (fused LM head tiles)"] == b.parts["logits/loss (fused LM head tiles)"]
    big, little = shape("gemma-3-1b"), shape("gemma-3-1b", vocab_size=32768)
    assert memory.scoring_row_bytes(big, 2, 100, 4) - memory.scoring_row_bytes(little, 2, 100, 4) == (
        5 * (262144 - 32768) * (2 + 12))


def test_sliding_windows_keep_only_their_window_of_the_kv_cache():
    gemma = shape("gemma-3-1b")
    every = {**gemma, "windows": [None] * 26}
    c, width = 2, 2048
    per_layer = 2 * gemma["kv_dim"] * c
    assert memory.kv_bytes(every, c, width) - memory.kv_bytes(gemma, c, width) == 22 * (width - 512) * per_layer
    assert memory.kv_bytes(every, c, 400) == memory.kv_bytes(gemma, c, 400)  # within the window: no difference
    assert memory.generation_row_bytes(gemma, c, 1500, 548, True) < memory.generation_row_bytes(every, c, 1500, 548, True)
    # training: a window narrower than the rows makes transformers build one [rows, 1, L, L] mask
    assert memory.window_mask_bytes(gemma, 16, 1024) == 16 * 1024 * 1024
    assert memory.window_mask_bytes(gemma, 16, 512) == 0


def test_a_final_logit_softcap_adds_its_temporaries_to_evaluations_logits():
    capped, plain = shape("gemma-3-1b", final_logit_softcapping=30.0), shape("gemma-3-1b")
    assert memory.scoring_row_bytes(capped, 2, 100, 4) - memory.scoring_row_bytes(plain, 2, 100, 4) == (
        5 * 262144 * 2 * 2)
    assert memory.generation_row_bytes(capped, 2, 100, 8, True) - memory.generation_row_bytes(
        plain, 2, 100, 8, True) == 262144 * 2 * 2


def test_experts_and_router_are_counted_unquantized_and_their_tokens_activations():
    cfg = families.config("qwen3-30b-a3b", num_hidden_layers=4)
    recipe = xsum(ATTENTION)
    info = memory.model_info(recipe, cfg)
    assert info["expert_elements"] == 4 * 128 * 3 * 768 * 2048  # gate_up [E, 2 x 768, 2048] + down [E, 2048, 768]
    est = memory.estimate(recipe, cfg, FAST, info)
    assert est.parts["unquantized experts (bf16)"] == info["expert_elements"] * 2
    router = 4 * 128 * 2048
    assert est.parts["unquantized weights (bf16)"] >= router * 2  # the router's weights are no nn.Linear either
    dense = {**info, "experts": 0}
    per_token = memory.layer_activation_bytes(info, recipe, False, True) - memory.layer_activation_bytes(
        dense, recipe, False, True)
    assert per_token == 128 * (2 + 4) + 8 * 2 * (3 * 768 + 2048)
    fewer = memory.model_info(recipe, families.config("qwen3-30b-a3b", num_hidden_layers=4, num_experts_per_tok=2))
    assert memory.layer_activation_bytes(fewer, recipe, False, True) < memory.layer_activation_bytes(
        info, recipe, False, True)


def test_phi2s_plan_is_what_it_was():
    """The families' generalisation leaves Phi-2's numbers as measured (tests/test_plan.py holds them to the GPU)."""
    recipe = recipes.load(XSUM, [])
    phi2 = families.config("phi-2")
    assert memory.estimate(recipe, phi2, FAST).reserved_gb == pytest.approx(21.851, abs=0.001)
    assert memory.estimate(recipe, phi2, replace(NONE)).reserved_gb == pytest.approx(3.821, abs=0.001)


def test_lora_on_the_experts_follows_the_targets_and_counts_the_stacks_it_materialises():
    """all-linear reaches the experts' stacked weights (peft's ParamWrapper), attention targets do not; on the
    experts each layer's forward builds W + B A for its whole stack and keeps it for backward."""
    cfg = families.config("qwen3-30b-a3b", num_hidden_layers=4)
    attention = memory.model_info(xsum(ATTENTION, "lora.dropout=0"), cfg)
    everything = memory.model_info(xsum("lora.dropout=0"), cfg)
    assert attention["lora_expert_elements"] == 0
    assert everything["lora_expert_elements"] == 128 * 3 * 768 * 2048  # one layer's gate_up + down stacks
    assert everything["trainable"] > attention["trainable"]
    recipe = xsum("lora.dropout=0")
    eager, ckpt = replace(FAST, micro_batch_size=1), replace(FAST, micro_batch_size=1, gradient_checkpointing=True)
    label = "activations (all layers), 1 x 512 tokens"
    with_stacks = memory.estimate(recipe, cfg, eager, everything).parts[label]
    without = memory.estimate(recipe, cfg, eager, {**everything, "lora_expert_elements": 0}).parts[label]
    assert with_stacks - without >= 4 * everything["lora_expert_elements"] * 2  # every layer's stack, bf16
    label = "activations (checkpoints + one recomputed layer), 1 x 512 tokens"
    a = memory.estimate(recipe, cfg, ckpt, everything).parts[label]
    b = memory.estimate(recipe, cfg, ckpt, {**everything, "lora_expert_elements": 0}).parts[label]
    assert everything["lora_expert_elements"] * 2 <= a - b < 2 * everything["lora_expert_elements"] * 2  # one


def test_lora_dropout_on_the_experts_is_one_error_line_before_anything_loads(tmp_path, cli):
    folder = families.write("qwen3-30b-a3b", tmp_path, num_hidden_layers=2)
    result = cli("plan", XSUM, f"model.name_or_path={folder}", "lora.target_modules=all-linear")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: lora.dropout: 0.05: peft's LoRA on the experts")
    assert "Traceback" not in result.stderr
    ok = cli("plan", XSUM, f"model.name_or_path={folder}", ATTENTION)
    assert ok.returncode == 0, ok.stderr[-2000:]  # attention targets: the recipe's dropout stays
