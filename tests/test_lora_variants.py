"""LoRA variants peft has (DoRA, rsLoRA, modules_to_save, layers_to_transform, gaussian / PiSSA / LoftQ init):
checked against the model before weights load, counted exactly by `runner plan`, trained through the 4-bit path,
and merged by the evaluation copy / export without changing what the model computes."""

from __future__ import annotations

import types

import pytest

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.model import counting
from runner.model import lora as lora_mod
from runner.model import model as model_mod
from runner.speed import memory, plan, profiles
from tests.conftest import ROOT
from tests.test_plan import PHI2

XSUM = ROOT / "recipes" / "xsum_phi2.yaml"
TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
STUDY_LORA = 10_485_760  # r=16 on q, k, v, dense of Phi-2's 32 layers


@pytest.fixture(scope="module")
def phi2_dir(tmp_path_factory):
    from transformers import PhiConfig

    folder = tmp_path_factory.mktemp("phi2-config")
    PhiConfig(**PHI2).save_pretrained(folder)
    return folder


def phi2_counts(phi2_dir, *overrides: str) -> tuple[int, int]:
    recipe = recipes.load(XSUM, [f"model.name_or_path={phi2_dir}", *overrides])
    meta = model_mod.check(recipe)
    return counting.meta_lora_counts(recipe, model_mod.meta_model(meta.config))


