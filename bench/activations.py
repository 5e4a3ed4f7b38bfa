"""Count the bytes autograd keeps per token per decoder layer (the plan's activation model comes from this).

Builds one- and two-layer models of Phi-2's width (random weights, CPU), loads them through the runner's own
path with NF4 + the recipe's LoRA, runs one forward under bf16 autocast, and records every tensor autograd saves
for backward (deduplicated by storage). The difference is one full layer, compared with runner.speed.memory's formula:

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/activations.py [--seq 128] [--family qwen3-1.7b]

CPU numbers stand in for CUDA ones: the saved tensors are decided by the Python model code and autograd formulas,
the same on both, except dropout masks (bool on CUDA, float on CPU): the comparison runs with lora.dropout 0, and
the plan adds a dropout output plus a one-byte mask per LoRA target when dropout is on.
"""

from __future__ import annotations

import argparse
import json
import tempfile


def saved_bytes(model, input_ids, position_ids=None) -> int:
    import torch

    seen: dict = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    del out
    return sum(n for (ptr, _), n in seen.items() if ptr not in params)


def family_config(family: str | None, layers: int):
    """Phi-2's width, or a family's real width (tests/families.py) with a small vocabulary and at most 16 experts
    (the per-token terms scale with top_k, not with the expert count)."""
    from transformers import PhiConfig

    if family is None:
        return PhiConfig(vocab_size=256, hidden_size=2560, intermediate_size=10240, num_hidden_layers=layers,
                         num_attention_heads=32, partial_rotary_factor=0.4, hidden_act="gelu_new", resid_pdrop=0.0,
                         embd_pdrop=0.0, attention_dropout=0.0)
    from tests import families

    over = dict(vocab_size=256, num_hidden_layers=layers)
    if "num_experts" in families.REAL[family][1]:
        over["num_experts"] = 16
    cfg = families.config(family, **over)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    return cfg


def measure(settings: dict, seq: int, layers: int, family: str | None = None) -> float:
    """Saved bytes per token of a ``layers``-deep model (its first layer's input needs no gradient)."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner.cli import recipes
    from runner.model import model as model_mod
    from runner.speed import profiles

    cfg = family_config(family, layers)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(d)
        recipe = recipes.load("recipes/xsum_phi2.yaml", [
            f"model.name_or_path={d}", "model.dtype=bfloat16", "quantization.compute_dtype=bfloat16",
            "data.source=x.jsonl", f"lora.dropout={settings['dropout']}", "training.gradient_checkpointing=false",
            *([] if family is None else ["lora.target_modules=all-linear"])])
        speed = profiles.candidates(recipe, settings["profile"])[0]
        model = model_mod.load_for_training(recipe, None if settings["profile"] == "none" else speed)
        model.train()
        ids = torch.randint(0, 256, (1, seq))
        if family is not None and settings["profile"] != "none":  # the profiles train bf16 without autocast
            return saved_bytes(model, ids, torch.arange(seq)[None]) / seq, recipe, speed
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer's bf16 autocast does on a GPU
            return saved_bytes(model, ids, torch.arange(seq)[None]) / seq, recipe, speed


def main() -> None:
    from runner.speed import memory

    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--family", help="a family of tests/families.py at its real width (default: Phi-2's)")
    args = p.parse_args()
    for name, s in {"none (fp32 upcasts, python gelu_new)": dict(profile="none", dropout=0.0),
                    "profiles (bf16, fused gelu)": dict(profile="fast", dropout=0.0)}.items():
        if args.family is not None:
            name = name.replace("gelu_new", "activation").replace("fused gelu", "no autocast")
        one, _, _ = measure(s, args.seq, 1, args.family)
        two, recipe, speed = measure(s, args.seq, 2, args.family)
        info = memory.model_info(recipe, family_config(args.family, 2))
        formula = memory.layer_activation_bytes(info, recipe, upcast=s["profile"] == "none",
                                              fused_act=s["profile"] != "none")
        row = {"measured_bytes_per_token_per_layer": round(two - one), "plan_formula": round(formula)}
        print(name, "lora.dropout 0:", json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
