"""Model: Phi-2's exact LoRA parameter count from the config alone; the tiny model through the real 4-bit path."""

from __future__ import annotations

import pytest

from runner.cli import recipes
from runner.model import counting
from runner.model import lora as lora_mod
from runner.model import model as model_mod
from tests.conftest import ROOT

PHI2 = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
            num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048)


def test_phi2_study_lora_has_exactly_10_485_760_trainable_parameters():
    from transformers import PhiConfig

    recipe = recipes.load(ROOT / "recipes" / "xsum_phi2.yaml")
    meta = model_mod.meta_model(PhiConfig(**PHI2))
    lora_mod.check_targets(recipe, meta)
    trainable, total = counting.meta_lora_counts(recipe, meta)
    assert trainable == 10_485_760
    assert total - trainable == 2_779_683_840  # Phi-2's own parameters
    assert f"{100 * trainable / total:.2f}" == "0.38"


def test_linear_module_names_of_phi_exclude_the_output_head():
    from transformers import PhiConfig

    names = lora_mod.linear_module_names(model_mod.meta_model(PhiConfig(**{**PHI2, "num_hidden_layers": 1})))
    assert names == ["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"]


@pytest.fixture
def tiny_recipe(tiny):
    return recipes.load(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml")


def test_tiny_model_loads_in_4bit_through_from_pretrained_with_lora(tiny_recipe):
    import bitsandbytes as bnb
    import torch

    torch.set_num_threads(1)
    model = model_mod.load_for_training(tiny_recipe)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 4 * 6  # every linear layer of 4 blocks is NF4
    assert four_bit[0].weight.quant_state.quant_type == "nf4"
    trainable, total = counting.count_parameters(model)
    assert 0 < trainable < total
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape[:2] == (1, 3)


def test_pad_token_is_set_without_growing_the_vocabulary(tiny_recipe):
    tok = model_mod.load_tokenizer(tiny_recipe)
    assert tok.pad_token == tok.eos_token
    assert len(tok) == len(model_mod.load_tokenizer(tiny_recipe))


def test_auto_dtype_is_fp32_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU rule")
    assert model_mod.resolve_dtype("auto") is torch.float32
    assert model_mod.resolve_dtype("bfloat16") is torch.bfloat16


@pytest.mark.parametrize("method,layer", [("bnb_8bit", "Linear8bitLt"), ("none", "Linear")])
def test_other_quantization_methods_load_with_lora(tiny_recipe, method, layer):
    import torch

    torch.set_num_threads(1)
    tiny_recipe["quantization"]["method"] = method
    model = model_mod.load_for_training(tiny_recipe)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == layer
    loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    assert q_proj.lora_B["default"].weight.grad is not None