@pytest.mark.parametrize("overrides,trainable", [
    ((), STUDY_LORA),
    (("lora.rslora=true",), STUDY_LORA),  # only the scale changes
    (("lora.init=gaussian",), STUDY_LORA),
    # DoRA adds one magnitude per output feature of each adapted layer: 4 targets x 2560 x 32 layers
    (("lora.dora=true",), STUDY_LORA + 4 * 2560 * 32),
    (("lora.layers_to_transform=[0,1,2,3,4,5,6,7]",), STUDY_LORA // 4),
    # the output head trained in full: 2560 x 51200 weights + 51200 biases
    (("lora.modules_to_save=[lm_head]",), STUDY_LORA + 2560 * 51200 + 51200),
])
def test_plan_counts_each_variant_exactly_from_the_config(phi2_dir, overrides, trainable):
    assert phi2_counts(phi2_dir, *overrides)[0] == trainable


def test_plan_shows_the_variants_and_their_parameters(phi2_dir):
    recipe = recipes.load(XSUM, [f"model.name_or_path={phi2_dir}", "lora.dora=true", "lora.rslora=true",
                                    "lora.layers_to_transform=[0,1]"])
    text = plan.report(recipe, 80.0)
    assert "LoRA r=16 on q_proj, k_proj, v_proj, dense (DoRA; rsLoRA; layers 0, 1)" in text
    assert f"trainable params: {STUDY_LORA // 16 + 4 * 2560 * 2:,}" in text


def test_dora_and_fewer_layers_move_the_activation_estimate_the_right_way(phi2_dir):
    from transformers import PhiConfig

    config = PhiConfig(**PHI2)
    speed = profiles.Speed("none", 4, 4, False)

    def activations(*overrides):
        recipe = recipes.load(XSUM, [f"model.name_or_path={phi2_dir}", *overrides])
        est = memory.estimate(recipe, config, speed)
        return next(v for k, v in est.parts.items() if k.startswith("activations"))

    plain = activations()
    assert activations("lora.dora=true") > plain
    assert activations("lora.layers_to_transform=[0]") < plain


@pytest.mark.parametrize("overrides,where,words", [
    (["lora.modules_to_save=[lm_haed]"], "lora.modules_to_save[0]", "did you mean 'lm_head'"),
    (["lora.modules_to_save=[fc1]", "lora.target_modules=[q_proj]"], "lora.modules_to_save[0]", "stores quantized"),
    (["lora.modules_to_save=[q_proj]", "lora.target_modules=[q_proj]"], "lora.modules_to_save[0]", "also a LoRA target"),
    (["lora.layers_to_transform=[0,4]"], "lora.layers_to_transform[1]", "has 4 layers: 0 to 3"),
])
def test_variants_are_checked_against_the_model_before_weights_load(tiny, overrides, where, words):
    recipe = recipes.load(TINY, overrides)
    with pytest.raises(RecipeError) as err:
        model_mod.check(recipe)
    assert err.value.key_path == where
    assert words in err.value.line()


@pytest.mark.parametrize("overrides,words", [
    (["lora.init=pissa"], "peft refuses bnb_4bit"),
    (["lora.init=pissa", "quantization.method=none", "lora.dora=true"], "pissa with dora"),
    (["lora.init=loftq", "quantization.method=none"], "use quantization.method: bnb_4bit"),
    (["lora.init=loftq", "quantization.method=bnb_8bit"], "with bnb_8bit there is none"),
])
def test_inits_that_need_particular_weights_are_refused_by_validate(tiny, overrides, words):
    with pytest.raises(RecipeError) as err:
        recipes.load(TINY, overrides)
    assert err.value.key_path == "lora.init"
    assert words in err.value.line()


def test_all_linear_with_a_layer_subset_adapts_only_those_layers(tiny):
    recipe = recipes.load(TINY, ["lora.layers_to_transform=[1,3]"])
    meta = model_mod.check(recipe)
    from peft import get_peft_model

    peft_model = get_peft_model(model_mod.meta_model(meta.config),
                                lora_mod.lora_config(recipe, counting=True, model=meta))
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert layers == {1, 3}
    kinds = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert kinds == set(lora_mod.linear_module_names(meta))  # every linear kind, as all-linear says


@pytest.mark.slow
def test_dora_rslora_modules_to_save_and_layers_train_in_4bit_and_merge_exactly(tiny):
    """All four at once on the 4-bit tiny model: the real count is plan's, a backward step reaches every kind of
    trainable weight, and the evaluation copy (dequantized, merged) computes what the 4-bit model + adapter does."""
    import torch

    from runner.model import merge

    torch.set_num_threads(2)
    overrides = ["lora.dora=true", "lora.rslora=true", "lora.modules_to_save=[lm_head]", "lora.layers_to_transform=[0,2]"]
    recipe = recipes.load(TINY, overrides)
    meta = model_mod.check(recipe)
    model = model_mod.load_for_training(recipe)
    assert counting.count_parameters(model) == counting.meta_lora_counts(recipe, model_mod.meta_model(meta.config))
    assert model.peft_config["default"].use_dora and model.peft_config["default"].use_rslora
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    kind = lambda name: name.split(".default")[0].rsplit(".", 1)[-1]  # noqa: E731
    reached = {kind(n) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    moved = {kind(n) for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {"lora_A", "lora_B", "lora_magnitude_vector", "modules_to_save"}
    assert moved == reached - {"lora_A"}  # B starts at zero, so A's first gradient is zero too
    with torch.no_grad():  # a trained-looking adapter: every trainable weight moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    copy = merge.merged_copy(model)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in copy.named_parameters())
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, copy(input_ids=ids).logits
    # measured 3e-6 with logits up to 4.4 (fp32 on CPU); the trained lm_head copy is the one merged (the original
    # head would be off by the 0.05 noise, orders of magnitude more)
    assert (want - got).abs().max() < 1e-4
    from runner.evaluate import backend

    with backend.model_for(backend.Choice("merged", 1), model) as evaluated:
        assert evaluated is not model
    with torch.no_grad():  # the copy shared the adapter's tensors while it was made; releasing it left them be
        assert torch.equal(model(input_ids=ids).logits, want)


@pytest.mark.slow
def test_pissa_adapter_is_saved_as_a_plain_lora_of_the_original_weights(tiny, tmp_path):
    """PiSSA trains against residual base weights; the saved adapter (converted by peft from the initial one the
    runner keeps) must give the same model on the *original* base that the run had in memory."""
    import torch

    from runner.common import dist
    from runner.train import train

    torch.set_num_threads(2)
    recipe = recipes.load(TINY, ["quantization.method=none", "lora.init=pissa", "lora.r=4"])
    tokenizer = model_mod.load_tokenizer(recipe)
    model = model_mod.load_for_training(recipe)
    init_dir = train._save_pissa_init(model, recipe, tmp_path, dist.World())
    assert (init_dir / "adapter_model.safetensors").is_file()
    with torch.no_grad():  # training moved the adapter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    train._save_adapter(types.SimpleNamespace(is_fsdp_enabled=False, model=model), tokenizer, tmp_path / "adapter",
                        dist.World(), init_dir)
    reloaded = model_mod.load_trained(recipe, tmp_path / "adapter")  # the original weights + the saved adapter
    assert reloaded.peft_config["default"].r == 8  # peft's conversion: rank 2r
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert (trained - again).abs().max() < 1e-3 * trained.abs().max()


def test_loftq_needs_a_cuda_gpu_and_says_so_before_weights_load(tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU refusal")
    recipe = recipes.load(TINY, ["lora.init=loftq"])
    with pytest.raises(RecipeError) as err:
        model_mod.check_trainable_here(recipe)
    assert err.value.key_path == "lora.init" and "CUDA GPU" in err.value.line()


@pytest.mark.slow
def test_loftq_on_a_gpu_starts_closer_to_the_original_weights(tiny):
    """LoftQ's point: 4-bit weights + B A approximate the full-precision weights better than 4-bit alone."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("peft computes LoftQ on a CUDA GPU")
    from transformers import AutoModelForCausalLM

    recipe = recipes.load(TINY, ["lora.init=loftq"])
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device="cuda")
    full = AutoModelForCausalLM.from_pretrained(recipe["model"]["name_or_path"], dtype=torch.float32).cuda().eval()
    loftq = model_mod.load_for_training(recipe).eval()
    plain = model_mod.load_for_training(recipes.load(TINY)).eval()
    with torch.no_grad():
        want = full(input_ids=ids).logits.float()
        gap_loftq = (loftq(input_ids=ids).logits.float() - want).abs().mean()
        gap_plain = (plain(input_ids=ids).logits.float() - want).abs().mean()
    assert gap_loftq < gap_plain
