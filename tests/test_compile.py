"""training.compile: which runs compile their decoder layers (auto: GPU profiles without recompute or FSDP), and a
compiled training run: every decoder layer compiled while it trains, the same losses as uncompiled, the layers back
to their own forward for evaluation, the adapter unchanged in form."""

from __future__ import annotations

import json

import pytest
from transformers import PhiConfig

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.speed import profiles
from tests.conftest import ROOT

XSUM = ROOT / "recipes" / "xsum_phi2.yaml"
TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
PHI2 = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                 num_attention_heads=32, partial_rotary_factor=0.4)


def resolve(*overrides: str, card_gb: float | None = 80, world_size: int = 1) -> profiles.Speed:
    return profiles.resolve(recipes.load(XSUM, list(overrides)), PHI2, card_gb=card_gb, detect=False,
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
        recipes.load(XSUM, ["training.compile=sometimes"])
    assert err.value.key_path == "training.compile" and "one of: auto, true, false" in str(err.value)


def test_compiled_layers_replay_as_cuda_graphs_only_on_a_gpu_with_fixed_rows():
    fast = resolve("training.profile=fast")
    assert fast.cuda_graphs and fast.describe().count("compiled layers, as CUDA graphs") == 1
    assert resolve("training.profile=fast", world_size=2).cuda_graphs  # a DDP rank's small step gains the most
    assert resolve("training.profile=balanced").cuda_graphs
    eager = resolve("training.profile=fast", "training.compile=false")
    assert not eager.cuda_graphs and "CUDA graphs" not in eager.describe()
    as_written = resolve("training.profile=none", "training.compile=true")  # batches of varying shape
    assert as_written.compiled and not as_written.cuda_graphs
    assert not resolve("training.compile=true", card_gb=None).cuda_graphs  # a CPU has none


@pytest.mark.slow
def test_a_compiled_run_trains_the_same_and_evaluates_uncompiled(tiny, tmp_path, monkeypatch):
    import torch

    from runner.train import train as train_mod

    monkeypatch.setattr(train_mod, "COMPILE_BACKEND", "eager")  # dynamo's tracing without code generation
    torch._dynamo.reset()
    seen = {}

    def instrument(trainer):
        layers = [m for m in trainer.model.modules() if type(m).__name__ == "PhiDecoderLayer"]
        seen["layers"] = layers
        seen["compiled"] = [layer._compiled_call_impl is not None for layer in layers]

    runs = {}
    for compiled in (False, True):
        recipe = recipes.load(TINY, ["training.max_steps=2", "training.logging_steps=1", "training.eval_every=null",
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


@pytest.mark.slow
def test_cuda_graph_steps_mark_each_micro_batch_and_copy_accumulated_gradients(tiny, tmp_path, monkeypatch):
    """What CUDA graphs need around the compiled layers, on a CPU (where torch compiles without capturing):
    every micro-batch starts a new generation of the graphs, gradients that accumulate across micro-batches are
    copies out of the graphs' memory pool (on an H200 without them torch refused the second micro-batch:
    bench/RESULTS.md, "CUDA graphs"), and after training the hooks are gone and the graphs' memory is released.
    The losses are the uncompiled run's."""
    from dataclasses import replace

    import torch

    from runner.model import model as model_mod
    from runner.train import train as train_mod

    monkeypatch.setattr(train_mod, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    calls = {"train": 0, "eval": 0, "resets": 0}
    seen = {}

    def count(what: str, original):
        def counted():
            key = what if what == "resets" else ("train" if seen["trainer"].model.training else "eval")
            calls[key] += 1
            return original()
        return counted

    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin",
                        count("marks", torch.compiler.cudagraph_mark_step_begin))
    monkeypatch.setattr(torch.compiler, "reset", count("resets", torch.compiler.reset))

    def instrument(trainer):
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        seen["trainer"], seen["trainable"] = trainer, trainable
        seen["hooked"] = [bool(p._backward_hooks) for p in trainable]
        seen["graph_steps"] = trainer.graph_steps

    runs = {}
    for graphs in (False, True):
        recipe = recipes.load(TINY, ["training.max_steps=2", "training.logging_steps=1", "training.eval_every=null",
                                        "training.micro_batch_size=8", "training.gradient_accumulation_steps=2",
                                        f"output_dir={tmp_path / str(graphs)}"])
        speed = profiles.resolve(recipe, model_mod.load_config(recipe), detect=False)
        if graphs:
            speed = replace(speed, compiled=True, cuda_graphs=True)
        run_dir, _, _, _ = train_mod.train(recipe, instrument=instrument if graphs else None, speed=speed)
        runs[graphs] = [r["loss"] for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
                        if "loss" in r]
    assert seen["graph_steps"] and seen["trainable"] and all(seen["hooked"])
    assert calls["train"] == 2 * 2  # 2 steps x 2 micro-batches, each one generation of the graphs
    assert calls["eval"] == 32 // 8  # the eval loss after training: one per batch
    assert calls["resets"] == 1  # once, after training
    assert not any(p._backward_hooks for p in seen["trainable"])  # the trained model is left without them
    assert runs[True] == pytest.approx(runs[False], abs=1e-5) and len(runs[True]) == 2


@pytest.mark.slow
def test_a_compiler_failure_in_training_is_one_line_naming_training_compile(tiny, tmp_path, monkeypatch, capsys):
    import torch

    from runner.cli import cli
    from runner.train import train as train_mod

    def broken(graph, example_inputs):
        raise RuntimeError("no kernel for this layer")

    monkeypatch.setattr(train_mod, "COMPILE_BACKEND", broken)
    torch._dynamo.reset()
    code = cli.main(["train", str(TINY), "training.compile=true", "training.max_steps=2", "training.eval_every=null",
                     f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: training.compile: torch.compile failed: BackendCompilerFailed")
    assert "no kernel for this layer" in lines[0] and "set training.compile: false" in lines[0]
    assert not list(tmp_path.rglob("adapter"))  # nothing that looks trained
    torch._dynamo.reset()


def test_a_cuda_graph_failure_in_evaluation_names_generation_backend():
    """Where the compiler failed decides the key: the runner's generation module in the traceback means the compiled
    evaluation backend (frames made here under that file name, raising torch's CUDA graph message)."""
    from runner.common import errors

    message = "Error: accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run."
    source = f"def generate():\n    raise RuntimeError({message!r})\n"
    for where, key in (("runner/evaluate/generate.py", "generation.backend"),
                       ("runner/train/train.py", "training.compile")):
        scope = {}
        exec(compile(source, f"/somewhere/{where}", "exec"), scope)
        try:
            scope["generate"]()
        except RuntimeError as exc:
            error = errors.classify(exc)
        assert error.key_path == key and error.exit_code == 1 and "CUDAGraphs" in error.line()
    try:
        raise RuntimeError(message)  # raised elsewhere: not the runner's compiling, left as it is
    except RuntimeError as exc:
        assert errors.classify(exc).key_path == "internal"


@pytest.mark.slow
def test_compiled_layers_see_one_batch_shape_to_the_end_of_an_epoch(tiny, tmp_path, monkeypatch):
    """An epoch's last, smaller batch is padded with label-less rows when the layers are compiled: without them it
    was one more shape, compiled (and on a GPU captured as CUDA graphs) again for one batch. The losses are those
    of the same fixed rows without the padding."""
    import torch

    from runner.train import train as train_mod

    monkeypatch.setattr(train_mod, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    shapes = []

    def instrument(trainer):
        layer = next(m for m in trainer.model.modules() if type(m).__name__ == "PhiDecoderLayer")
        layer.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(
            tuple(kwargs.get("hidden_states", args[0] if args else None).shape)), with_kwargs=True)

    losses = {}
    for compiled in (False, True):
        recipe = recipes.load(TINY, ["training.profile=fast", "training.max_steps=null", "training.epochs=1",
                                        "data.train_samples=20", "training.micro_batch_size=8",
                                        "training.gradient_accumulation_steps=1", "training.logging_steps=1",
                                        "training.eval_every=null", f"training.compile={str(compiled).lower()}",
                                        f"output_dir={tmp_path / str(compiled)}"])
        run_dir, _, _, _ = train_mod.train(recipe, instrument=instrument if compiled else None)
        losses[compiled] = [r["loss"] for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
                            if "loss" in r]
    # 20 examples: batches of 8, 8 and 4 (padded to 8); then the eval loss's batches (32 examples), all of 8 rows
    assert len(losses[True]) == 3 and len(set(shapes)) == 1 and shapes[0][0] == 8, shapes
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    torch._dynamo.reset()
