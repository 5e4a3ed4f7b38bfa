"""The speed paths per family, on CPU-sized models of each family's own config class (tests/families.py): the
fused-activation swap finds each config's activation under the key the family uses, rank mode's last-position
logits equal a full forward's (Gemma's final-logit softcap included), packed scoring falls back where a sliding
window would change it, and the compile path finds each family's decoder layer or says why it cannot."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from runner.cli import recipes
from runner.evaluate import rank
from runner.model import model as model_mod
from runner.speed import profiles
from tests import families
from tests.conftest import ROOT

NAMES = ["llama-3.2-1b", "qwen3-1.7b", "gemma-3-1b", "mistral-7b-v0.3", "phi-3-mini", "phi-2", "qwen3-30b-a3b"]
XSUM = ROOT / "recipes" / "xsum_phi2.yaml"


def build(cfg, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    return model


# ---------------------------------------------------------------- the fused activation


@pytest.mark.parametrize("name", NAMES)
def test_the_swap_is_declared_per_family_and_changes_no_output(name, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = families.tiny(name)
    swap = model_mod.fused_activation_for(cfg)
    expected = {"phi-2": {"hidden_act": "gelu_pytorch_tanh"}}.get(name, {})  # the others run one kernel already
    assert swap == expected
    # a family naming its activation hidden_activation (Gemma) is swapped under that key
    gelu = families.tiny(name, **{next(k for k in model_mod.ACTIVATION_KEYS if hasattr(cfg, k)): "gelu_new"})
    swap = model_mod.fused_activation_for(gelu)
    assert list(swap.values()) == ["gelu_pytorch_tanh"] and hasattr(gelu, next(iter(swap)))
    build(gelu).save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    fused = AutoModelForCausalLM.from_pretrained(tmp_path, **swap).eval()  # as load_base passes it
    acts = {type(m).__name__ for n, m in fused.named_modules() if n.endswith("act_fn") or n.endswith("activation_fn")}
    assert acts and all("Tanh" in a for a in acts), acts  # the fused tanh-GELU module, in every layer
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, fused(ids).logits, atol=1e-4)


# ---------------------------------------------------------------- rank mode's logits


def full_forward_scores(model, rows) -> list[float]:
    """Each row's last n tokens' summed log-probabilities from a full forward of the row alone (every position's
    logits, the model's own softcap included)."""
    import torch

    out = []
    with torch.no_grad():
        for ids, n in rows:
            logits = model(torch.tensor([ids])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            out.append(sum(logprobs[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids))))
    return out


@pytest.mark.parametrize("name", [*NAMES, "gemma-softcap"])
def test_rank_modes_last_position_logits_are_a_full_forwards(name):
    import torch

    cfg = (families.tiny("gemma-3-1b", final_logit_softcapping=3.0) if name == "gemma-softcap"
           else families.tiny(name))
    model = build(cfg)
    tok = SimpleNamespace(pad_token_id=0)
    prompt = list(range(5, 25))  # longer than the tiny sliding windows (8)
    rows = [(prompt + tail, len(tail)) for tail in ([40, 41, 2], [50, 2], [60, 61, 62, 2])]
    expected = full_forward_scores(model, rows)
    got = rank.score_rows(model, tok, rows).tolist()
    assert got == pytest.approx(expected, abs=1e-4)
    grouped = rank.score_groups(model, tok, [rows]).tolist()[0]
    assert grouped == pytest.approx(expected, abs=1e-4)
    if name == "gemma-softcap":  # the softcap is in the scores: without it they differ
        cfg.final_logit_softcapping = None
        assert rank.score_rows(model, tok, rows).tolist() != pytest.approx(expected, abs=1e-3)
    del torch


def test_packed_scoring_falls_back_to_rows_where_a_window_is_narrower_than_the_packed_row(monkeypatch):
    cfg = families.tiny("gemma-3-1b")
    model = build(cfg)
    calls = []
    real = rank.score_rows
    monkeypatch.setattr(rank, "score_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    short = [([5, 6, 7, 40, 2], 2), ([5, 6, 7, 50, 2], 2)]  # packed: 3 + 2 + 2 = 7 tokens, within the window 8
    rank.score_groups(model, SimpleNamespace(pad_token_id=0), [short])
    assert calls == []
    long = [(list(range(5, 25)) + [40, 2], 2), (list(range(5, 25)) + [50, 2], 2)]
    rank.score_groups(model, SimpleNamespace(pad_token_id=0), [long])
    assert calls == [1]


# ---------------------------------------------------------------- the compile path


@pytest.mark.parametrize("name", NAMES)
def test_each_familys_decoder_layer_is_what_compile_finds(name):
    model = build(families.tiny(name))
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    assert len(layers) == 2  # one per decoder layer: the unit each compiled graph covers


def test_lora_on_experts_trains_uncompiled_and_says_why(tmp_path):
    families.write("qwen3-30b-a3b", tmp_path, num_hidden_layers=2)
    cfg = model_mod.load_config(recipes.load(XSUM, [f"model.name_or_path={tmp_path}"]))
    experts = recipes.load(XSUM, [f"model.name_or_path={tmp_path}", "lora.target_modules=all-linear",
                                  "lora.dropout=0", "training.profile=fast"])
    speed = profiles.resolve(experts, cfg, card_gb=80, detect=False)
    assert not speed.compiled and not speed.cuda_graphs
    assert "not compiled: LoRA on the experts' stacked weights" in speed.describe()
    attention = recipes.load(XSUM, [f"model.name_or_path={tmp_path}", "training.profile=fast",
                                    "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]"])
    speed = profiles.resolve(attention, cfg, card_gb=80, detect=False)
    assert speed.compiled and speed.cuda_graphs and speed.compile_note is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-3.2-1b", "gemma-3-1b", "phi-3-mini", "qwen3-30b-a3b"])
def test_compiled_layers_compute_what_the_eager_ones_do(name):
    import torch

    torch.manual_seed(0)
    cfg = families.tiny(name)
    eager, compiled = build(cfg), build(cfg)
    compiled.load_state_dict(eager.state_dict())
    for layer in (m for m in compiled.modules() if type(m).__name__ in compiled._no_split_modules):
        layer.compile(backend="eager")
    ids = torch.randint(0, 128, (2, 16))
    positions = torch.arange(16).expand(2, 16)  # the profiles' fixed rows: position ids, no attention mask
    a = eager(input_ids=ids, position_ids=positions, labels=ids)
    b = compiled(input_ids=ids, position_ids=positions, labels=ids)
    a.loss.backward()
    b.loss.backward()
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    grads = [(p.grad, q.grad) for p, q in zip(eager.parameters(), compiled.parameters()) if p.grad is not None]
    assert grads and all(torch.allclose(g, h, atol=1e-5) for g, h in grads)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "phi-2"])
def test_a_loaded_model_with_lora_has_the_shape_of_its_config(name):
    """Evaluation sizes its batches from the loaded (LoRA-wrapped) model's modules: peft's base layers count as the
    modules they wrap (else the MLP's projections collide under one name and the MLP is missed)."""
    from peft import LoraConfig, get_peft_model

    from runner.speed import memory

    cfg = families.tiny(name)
    wrapped = get_peft_model(build(cfg), LoraConfig(r=4, target_modules="all-linear"))
    assert memory.model_shape(cfg, wrapped) == memory.model_shape(cfg)
