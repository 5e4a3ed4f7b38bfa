#!/usr/bin/env python3
"""Each model family at a real shape (random weights) trained through the runner's own path on one GPU: the ``fast``
profile (compiled layers + CUDA graphs where the family takes them, else the reason it trains uncompiled) against
the notebook-style path (every example padded to 512, eager attention, 4 x 4 with checkpointing, fp32 upcasts),
each in a fresh process for its own peak; real tokens/s, MFU, peak reserved memory against `runner plan`'s
prediction, and evaluation prompts/s (generation on the trained model, the runner's auto backend). A small
mixture-of-experts shape trains under ``fast`` twice: LoRA on attention only (compiled) and on all-linear (peft
puts LoRA on the expert stacks: uncompiled, and the stacks it materialises are in the plan).

    python bench/families.py [--families llama-3.2-1b,qwen3-1.7b] [--moe] [--tiny]   # prints a markdown table

The shapes are tests/families.py's published configs (the MoE one shrunk to fit the call). The tokenizer is the
tiny twin's (.cache/tiny/phi: ids fit every family's vocabulary); the rows are real XSum documents (.shared-data
or ../shared/data) truncated to 512 tokens, so almost every row is full. ``--tiny``: CPU-sized configs of the same
classes, a few steps, for a smoke test (no GPU needed; no timings worth reading). Results: $OUT/families.jsonl and
$OUT/families.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
OUT = Path(os.environ.get("OUT", "/tmp/bench_out"))
MODELS = Path(os.environ.get("BENCH_MODELS", "/tmp/family_models"))
DATA = next((p for p in (ROOT / ".shared-data", ROOT.parent / "shared" / "data", Path("/work/shared/data"))
             if (p / "xsum").is_dir()), ROOT / ".shared-data")
TOKENIZER = ROOT / ".cache" / "tiny" / "phi"
RECIPE = ROOT / "recipes" / "xsum_phi2.yaml"
TINY_VOCAB = 1792  # --tiny: the tiny twin's 1,700 tokens, padded
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 (and H200) SXM, FLOP/s
DENSE = ["llama-3.2-1b", "qwen3-1.7b", "gemma-3-1b", "mistral-7b-v0.3", "phi-3-mini"]
# A small Qwen3-MoE: the real model's layout (128 experts -> 32, top 8 -> 4), about 1.5B parameters.
MOE = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
           num_experts=32, num_experts_per_tok=4, moe_intermediate_size=768)
ATTENTION = "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]"
# path -> (recipe overrides, warm-up steps, measured steps)
PATHS = {
    "notebook": (["training.profile=none", "model.attn_implementation=eager",
                  "training.micro_batch_size=4", "training.gradient_accumulation_steps=4",
                  "training.gradient_checkpointing=true"], 1, 3),
    "fast": (["training.profile=fast"], 3, 6),
}


def family_config(name: str, tiny: bool):
    from tests import families

    small = dict(vocab_size=TINY_VOCAB)  # the tiny twin's tokenizer's ids fit
    if name.startswith("moe"):
        return families.tiny("qwen3-30b-a3b", **small) if tiny else families.config("qwen3-30b-a3b", **MOE)
    return families.tiny(name, **small) if tiny else families.config(name)


def make_model(name: str, tiny: bool) -> Path:
    """Random bf16 weights of ``name``'s config and the tiny twin's tokenizer, saved where the recipe loads them."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = MODELS / (("tiny-" if tiny else "") + name.split(":")[0])
    if (folder / "config.json").is_file():
        return folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(family_config(name, tiny), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for f in TOKENIZER.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, folder / f.name)
    del model
    return folder


