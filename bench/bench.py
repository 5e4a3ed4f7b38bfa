#!/usr/bin/env python3
"""QLoRA on a Phi-2-shaped model (random weights), trained through the runner's own path, on one GPU.

Every variant is recipes/xsum_phi2.yaml plus overrides (the model folder built here, the real XSum rows, a few
steps), run by ``runner.train.train.train`` in a fresh process; the benchmark only adds timers and a token counter.

    python bench/bench.py env                  # GPU, versions, measured bf16 matmul peak -> $OUT/env.json
    python bench/bench.py make_model           # random Phi-2-shaped model + GPT-2 tokenizer -> $BENCH_MODEL
    python bench/bench.py train VARIANT        # one training variant -> a line in $OUT/results.jsonl
    python bench/bench.py generate             # generation throughput -> $OUT/generate.json
    python bench/bench.py table                # the markdown table of $OUT/results.jsonl

bench/run.sh runs them all on the device; BENCH_TINY=1 shrinks the model for a CPU smoke test.
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
OUT = Path(os.environ.get("OUT", "/tmp/bench_out"))
TINY = os.environ.get("BENCH_TINY") == "1"
MODEL_DIR = Path(os.environ.get("BENCH_MODEL", "/tmp/phi2rand"))
DATA = next((p for p in (ROOT / ".shared-data", ROOT.parent / "shared" / "data") if (p / "xsum").is_dir()),
            ROOT / ".shared-data")
RECIPE = ROOT / "recipes" / "xsum_phi2.yaml"
STUDY_EXAMPLES = 5000  # the study's job: 5,000 XSum examples x 1 epoch
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 SXM, FLOP/s

PHI2 = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
            num_attention_heads=32, max_position_embeddings=2048, partial_rotary_factor=0.4, layer_norm_eps=1e-5,
            resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, hidden_act="gelu_new", rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256)
if TINY:
    PHI2.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)

# name -> (what, recipe overrides, Speed fields forced on top of the profile's choice, warm-up steps, measured)
ALL_FLAGS = dict(fixed_shapes=True, cudnn_sdpa=False, keep_dtype=True, fused_activation=True)
VARIANTS = {
    "A": ("notebook baseline: every example padded to 512, eager attention, 4 x 4, checkpointing, fp32 upcasts",
          ["training.profile=none", "model.attn_implementation=eager"], {"pad_to": 512}, 2, 6),
    "L1": ("A + sdpa + fixed [4, 512] rows without attention mask", ["training.profile=none"],
           {"fixed_shapes": True}, 2, 6),
    "L2": ("L1 + cuDNN SDPA backend off", ["training.profile=none"],
           {"fixed_shapes": True, "cudnn_sdpa": False}, 2, 6),
    "L3": ("L2 + bf16 end to end (no fp32 upcast, no autocast)", ["training.profile=none"],
           {"fixed_shapes": True, "cudnn_sdpa": False, "keep_dtype": True}, 2, 6),
    "L4": ("L3 + fused GELU: all profile switches, still 4 x 4 with checkpointing", ["training.profile=none"],
           ALL_FLAGS, 2, 6),
    "low_memory": ("training.profile=low_memory", ["training.profile=low_memory"], {}, 2, 8),
    "balanced": ("training.profile=balanced", ["training.profile=balanced"], {}, 2, 10),
    "fast": ("training.profile=fast", ["training.profile=fast"], {}, 3, 12),
    "fast_pack": ("training.profile=fast + training.packing=true (bfd-packed fixed rows)",
                  ["training.profile=fast", "training.packing=true"], {}, 3, 12),
    # Per-GPU efficiency at half the micro-batch (what each of 2 DDP ranks runs for 16 examples a step), with and
    # without training.compile (auto compiles on a GPU: "fast" and "fast8" are compiled).
    "fast_uncompiled": ("fast, training.compile=false", ["training.profile=fast", "training.compile=false"], {}, 3, 12),
    "fast8": ("fast at micro-batch 8 x 2 (a DDP rank's share on 2 GPUs)", ["training.profile=fast"],
              {"micro_batch_size": 8, "gradient_accumulation_steps": 2}, 4, 12),
    "fast8_uncompiled": ("fast8, training.compile=false", ["training.profile=fast", "training.compile=false"],
                         {"micro_batch_size": 8, "gradient_accumulation_steps": 2}, 3, 12),
    # compiled layers without CUDA graphs (auto replays them as graphs on a GPU with fixed rows)
    "fast_no_graphs": ("fast, compiled without CUDA graphs", ["training.profile=fast"], {"cuda_graphs": False}, 3, 12),
    "fast8_no_graphs": ("fast8, compiled without CUDA graphs", ["training.profile=fast"],
                        {"micro_batch_size": 8, "gradient_accumulation_steps": 2, "cuda_graphs": False}, 4, 12),
}



def step_timer(stamps: dict):
    """A trainer callback that stamps the time, after a CUDA sync, at training's start (key 0) and after each
    optimizer step (key: the step): the measured window is between two stamps."""
    import torch
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            stamps[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            stamps[state.global_step] = time.perf_counter()

    return StepTimer()

def base_overrides(steps: int) -> list[str]:
    over = [f"model.name_or_path={MODEL_DIR}", f"data.source={DATA / 'xsum' / 'sample.jsonl'}",
            "data.train_samples=null", "data.splits.eval=null", "data.splits.test=null", "evaluation.split=train",
            "training.eval_every=null", "training.save_every=null", "training.resume=never",
            f"training.max_steps={steps}", "training.logging_steps=1", "output_dir=/tmp/bench_runs",
            "training.report_to=none"]  # the device image has no tensorboard; trackers are not what is timed
    import torch

    if not torch.cuda.is_available():  # CPU smoke test: bitsandbytes' paged optimizers need CUDA
        over.append("training.optimizer=adamw_torch")
    if TINY:
        over += ["prompt.max_length=128", "data.max_tokens=128"]
    return over


def write_json(name: str, obj) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(obj, indent=1))


def append_result(row: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT " + json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)


# ---------------------------------------------------------------- env and model


def bf16_peak() -> float | None:
    """Measured dense bf16 matmul rate (FLOP/s): an 8192^3 product, median of 20 timed runs."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2]


