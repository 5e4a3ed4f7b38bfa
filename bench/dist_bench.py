#!/usr/bin/env python3
"""Several GPUs: the study recipe (Phi-2-shaped, random weights) trained through the runner under torchrun, DDP at
16 and 64 examples per optimizer step, FSDP-QLoRA of a Llama-shaped model under a per-GPU budget one card cannot
meet, and the runner's evaluation (generation) spread over the ranks.

Each measurement is one launch of the runner's own code by torchrun (bench/dist_run.sh drives them;
BENCH_EXTRA adds recipe overrides, BENCH_CUDA_GRAPHS=0 compiles the layers without CUDA graphs, BENCH_OPT_SYNCS=1 keeps bitsandbytes' per-parameter syncs in the optimizer step):

    torchrun --nproc-per-node G bench/dist_bench.py train VARIANT   # a line in $OUT/dist.jsonl (rank 0 writes)
    python bench/dist_bench.py make_llama                           # random Llama-shaped model -> $BENCH_LLAMA
    torchrun --nproc-per-node G -m runner eval ... --base           # generation: bench/dist_run.sh times it
    python bench/dist_bench.py table                                # markdown table of $OUT/dist.jsonl

The model and data are bench/bench.py's (make_model, the XSum rows in .shared-data).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench  # noqa: E402  (bench/bench.py: the Phi-2-shaped model, data and overrides)

OUT = bench.OUT
LLAMA_DIR = Path(os.environ.get("BENCH_LLAMA", "/tmp/llama_rand"))
# Llama-2-13B's shape; the vocabulary is GPT-2's (the tokenizer the bench carries), rounded up to a multiple of 64.
LLAMA = dict(vocab_size=50304, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
             num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=50256, eos_token_id=50256)
if os.environ.get("BENCH_LLAMA_LAYERS"):
    LLAMA["num_hidden_layers"] = int(os.environ["BENCH_LLAMA_LAYERS"])
if os.environ.get("BENCH_LLAMA_SHAPE") == "30b":  # LLaMA-30B's shape
    LLAMA.update(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                 num_key_value_heads=52)

# name -> (what, overrides, warm-up steps, measured steps)
VARIANTS = {
    "ddp16": ("study recipe, fast, 16 examples per step", ["training.profile=fast"], 3, 10),
    "ddp64": ("study recipe, fast, 64 examples per step",
              ["training.profile=fast", "training.micro_batch_size=16", "training.gradient_accumulation_steps=4"], 2, 6),
    "fsdp_llama": ("Llama-shaped model, FSDP-QLoRA under a per-GPU budget",
                   ["training.profile=low_memory", "training.distributed=auto", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
                    "training.micro_batch_size=4", "training.gradient_accumulation_steps=4"], 1, 3),
}


def cmd_make_llama() -> None:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.time()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM._from_config(LlamaConfig(**LLAMA), dtype=torch.bfloat16)
    model.save_pretrained(LLAMA_DIR, max_shard_size="5GB")
    for f in (bench.DATA / "tokenizers" / "gpt2").iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, LLAMA_DIR / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"made_llama": str(LLAMA_DIR), "params": n, "seconds": round(time.time() - start, 1)}), flush=True)


def cmd_train(name: str) -> None:
    import torch
    from transformers import TrainerCallback

    from runner.cli import recipes
    from runner.common import dist
    from runner.train import train as train_mod

    what, overrides, warm, meas = VARIANTS[name]
    extra = os.environ.get("BENCH_EXTRA", "").split()
    # BENCH_OPT_SYNCS=1: bitsandbytes' optimizer step as it comes (a device sync after every parameter); the trainer's
    # skip_optimizer_syncs, set below through train's instrument
    skip_syncs = os.environ.get("BENCH_OPT_SYNCS") != "1"
    profiled = name in os.environ.get("BENCH_PROFILE", "").split()  # every rank runs the extra steps
    profile = profiled and dist.world().main
    base = bench.base_overrides(warm + meas + (PROFILED if profiled else 0))
    # logging as the recipe has it (every 10 steps): every log reads values on the host
    base = [o for o in base if not o.startswith("training.logging_steps=")]
    if name == "fsdp_llama":
        base = [o for o in base if not o.startswith("model.name_or_path=")] + [f"model.name_or_path={LLAMA_DIR}"]
    recipe = recipes.load(bench.RECIPE, base + overrides + extra)
    speed = None  # resolved by train from the recipe
    if os.environ.get("BENCH_CUDA_GRAPHS") == "0":  # compiled layers without CUDA graphs, to measure them
        from runner.model import model as model_mod
        from runner.speed import profiles

        speed = dataclasses.replace(profiles.resolve(recipe, model_mod.load_config(recipe)), cuda_graphs=False)
    stamps: dict[int, float] = {}
    held: dict = {}
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            if cuda:  # what loading and wrapping left, apart from what the training steps add
                held["load_peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
                held["begin_alloc_gib"] = torch.cuda.memory_allocated() / 2**30
            stamps[0] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if profile and state.global_step == warm + meas:  # after the measured window: the profiler costs time
                held["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                                      + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
                held["prof"].__enter__()
                held["prof_start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            stamps[state.global_step] = time.perf_counter()
            if "prof" in held and state.global_step == warm + meas + PROFILED:
                held["prof"].__exit__(None, None, None)
                write_profile(name, held.pop("prof"), (time.perf_counter() - held["prof_start"]) / PROFILED)

    def instrument(trainer):
        trainer.skip_optimizer_syncs = skip_syncs
        held["counter"] = trainer.data_collator = bench.Counter(trainer.data_collator)
        held["trainer"] = trainer
        trainer.add_callback(Timer())

    t0 = time.time()
    run_dir, _, _, prepared = train_mod.train(recipe, instrument=instrument, speed=speed)
    world = dist.world()
    ga = held["trainer"].args.gradient_accumulation_steps
    calls = held["counter"].calls[warm * ga:(warm + meas) * ga]
    seconds = stamps[warm + meas] - stamps[warm]
    real = sum(dist.gather(sum(c[0] for c in calls)))  # every rank's real tokens in the measured steps
    peaks = dist.gather(torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0)
    loads = dist.gather((held.get("load_peak_gib"), held.get("begin_alloc_gib"),
                         torch.cuda.max_memory_allocated() / 2**30 if cuda else None))
    if not world.main:
        return
    env = json.loads((run_dir / "env.json").read_text())  # rank 0 wrote it before the gather above
    speed = env["speed"]
    n_tokens = prepared.splits["train"]["n_tokens"]
    row = dict(variant=name, what=what, gpus=world.size, gpu=torch.cuda.get_device_name(0) if cuda else "cpu",
               distributed=speed["distributed"], profile=speed["profile"], micro_batch=speed["micro_batch_size"],
               accumulation=ga, checkpointing=speed["gradient_checkpointing"],
               examples_per_step=speed["micro_batch_size"] * ga * world.size, measured_steps=meas,
               sec_per_step=seconds / meas, real_tok_per_s=real / seconds,
               mean_tokens_per_example=sum(n_tokens) / len(n_tokens), peak_reserved_gib_per_rank=peaks,
               load_peak_reserved_and_begin_alloc_and_peak_alloc_gib=loads, plan_gib=speed["predicted_gb"], budget_gib=speed["budget_gb"], params=env["total"],
               trainable=env["trainable"], total_wall_s=time.time() - t0,
               optimizer_syncs_skipped=held["trainer"].skip_optimizer_syncs, extra=extra,
               compiled=speed["compiled"], cuda_graphs=speed.get("cuda_graphs"),
               losses=[(h["step"], h["loss"]) for h in held["trainer"].state.log_history if "loss" in h])
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "dist.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT " + json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)


PROFILED = 3  # steps under torch.profiler, after the measured ones (BENCH_PROFILE="ddp16 ...": rank 0 of those)


def write_profile(name: str, prof, wall_per_step: float) -> None:
    """Where one step's time goes: host (self CPU) per op, GPU kernel time, and how busy the GPU was."""
    from runner.common import dist

    events = prof.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in events) / PROFILED
    cpu_us = sum(e.self_cpu_time_total for e in events) / PROFILED
    head = (f"## {name} on {dist.world().size} GPU(s), rank 0: wall {wall_per_step * 1e3:.1f} ms/step, "
            f"GPU kernels {gpu_us / 1e3:.1f} ms/step ({gpu_us / 1e4 / wall_per_step:.0f}% busy), "
            f"host ops {cpu_us / 1e3:.1f} ms/step")
    text = "\n".join([head, events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60),
                      events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60), ""])
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "prof.txt", "a") as f:
        f.write(text + "\n")
    print(head, flush=True)