def overrides(folder: Path, path: str, name: str, tiny: bool) -> list[str]:
    import torch

    extra, warm, meas = PATHS[path]
    over = [f"model.name_or_path={folder}", f"data.source={DATA / 'xsum' / 'sample.jsonl'}", "data.train_samples=null",
            "data.splits.eval=null", "data.splits.test=null", "evaluation.split=train", "training.eval_every=null",
            "training.save_every=null", "training.resume=never", f"training.max_steps={warm + meas}",
            "training.logging_steps=1", "output_dir=/tmp/bench_family_runs", "training.report_to=none", *extra]
    if name.startswith("moe"):  # attention only, or all-linear: LoRA on the expert stacks (which takes no dropout)
        over += ["lora.target_modules=all-linear", "lora.dropout=0"] if name.endswith(":experts") else [ATTENTION]
    else:
        over.append("lora.target_modules=all-linear")
    if not torch.cuda.is_available():
        over += ["training.optimizer=adamw_torch", "prompt.max_length=128", "data.max_tokens=128"]
    if tiny:
        over += ["training.micro_batch_size=2", "training.gradient_accumulation_steps=1"]
    return over


class Counter:
    """Wraps the trainer's collator: the real (example) tokens of every micro-batch."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, examples):
        self.calls.append(sum(len(e["input_ids"]) for e in examples))
        return self.inner(examples)


def run_one(name: str, path: str, tiny: bool) -> dict:
    """Train ``name`` on ``path`` in this process; then (fast) generate for evaluation prompts/s."""
    import torch

    import bench  # bench/bench.py: the step timer (imported here: it reads its settings from the environment)
    from runner.cli import recipes
    from runner.train import train as train_mod

    folder = make_model(name, tiny)
    _, warm, meas = PATHS[path]
    if tiny:
        warm, meas = 1, 2
    recipe = recipes.load(RECIPE, overrides(folder, path, name, tiny) + ([f"training.max_steps={warm + meas}"]))
    cuda = torch.cuda.is_available()
    stamps: dict[int, float] = {}
    held: dict = {}

    def instrument(trainer):
        if path == "notebook":  # the notebook's padding="max_length": every row padded to 512
            trainer.data_collator.pad_to_multiple_of = recipe["prompt"]["max_length"]
        held["counter"] = trainer.data_collator = Counter(trainer.data_collator)
        held["trainer"] = trainer
        trainer.add_callback(bench.step_timer(stamps))

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run_dir, model, tokenizer, prepared = train_mod.train(recipe, instrument=instrument)
    peak_reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    env = json.loads((run_dir / "env.json").read_text())
    speed = env["speed"]
    ga = speed["gradient_accumulation_steps"]
    real = sum(held["counter"].calls[warm * ga:(warm + meas) * ga])
    seconds = stamps[warm + meas] - stamps[warm]
    frozen = env["total"] - env["trainable"]
    row = dict(family=name, path=path, micro_batch=speed["micro_batch_size"], accumulation=ga,
               checkpointing=speed["gradient_checkpointing"], compiled=speed["compiled"],
               cuda_graphs=speed["cuda_graphs"], compile_note=speed.get("compile_note"),
               sec_per_step=seconds / meas, real_tok_per_s=real / seconds,
               mfu=6 * frozen * (real / seconds) / H100_BF16_PEAK, params=env["total"], trainable=env["trainable"],
               peak_reserved_gib=peak_reserved, plan_gib=speed["predicted_gb"] or _plan(recipe, speed),
               first_step_s=stamps[1] - stamps[0],
               losses=[h["loss"] for h in held["trainer"].state.log_history if "loss" in h])
    if path == "fast":
        row.update(_generation(recipe, model, tokenizer, prepared, tiny))
    return row


def _plan(recipe: dict, speed: dict) -> float:
    """runner plan's prediction for the path as it ran (profile none predicts nothing without a budget)."""
    from runner.model import model as model_mod
    from runner.speed import memory, profiles

    fields = {k: v for k, v in speed.items() if k in profiles.Speed.__dataclass_fields__ and k != "predicted_gb"}
    return memory.estimate(recipe, model_mod.load_config(recipe), profiles.Speed(**fields)).reserved_gb


