"""training.compile: which runs compile their decoder layers (auto: GPU profiles without recompute or FSDP), and a
compiled training run: every decoder layer compiled while it trains, the same losses as uncompiled, the layers back
to their own forward for evaluation, the adapter unchanged in form."""

from __future__ import annotations

import json

import pytest
from transformers import PhiConfig

from runner import profiles
from runner import recipe as recipe_mod
from runner.errors import RecipeError
from tests.conftest import ROOT

XSUM = ROOT / "recipes" / "xsum_phi2.yaml"
TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
PHI2 = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                 num_attention_heads=32, partial_rotary_factor=0.4)


def resolve(*overrides: str, card_gb: float | None = 80, world_size: int = 1) -> profiles.Speed:
    return profiles.resolve(recipe_mod.load(XSUM, list(overrides)), PHI2, card_gb=card_gb, detect=False,
                            world_size=world_size)


def test_auto_compiles_on_a_gpu_profile_without_recompute_or_sharding():
    fast = resolve("training.profile=fast")
    assert fast.compiled and not fast.gradient_checkpointing and "compiled layers" in fast.describe()
    assert resolve("training.profile=fast", world_size=2).compiled  # each DDP rank compiles its own layers
    low = resolve("training.profile=low_memory")
    assert low.gradient_checkpointing and not low.compiled  # recompute re-runs the layers outside the graph
    assert not resolve("training.profile=none").compiled  # as written: shapes vary with the batch
    assert not resolve("training.profile=fast", "training.distributed=fsdp", world_size=2).compiled
    assert not resolve(card_gb=None).compiled  # a CPU
    assert not resolve("training.profile=fast", "training.compile=false").compiled
    assert resolve("training.compile=true", card_gb=None).compiled  # as written, anywhere
    with pytest.raises(RecipeError) as err:
        recipe_mod.load(XSUM, ["training.compile=sometimes"])
    assert err.value.key_path == "training.compile" and "one of: auto, true, false" in str(err.value)


@pytest.mark.slow
def test_a_compiled_run_trains_the_same_and_evaluates_uncompiled(tiny, tmp_path, monkeypatch):
    import torch

    from runner import train as train_mod

    monkeypatch.setattr(train_mod, "COMPILE_BACKEND", "eager")  # dynamo's tracing without code generation
    torch._dynamo.reset()
    seen = {}

    def instrument(trainer):
        layers = [m for m in trainer.model.modules() if type(m).__name__ == "PhiDecoderLayer"]
        seen["layers"] = layers
        seen["compiled"] = [layer._compiled_call_impl is not None for layer in layers]

    runs = {}
    for compiled in (False, True):
        recipe = recipe_mod.load(TINY, ["training.max_steps=2", "training.logging_steps=1", "training.eval_every=null",
                                        f"training.compile={str(compiled).lower()}", f"output_dir={tmp_path / str(compiled)}"])
        run_dir, model, _, _ = train_mod.train(recipe, instrument=instrument if compiled else None)
        runs[compiled] = (run_dir, model)
    run_dir, model = runs[True]
    assert seen["layers"] and all(seen["compiled"])  # every decoder layer compiled while training
    assert all(layer._compiled_call_impl is None for layer in seen["layers"])  # and not for evaluation
    assert json.loads((run_dir / "env.json").read_text())["speed"]["compiled"] is True

    def losses(run) -> list[float]:
        lines = (run[0] / "train_log.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert losses(runs[True]) == pytest.approx(losses(runs[False]), abs=1e-5) and len(losses(runs[True])) == 2
    saved = {k for k in json.loads((run_dir / "adapter" / "adapter_config.json").read_text())}
    assert saved == {k for k in json.loads((runs[False][0] / "adapter" / "adapter_config.json").read_text())}
    from safetensors.torch import load_file

    names = set(load_file(run_dir / "adapter" / "adapter_model.safetensors"))
    assert names == set(load_file(runs[False][0] / "adapter" / "adapter_model.safetensors"))
    assert not any("_orig_mod" in n for n in names)