def cmd_eval(what: str) -> None:
    """The runner's evaluation of N XSum prompts (generation as the recipe decodes, or greedy) on every rank."""
    import tempfile

    import torch

    from runner.cli import recipes
    from runner.common import dist
    from runner.data import data as data_mod
    from runner.evaluate import evaluate as evaluate_mod
    from runner.model import model as model_mod

    world = dist.init()
    n = int(os.environ.get("BENCH_EVAL_PROMPTS", "256"))
    over = bench.base_overrides(1) + [f"data.train_samples={n}", "generation.max_new_tokens=64",
                                      "evaluation.evaluators=[{name: rouge}]"] + os.environ.get("BENCH_EXTRA", "").split()
    if what == "greedy":
        over.append("generation.do_sample=false")
    recipe = recipes.load(bench.RECIPE, over)
    tokenizer = model_mod.load_tokenizer(recipe)
    examples = data_mod.prepare(recipe, tokenizer, roles=("train",)).splits["train"]
    model = model_mod.load_trained(recipe, None)
    out_dir = Path(dist.broadcast(tempfile.mkdtemp(prefix="bench-eval-") if world.main else None))
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    dist.barrier()
    start = time.perf_counter()
    metrics = evaluate_mod.evaluate(recipe, model, tokenizer, out_dir, examples=examples)
    sync()
    seconds = time.perf_counter() - start
    peaks = dist.gather(torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0)
    if not world.main:
        return
    rows = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    row = dict(what=what, gpus=world.size, gpu=torch.cuda.get_device_name(0) if cuda else "cpu", prompts=len(rows), seconds=seconds,
               prompts_per_s=len(rows) / seconds, peak_reserved_gib_per_rank=peaks, metrics_examples=metrics["examples"],
               first_predictions=[r["prediction"] for r in rows[:4]])
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "dist_generate.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT " + json.dumps(row), flush=True)