def cmd_env() -> None:
    import importlib
    import subprocess

    import torch

    info = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "triton"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001 - report whatever is missing
            info[name] = f"missing: {exc!r}"[:200]
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        info["bf16_matmul_flops"] = bf16_peak()
    write_json("env.json", info)
    print(json.dumps(info, indent=1), flush=True)


def cmd_make_model() -> None:
    import shutil

    import torch
    from transformers import PhiConfig, PhiForCausalLM

    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = PhiForCausalLM._from_config(PhiConfig(**PHI2), dtype=torch.bfloat16)
    model.save_pretrained(MODEL_DIR)
    for f in (DATA / "tokenizers" / "gpt2").iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, MODEL_DIR / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"made_model": str(MODEL_DIR), "params": n, "seconds": round(time.time() - start, 1)}),
          flush=True)


# ---------------------------------------------------------------- one training variant


class Counter:
    """Wraps the trainer's collator: real (example) tokens and padded tokens of every micro-batch."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.calls.append((sum(len(e["input_ids"]) for e in examples), batch["input_ids"].numel(),
                           sum(len(e.get("seq_lengths") or [0]) for e in examples)))
        return batch


def forced_speed(recipe: dict, flags: dict):
    """Benchmark-only: the ladder variants switch profile features one at a time on top of the profile's own
    settings; ``runner.train.train.train`` trains with the result (its ``speed`` parameter)."""
    from runner.model import model as model_mod
    from runner.speed import memory, profiles

    config = model_mod.load_config(recipe)
    speed = dataclasses.replace(profiles.resolve(recipe, config), **flags)
    return dataclasses.replace(speed, predicted_gb=memory.estimate(recipe, config, speed).reserved_gb)


def cmd_train(name: str) -> None:
    import torch

    from runner.cli import recipes
    from runner.train import train as train_mod

    what, overrides, flags, warm, meas = VARIANTS[name]
    if TINY:
        warm, meas = 1, 2
    flags = dict(flags)
    pad_to = flags.pop("pad_to", None)
    recipe = recipes.load(RECIPE, base_overrides(warm + meas) + overrides)
    speed = forced_speed(recipe, flags) if flags else None
    cuda = torch.cuda.is_available()
    stamps: dict[int, float] = {}
    held: dict = {}

    def instrument(trainer):
        if pad_to:  # the notebook's padding="max_length": every row padded to 512
            trainer.data_collator.pad_to_multiple_of = pad_to
        held["counter"] = trainer.data_collator = Counter(trainer.data_collator)
        held["trainer"] = trainer
        trainer.add_callback(step_timer(stamps))

    t0 = time.time()
    run_dir, model, tokenizer, prepared = train_mod.train(recipe, instrument=instrument, speed=speed)
    env = json.loads((run_dir / "env.json").read_text())
    speed = env["speed"]
    ga = speed["gradient_accumulation_steps"]
    calls = held["counter"].calls[warm * ga:(warm + meas) * ga]
    seconds = stamps[warm + meas] - stamps[warm]
    real, padded, examples = (sum(c[i] for c in calls) for i in range(3))
    real_tps = real / seconds
    n_tokens = prepared.splits["train"]["n_tokens"]
    mean_tokens = sum(n_tokens) / len(n_tokens)
    peak = json.loads((OUT / "env.json").read_text()).get("bf16_matmul_flops") if (OUT / "env.json").exists() else None
    n_params = env["total"] - env["trainable"]
    row = dict(
        variant=name, what=what, micro_batch=speed["micro_batch_size"], accumulation=ga,
        checkpointing=speed["gradient_checkpointing"], profile=speed["profile"],
        packing=recipe["training"]["packing"], attn=recipe["model"]["attn_implementation"],
        warmup_steps=warm, measured_steps=meas, sec_per_step=seconds / meas,
        real_tok_per_s=real_tps, padded_tok_per_s=padded / seconds, pad_efficiency=real / padded,
        examples_per_step=(examples / meas) if recipe["training"]["packing"] else speed["micro_batch_size"] * ga,
        mfu_measured_peak=6 * n_params * real_tps / peak if peak else None,
        mfu_989=6 * n_params * real_tps / H100_BF16_PEAK,
        peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        device_used_gib=(lambda f, t: (t - f) / 2**30)(*torch.cuda.mem_get_info()) if cuda else None,
        plan_gib=speed["predicted_gb"], mean_tokens_per_example=mean_tokens,
        study_job_minutes=STUDY_EXAMPLES * mean_tokens / real_tps / 60,
        first_step_s=stamps[1] - stamps[0], trainable=env["trainable"], params=n_params,
        total_wall_s=time.time() - t0,
        losses=[(h["step"], h["loss"]) for h in held["trainer"].state.log_history if "loss" in h],
    )
    append_result(row)


# ---------------------------------------------------------------- generation


def cmd_generate() -> None:
    import torch

    from runner.cli import recipes
    from runner.data import data as data_mod
    from runner.evaluate import generate as generate_mod
    from runner.model import model as model_mod

    n_prompts, n_single = (256, 8) if not TINY else (8, 2)
    over = base_overrides(1) + [f"data.train_samples={n_prompts}", "generation.stop=[]",
                                "generation.max_new_tokens=64"]
    recipe = recipes.load(RECIPE, over)
    tokenizer = model_mod.load_tokenizer(recipe)
    prompts = data_mod.prepare(recipe, tokenizer, roles=("train",)).splits["train"]["prompt"]
    model = model_mod.load_trained(recipe, None)
    cuda = torch.cuda.is_available()
    produced: list[int] = []
    original = model.generate

    def counting_generate(*args, **kwargs):
        out = original(*args, **kwargs)
        new = out[:, kwargs["input_ids"].shape[1]:]
        ended = (new == tokenizer.eos_token_id).int().cumsum(1) > 0  # tokens after the first EOS are padding
        produced.append(int((~ended).sum()) + int(ended.any(1).sum()))
        return out

    model.generate = counting_generate
    prompt_tokens = [len(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    result = {"prompts": len(prompts), "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
              "max_new_tokens": 64, "decoding": "nucleus sampling, top_p 0.9, temperature 0.7, repetition penalty 1.2",
              "runs": []}
    warm = {**recipe, "generation": {**recipe["generation"], "batch_size": 2, "max_new_tokens": 4}}
    generate_mod.generate(model, tokenizer, list(prompts[:2]), warm)
    sizes = [int(b) for b in os.environ.get("BENCH_GEN_BATCHES", "64 16 1").split()]
    for batch_size, subset in ((b, len(prompts) if b > 1 else n_single) for b in sizes):
        cfg = {**recipe, "generation": {**recipe["generation"], "batch_size": batch_size}}
        produced.clear()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        generate_mod.generate(model, tokenizer, list(prompts[:subset]), cfg)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        run = {"batch_size": batch_size, "prompts": subset, "seconds": seconds, "prompts_per_s": subset / seconds,
               "generated_tokens": sum(produced), "generated_tok_per_s": sum(produced) / seconds,
               "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        result["runs"].append(run)
        print("GENERATE " + json.dumps(run), flush=True)
    write_json("generate.json", result)


# ---------------------------------------------------------------- the table


def plan_now(row: dict) -> float:
    """runner.speed.memory's prediction for a measured row, from the code as it is now (the config is PHI2's)."""
    from transformers import PhiConfig

    from runner.cli import recipes
    from runner.speed import memory, profiles

    _, overrides, flags, _, _ = VARIANTS[row["variant"]]
    flags = {k: v for k, v in flags.items() if k != "pad_to"}
    if row["profile"] != "none":
        flags = ALL_FLAGS
    recipe = recipes.load(RECIPE, overrides + ["training.packing=false"])
    speed = profiles.Speed(row["profile"], row["micro_batch"], row["accumulation"], row["checkpointing"], **flags)
    return memory.estimate(recipe, PhiConfig(**PHI2), speed).reserved_gb


def cmd_table() -> None:
    results = OUT / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    for r in rows:
        r["plan_gib"] = plan_now(r)
    base = next((r for r in rows if r["variant"] == "A"), None)
    head = ("| variant | what | micro-batch x acc | ckpt | s/step | real tok/s | x A | pad eff | MFU (meas. peak) | "
            "MFU (989) | peak alloc GiB | peak reserved GiB | plan GiB | plan err | device GiB | study job min |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        x = r["real_tok_per_s"] / base["real_tok_per_s"] if base else float("nan")
        err = (r["plan_gib"] / r["peak_reserved_gib"] - 1) * 100 if r.get("plan_gib") and r["peak_reserved_gib"] else None
        lines.append(
            f"| {r['variant']} | {r['what']} | {r['micro_batch']} x {r['accumulation']} | "
            f"{'y' if r['checkpointing'] else 'n'} | {r['sec_per_step']:.3f} | {r['real_tok_per_s']:,.0f} | {x:.2f} | "
            f"{r['pad_efficiency']:.3f} | {_pct(r['mfu_measured_peak'])} | {_pct(r['mfu_989'])} | "
            f"{_num(r['peak_alloc_gib'])} | {_num(r['peak_reserved_gib'])} | {_num(r.get('plan_gib'))} | "
            f"{'-' if err is None else f'{err:+.0f}%'} | {_num(r['device_used_gib'])} | {r['study_job_minutes']:.1f} |")
    text = "\n".join(lines)
    gen = OUT / "generate.json"
    if gen.exists():
        g = json.loads(gen.read_text())
        text += (f"\n\nGeneration: {g['prompts']} XSum prompts (mean {g['mean_prompt_tokens']:.0f} tokens), "
                 f"{g['max_new_tokens']} new tokens, {g['decoding']}\n\n| batch size | prompts | s | prompts/s | "
                 "generated tok/s | peak alloc GiB |\n|---|---|---|---|---|---|\n")
        text += "\n".join(f"| {r['batch_size']} | {r['prompts']} | {r['seconds']:.1f} | {r['prompts_per_s']:.2f} | "
                          f"{r['generated_tok_per_s']:,.0f} | {_num(r['peak_alloc_gib'])} |" for r in g["runs"])
    (OUT / "table.md").write_text(text + "\n")
    print(text)


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


if __name__ == "__main__":
    mode = sys.argv[1]
    {"env": cmd_env, "make_model": cmd_make_model, "generate": cmd_generate, "table": cmd_table,
     "train": lambda: cmd_train(sys.argv[2])}[mode]()