def _generation(recipe: dict, model, tokenizer, prepared, tiny: bool) -> dict:
    """Evaluation prompts/s: the trained model generating summaries for XSum prompts, the backend and batch the
    runner's auto choice picks (runner.evaluate.backend)."""
    import torch

    from runner.evaluate import generate as generate_mod

    n = 8 if tiny else 256
    prompts = list(prepared.splits["train"]["prompt"][:n])
    cfg = {**recipe, "generation": {**recipe["generation"], "max_new_tokens": 8 if tiny else 64, "stop": []}}
    choice = generate_mod.choose(model, tokenizer, prompts, cfg)
    generate_mod.generate(model, tokenizer, prompts[:2], cfg, choice=choice)  # warm-up (compiles where chosen)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    generate_mod.generate(model, tokenizer, prompts, cfg, choice=choice)
    sync()
    seconds = time.perf_counter() - start
    return dict(eval_prompts=n, eval_prompts_per_s=n / seconds,
                eval_backend=f"{choice.backend} x {choice.batch_size}")


def table(rows: list[dict]) -> str:
    head = ("| family | path | micro-batch x acc | ckpt | compiled | s/step | real tok/s | x notebook | MFU (989) | "
            "peak reserved GiB | plan GiB | plan err | eval prompts/s | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {r["family"]: r["real_tok_per_s"] for r in rows if r.get("path") == "notebook" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['path']} | - | - | - | - | - | - | - | - | - | - | - | "
                         f"failed: {r['error'][:150]} |")
            continue
        err = ((r["peak_reserved_gib"] - r["plan_gib"]) / r["plan_gib"] * 100) if r["peak_reserved_gib"] else None
        compiled = ("graphs" if r["cuda_graphs"] else "yes") if r["compiled"] else "no"
        speedup = r["real_tok_per_s"] / base[r["family"]] if r["family"] in base else None
        lines.append(
            f"| {r['family']} | {r['path']} | {r['micro_batch']} x {r['accumulation']} | "
            f"{'yes' if r['checkpointing'] else 'no'} | {compiled} | {r['sec_per_step']:.2f} | "
            f"{r['real_tok_per_s']:,.0f} | {f'{speedup:.2f}x' if speedup else '-'} | {r['mfu'] * 100:.1f}% | "
            f"{_num(r['peak_reserved_gib'])} | {r['plan_gib']:.2f} | {f'{err:+.1f}%' if err is not None else '-'} | "
            f"{_num(r.get('eval_prompts_per_s'), 1)}"
            f"{' (' + r['eval_backend'] + ')' if r.get('eval_backend') else ''} | {r.get('compile_note') or ''} |")
    return "\n".join(lines)


def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(DENSE), help="comma-separated dense families (tests/families.py)")
    p.add_argument("--moe", action="store_true", help="also the small mixture-of-experts shape")
    p.add_argument("--no-dense", action="store_true", help="only the MoE shape")
    p.add_argument("--tiny", action="store_true", help="CPU-sized configs, a few steps (smoke test)")
    p.add_argument("--one", nargs=2, metavar=("FAMILY", "PATH"), help=argparse.SUPPRESS)  # a child process
    p.add_argument("--timeout", type=int, default=240, help="seconds per training process")
    args = p.parse_args()
    if args.one:
        print("FAMILY_ROW " + json.dumps(run_one(*args.one, args.tiny)), flush=True)
        return
    jobs = [] if args.no_dense else [(f, path) for f in args.families.split(",") if f for path in PATHS]
    if args.moe:
        jobs += [("moe", "fast"), ("moe:experts", "fast")]
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for family, path in jobs:
        t0 = time.time()
        cmd = [sys.executable, __file__, "--one", family, path] + (["--tiny"] if args.tiny else [])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            found = [line[len("FAMILY_ROW "):] for line in done.stdout.splitlines() if line.startswith("FAMILY_ROW ")]
            if found:
                row = json.loads(found[-1])
            else:
                tail = [line for line in done.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
                row = dict(family=family, path=path, error=(tail[-1] if tail else f"exit {done.returncode}"))
                print(done.stderr[-3000:], file=sys.stderr, flush=True)
        except subprocess.TimeoutExpired:
            row = dict(family=family, path=path, error=f"over {args.timeout} s")
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        with open(OUT / "families.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print("ROW " + json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    text = table(rows)
    (OUT / "families.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