def cmd_table() -> None:
    path = OUT / "dist.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    one = {r["variant"]: r["real_tok_per_s"] for r in rows if r["gpus"] == 1}
    lines = ["| variant | GPUs | strategy | examples/step | micro-batch x acc per GPU | ckpt | real tok/s | x 1 GPU | "
             "peak reserved GiB per GPU | plan GiB | s/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r["real_tok_per_s"] / one[r["variant"]] if r["variant"] in one else None
        peaks = ", ".join(f"{p:.2f}" for p in r["peak_reserved_gib_per_rank"])
        plan = "-" if r["plan_gib"] is None else f"{r['plan_gib']:.2f}"
        lines.append(f"| {r['variant']} | {r['gpus']} | {r['distributed']} | {r['examples_per_step']} | "
                     f"{r['micro_batch']} x {r['accumulation']} | {'y' if r['checkpointing'] else 'n'} | "
                     f"{r['real_tok_per_s']:,.0f} | {'-' if x is None else f'{x:.2f}'} | {peaks} | "
                     f"{plan} | {r['sec_per_step']:.3f} |")
    gen = OUT / "dist_generate.jsonl"
    if gen.exists():
        g = [json.loads(line) for line in gen.read_text().splitlines() if line.strip()]
        base = {r["what"]: r["prompts_per_s"] for r in g if r["gpus"] == 1}
        lines += ["", "| evaluation | GPUs | prompts | seconds | prompts/s | x 1 GPU |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['what']} | {r['gpus']} | {r['prompts']} | {r['seconds']:.1f} | {r['prompts_per_s']:.2f} | "
                  f"{r['prompts_per_s'] / base[r['what']]:.2f} |" for r in g if r["what"] in base]
    text = "\n".join(lines)
    (OUT / "dist_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    mode = sys.argv[1]
    {"make_llama": cmd_make_llama, "table": cmd_table, "train": lambda: cmd_train(sys.argv[2]),
     "eval": lambda: cmd_eval(sys.argv[2])}[mode]()
