#!/usr/bin/env python3
"""Evaluation speed on one GPU, the old path and the new side by side in one process (issue 9).

The study's XSum evaluation through the runner's own functions (``runner.evaluate.generate.generate``,
``runner.evaluate.rank.rank``, ``runner.evaluate.rank.completion_logprobs``) on a Phi-2-shaped random-weight model (bench/bench.py
builds it), NF4 double-quant + a LoRA adapter r16 on q,k,v,dense whose B matrices are random (a fresh adapter's are
zero and would merge to nothing), loaded by ``runner.model.model.load_trained`` as ``runner eval`` loads it:

- old: ``generation.backend=plain generation.batch_size=16`` (what every evaluation ran before backends existed);
- new: ``generation.backend=auto generation.batch_size=auto`` (the default now), plus ``compiled`` and, under the
  ``low_memory`` profile's 3.8 GiB budget, what auto does there;
- sampling as in recipes/xsum_phi2.yaml (top_p 0.9, temperature 0.7, repetition penalty 1.2, stop at a newline),
  64 new tokens, and greedy on the same prompts: identical rows and tokens old vs new, and as a yardstick the old
  path against itself at another batch size (random weights leave near-ties that any rounding flips);
- the loss of the reference summaries on the 4-bit model and on the merged copy;
- AG News rank mode (4 labels): examples/s old (batch 32, the recipe's) vs new; "filed": the code of the day
  issue 9 was filed (bench/filed_rank.py), the issue's "today's".

The benchmark adds timers and a wrapper around ``GenerationMixin.generate`` that records each row's generated
tokens. Prints a table, writes ``$OUT/eval_bench.json`` and ``$OUT/eval_table.md``.

    python bench/generate_bench.py        # on the device: bash bench/run.sh EVAL 480 (installs the wheels first)

Environment: BENCH_PROMPTS (256), BENCH_OLD_PROMPTS (96: the old path's rate is measured on the first ones),
BENCH_SELF_PROMPTS (64: the old path at batch 32, the greedy agreement's yardstick), BENCH_EVERY_PROMPTS
(null = all 1,000 XSum rows: the batch a long evaluation gets), BENCH_FULL_SPLIT (0; 11334 times generation over
the full XSum test split's number of prompts, the rows repeated), BENCH_AFTER_TRAINING (1: cuDNN's attention off
at the start, as training leaves it), BENCH_RANK (512),
BENCH_RANK_OLD (256: the old and filed paths' examples), BENCH_RANK_FULL (0; 7600 times rank mode over AG News'
test split's number of rows, the rows repeated), BENCH_RANK_COMPILE (1: a probe with the merged copy's layers
compiled), BENCH_LOWMEM_PROMPTS (24), BENCH_COMPILED (1), BENCH_BUDGET (seconds after which the
remaining stages are skipped; 330), BENCH_TINY=1 (a 2-layer model: a CPU smoke test of the script).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if os.environ.get("BENCH_TINY") == "1":
    os.environ.setdefault("BENCH_MODEL", "/tmp/phi2rand_tiny")
_spec = importlib.util.spec_from_file_location("phi2_bench", ROOT / "bench" / "bench.py")
phi2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(phi2)  # PHI2's shape, the model folder, the data folder, make_model

OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
ENV = os.environ.get
N_PROMPTS, N_OLD = int(ENV("BENCH_PROMPTS", 256)), int(ENV("BENCH_OLD_PROMPTS", 96))
N_RANK, N_RANK_OLD = int(ENV("BENCH_RANK", 512)), int(ENV("BENCH_RANK_OLD", 256))
# BENCH_RANK_COMPILE=1: rank mode again with the merged copy's layers compiled, twice (the first compiles)
COMPILED_RANK = (("new rank, compiled layers (first: compiles)", "new rank, compiled layers (again)")
                 if ENV("BENCH_RANK_COMPILE") == "1" else ())
N_RANK_FULL = int(ENV("BENCH_RANK_FULL", 0))  # e.g. 7600 (AG News' test split): rank mode over that many rows
# BENCH_ONLY="new rank;old rank": run only the stages named (separated by ";"); unset: every stage
ONLY = [name for name in ENV("BENCH_ONLY", "").split(";") if name]
N_LOWMEM = int(ENV("BENCH_LOWMEM_PROMPTS", 24))
N_SELF = int(ENV("BENCH_SELF_PROMPTS", 64))
N_EVERY = ENV("BENCH_EVERY_PROMPTS", "null")  # null: every row of .shared-data/xsum (1,000)
N_FULL = int(ENV("BENCH_FULL_SPLIT", 0))  # e.g. 11334: that many prompts (the XSum rows repeated), timed whole
COMPILED = ENV("BENCH_COMPILED", "1") == "1"
BUDGET = float(ENV("BENCH_BUDGET", 330))
ADAPTER = Path(str(phi2.MODEL_DIR) + "_adapter")
T0 = time.time()
OLD = ["generation.backend=plain", "generation.batch_size=16"]


def log(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


# ---------------------------------------------------------------- setup


def xsum_recipe(extra: list[str]):
    from runner.cli import recipes

    over = phi2.base_overrides(1) + [f"data.train_samples={N_PROMPTS}", "generation.max_new_tokens=64"]
    return recipes.load(phi2.RECIPE, over + extra)


def make_adapter(recipe) -> None:
    """A LoRA adapter r16 on q,k,v,dense (the recipe's) with random B (std 0.02), saved as training saves one."""
    import torch
    from peft import get_peft_model

    from runner.model import lora as lora_mod
    from runner.model import model as model_mod

    if (ADAPTER / "adapter_config.json").is_file():
        return
    net = get_peft_model(base := model_mod.load_base(recipe), lora_mod.lora_config(recipe, model=base))
    gen = torch.Generator().manual_seed(0)
    for name, param in net.named_parameters():
        if "lora_B" in name:
            param.data.copy_((torch.randn(param.shape, generator=gen) * 0.02).to(param.dtype))
    net.save_pretrained(ADAPTER)
    del net
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


class Rows:
    """Every row ``GenerationMixin.generate`` returns, keyed by its prompt's tokens: generated tokens up to and
    including the first EOS/padding token (what was computed for it)."""

    def __init__(self):
        from transformers.generation.utils import GenerationMixin

        self.by_prompt: dict[tuple, list[int]] = {}
        real = GenerationMixin.generate
        rows = self

        def recording(model, *args, **kwargs):
            out = real(model, *args, **kwargs)
            config = kwargs["generation_config"]
            width = kwargs["input_ids"].shape[1]
            for ids, mask, row in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist(),
                                      out[:, width:].tolist()):
                stop = {config.pad_token_id, config.eos_token_id}
                end = next((k + 1 for k, t in enumerate(row) if t in stop), len(row))
                rows.by_prompt.setdefault(tuple(t for t, m in zip(ids, mask) if m), row[:end])
            return out

        GenerationMixin.generate = recording


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # an earlier stage's cached blocks are not this stage's peak
        torch.cuda.reset_peak_memory_stats()


def peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def dist(values: list[int]) -> dict:
    s = sorted(values)
    q = {f"p{p}": s[min(len(s) - 1, len(s) * p // 100)] for p in (10, 50, 90)}
    return {"min": s[0], **q, "max": s[-1], "mean": statistics.fmean(s)}


# ---------------------------------------------------------------- stages


def generation(name: str, model, tokenizer, prompts: list[str], recipe, rows: Rows) -> dict:
    from runner.evaluate import generate as generate_mod

    choice = generate_mod.choose(model, tokenizer, prompts, recipe)
    rows.by_prompt.clear()
    peak_reset()
    start = time.perf_counter()
    preds = generate_mod.generate(model, tokenizer, prompts, recipe, choice=choice)  # what is reported is what ran
    sync()
    seconds = time.perf_counter() - start
    keys = [tuple(ids) for ids in tokenizer(prompts)["input_ids"]]
    generated = [rows.by_prompt[k] for k in keys]
    lengths = [len(g) for g in generated]
    g = recipe["generation"]
    result = {"run": name, "backend": choice.backend, "batch_size": choice.batch_size,
              "decoding": "sampling" if g["do_sample"] else "greedy", "prompts": len(prompts), "seconds": seconds,
              "prompts_per_s": len(prompts) / seconds, "generated_tokens": sum(lengths),
              "generated_tok_per_s": sum(lengths) / seconds, "generated_lengths": dist(lengths),
              "predicted_gib": choice.predicted_gb, **peaks()}
    log("GEN", json.dumps({k: v for k, v in result.items() if k != "generated_lengths"}))
    result["_tokens"], result["_preds"] = generated, [preds[i] for i in range(len(prompts))]
    return result


def agreement(old: dict, new: dict) -> dict:
    """Greedy old vs new on the prompts both ran: identical rows, identical predictions, and per row the share of
    token positions equal before the first difference."""
    n = min(old["prompts"], new["prompts"])
    same_rows = sum(a == b for a, b in zip(old["_tokens"][:n], new["_tokens"][:n]))
    same_preds = sum(a == b for a, b in zip(old["_preds"][:n], new["_preds"][:n]))
    prefix, firsts = [], []
    for a, b in zip(old["_tokens"][:n], new["_tokens"][:n]):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(k / max(len(a), len(b), 1))
        if a != b:
            firsts.append(k)
    return {"prompts": n, "identical_rows": same_rows, "identical_predictions": same_preds,
            "mean_share_before_first_difference": statistics.fmean(prefix),
            "first_difference_positions": dist(firsts) if firsts else None}


def loss_check(model, tokenizer, examples, recipe) -> dict:
    """Token-level loss of the reference summaries + EOS on 4-bit + LoRA (plain) vs the merged copy."""
    from runner.evaluate import rank as rank_mod

    prompts, completions = list(examples["prompt"][:64]), list(examples["completion"][:64])
    out = {}
    for name in ("plain", "merged"):
        r = {**recipe, "generation": {**recipe["generation"], "backend": name, "batch_size": "auto"}}
        start = time.perf_counter()
        out[name] = rank_mod.completion_logprobs(model, tokenizer, prompts, completions, r)
        out[name + "_s"] = time.perf_counter() - start
    tokens = sum(n for _, n in out["plain"])
    losses = {k: -sum(lp for lp, _ in out[k]) / tokens for k in ("plain", "merged")}
    diffs = [abs(a - b) / n for (a, n), (b, _) in zip(out["plain"], out["merged"])]
    result = {"examples": len(prompts), "tokens": tokens, "loss_4bit_lora": losses["plain"],
              "loss_merged": losses["merged"], "max_abs_per_token_diff": max(diffs),
              "mean_abs_per_token_diff": statistics.fmean(diffs), "seconds_plain": out["plain_s"],
              "seconds_merged": out["merged_s"]}
    log("LOSS", json.dumps(result))
    return result


def rank_examples(tokenizer) -> tuple[list[str], list[str]]:
    """(overrides of recipes/agnews_phi2.yaml, prompts): AG News rows from ``.shared-data/agnews``, or XSum articles
    under AG News labels when that folder is absent (the speed depends on lengths, not on the words)."""
    from runner.data import data as data_mod

    source = phi2.DATA / "agnews" / "sample.jsonl"
    if not source.is_file():
        import random

        rows = [json.loads(line) for line in (phi2.DATA / "xsum" / "sample.jsonl").read_text().splitlines()]
        rng = random.Random(0)
        source = Path("/tmp/agnews_from_xsum.jsonl")
        source.write_text("".join(json.dumps({"text": r["document"][:700], "label": rng.choice(
            ["World", "Sports", "Business", "Sci/Tech"])}) + "\n" for r in rows))
    over = [f"model.name_or_path={phi2.MODEL_DIR}", f"data.source={source}", f"data.train_samples={N_RANK}",
            "data.splits.eval=null", "data.splits.test=null", "data.holdout.eval=0", "evaluation.split=train",
            "training.eval_every=null", "generation.mode=rank", "output_dir=/tmp/bench_runs"]
    prompts = list(data_mod.prepare(rank_recipe(over), tokenizer, roles=("train",)).splits["train"]["prompt"])
    return over, prompts


def compiled_copy(model):
    """A probe (BENCH_RANK_COMPILE=1), not a runner feature: the merged copy the merging backends make
    (runner.model.merge), its decoder layers compiled by torch.compile (dynamic shapes: every batch has its own
    width), to measure what fusing the elementwise work (Phi's rotary concatenations, residual adds, LayerNorm) would
    give rank mode and what compiling costs. rank() runs it as the model: with nothing left to merge, a merging
    backend uses it as it is (runner.evaluate.backend.model_for)."""
    from runner.model import merge

    copy = merge.merged_copy(model)
    for layer in copy.model.layers:
        layer.compile(dynamic=True)
    return copy


def _free(copy) -> None:
    """What model_for does with the copy it made: its weights released now, its memory back to the card."""
    import torch

    copy.to("meta")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def filed_rank(model, tokenizer, prompts: list[str], recipe) -> dict[int, str]:
    """Rank mode as the issue's day ran it, under today's attention setting for scoring (cuDNN's attention off,
    which made that path faster, not slower: bench/RESULTS.md "cuDNN's attention, per phase")."""
    from runner.model import attention

    spec = importlib.util.spec_from_file_location("filed_rank", ROOT / "bench" / "filed_rank.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with attention.for_scoring():
        return module.rank(model, tokenizer, prompts, recipe)


def rank_recipe(over: list[str]):
    from runner.cli import recipes

    return recipes.load(ROOT / "recipes" / "agnews_phi2.yaml", over)


def ranking(name: str, model, tokenizer, prompts: list[str], recipe) -> dict:
    from runner.evaluate import rank as rank_mod

    filed = name == "filed rank"  # the code of the issue's day (bench/filed_rank.py), its batch as the recipe says
    choice = (SimpleNamespace(backend="plain", batch_size=recipe["generation"]["batch_size"], predicted_gb=None)
              if filed else rank_mod.choose(model, tokenizer, prompts, recipe))
    # An untimed warm-up: the first stage would pay CUDA's start (compiled: the first run is timed whole, compiling
    # included).
    if name not in COMPILED_RANK:
        (filed_rank if filed else rank_mod.rank)(model, tokenizer, prompts[:8], recipe)
    peak_reset()
    start = time.perf_counter()
    if filed:
        preds = filed_rank(model, tokenizer, prompts, recipe)
    elif name in COMPILED_RANK and choice.merges:  # the copy made, compiled and freed within the timed run
        net = compiled_copy(model)
        preds = rank_mod.rank(net, tokenizer, prompts, recipe, choice=choice)
        _free(net)
    else:
        preds = rank_mod.rank(model, tokenizer, prompts, recipe, choice=choice)  # what is reported is what ran
    sync()
    seconds = time.perf_counter() - start
    result = {"run": name, "backend": choice.backend, "batch_size": choice.batch_size, "examples": len(prompts),
              "seconds": seconds, "examples_per_s": len(prompts) / seconds, "predicted_gib": choice.predicted_gb,
              **peaks()}
    log("RANK", json.dumps(result))
    result["_preds"] = [preds[i] for i in range(len(prompts))]
    if ENV("BENCH_PROFILE_RANK") and name == "new rank":
        profile_rank(model, tokenizer, prompts[:4 * choice.batch_size], recipe)
    return result


def profile_rank(model, tokenizer, prompts: list[str], recipe) -> None:
    """Where rank mode's time goes (BENCH_PROFILE_RANK=1): Python functions (cProfile), then ops and kernels
    (torch.profiler), each over the same four batches; written to $OUT/prof_rank.txt."""
    import cProfile
    import io
    import pstats

    import torch

    from runner.evaluate import rank as rank_mod

    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    rank_mod.rank(model, tokenizer, prompts, recipe)
    sync()
    prof.disable()
    wall = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumtime").print_stats(45)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as tprof:
        rank_mod.rank(model, tokenizer, prompts, recipe)
        sync()
    events = tprof.key_averages()
    out = [f"## rank mode, {len(prompts)} prompts: {wall:.2f} s under cProfile", text.getvalue(),
           events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70),
           events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prof_rank.txt").write_text("\n".join(out))


# ---------------------------------------------------------------- main


def main() -> None:
    import torch

    from runner.data import data as data_mod
    from runner.model import model as model_mod
    torch.set_num_threads(int(ENV("OMP_NUM_THREADS", 8)))
    if ENV("BENCH_AFTER_TRAINING", "1") == "1":
        # As `runner train` leaves the process for its evaluation: every training profile but none turns cuDNN's
        # attention off (runner.speed.profiles); generation and scoring now choose their own kernels (runner.model.attention).
        torch.backends.cuda.enable_cudnn_sdp(False)
    if not (phi2.MODEL_DIR / "config.json").is_file():
        phi2.cmd_make_model()
    cuda = torch.cuda.is_available()
    base = xsum_recipe([])
    make_adapter(base)
    tokenizer = model_mod.load_tokenizer(base)
    examples = data_mod.prepare(base, tokenizer, roles=("train",)).splits["train"]
    prompts = list(examples["prompt"])
    model = model_mod.load_trained(base, ADAPTER)
    log(f"loaded: {len(prompts)} prompts, model {phi2.MODEL_DIR}, adapter {ADAPTER}, cuda {cuda}")
    rows = Rows()
    if ONLY:  # the stages that ran first in a full run paid CUDA's start; a chosen few start warm instead
        from runner.evaluate import generate as generate_mod

        generate_mod.generate(model, tokenizer, prompts[:8], xsum_recipe(["generation.max_new_tokens=4"]))
    new = [] if cuda else ["generation.backend=merged"]  # CPU smoke test: auto would be plain there
    report: dict = {"prompts": len(prompts), "mean_prompt_tokens": statistics.fmean(
        len(ids) for ids in tokenizer(prompts)["input_ids"]), "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
        "generation": [], "rank": [], "skipped": []}

    def stage(name: str, fn, need: float = 0.0, into: list | None = None):
        """Run a stage unless it would end past BENCH_BUDGET (``need``: its expected seconds); the files are
        rewritten after every stage, so a run cut off by its time limit still leaves what it measured."""
        if ONLY and name not in ONLY:
            report["skipped"].append(f"{name}: not in BENCH_ONLY")
            return None
        if time.time() - T0 + need > BUDGET:
            report["skipped"].append(name)
            log(f"SKIP {name}: {time.time() - T0:.0f} s + {need:.0f} s > BENCH_BUDGET {BUDGET:.0f}")
            return None
        try:
            result = fn()
            if into is not None and result:
                into.append(result)
            return result
        except torch.cuda.OutOfMemoryError as exc:  # report it and go on: the other stages still measure
            report["skipped"].append(f"{name}: out of memory ({str(exc)[:120]})")
            log(f"OOM in {name}")
            torch.cuda.empty_cache()
            return None
        finally:
            finish(report, show=False)

    sampling = []  # the study's decoding
    greedy = ["generation.do_sample=false"]
    runs = report["generation"]
    for label, over, subset in (("old sampling", OLD + sampling, N_OLD), ("new sampling", new + sampling, None),
                                ("old greedy", OLD + greedy, N_OLD), ("new greedy", new + greedy, None)):
        stage(label, lambda o=over, s=subset, lb=label: generation(lb, model, tokenizer, prompts[:s], xsum_recipe(o),
                                                                    rows), into=runs)
    # Every XSum row at hand: the batch auto picks for a long evaluation (the full test split's), partial batches
    # included, so its rate is the one to project the full split from.
    every = list(data_mod.prepare(xsum_recipe([f"data.train_samples={N_EVERY}"]), tokenizer, roles=("train",))
                 .splits["train"]["prompt"])
    if len(every) > len(prompts):
        stage("new sampling, every row", lambda: generation("new sampling, every row", model, tokenizer, every,
                                                            xsum_recipe(new + sampling), rows), need=40, into=runs)
    if N_FULL:  # the full test split's size, measured rather than projected: the 1,000 rows over and over
        full = (every * (N_FULL // len(every) + 1))[:N_FULL]
        stage("new sampling, full split size", lambda: generation("new sampling, full split size", model, tokenizer,
                                                                  full, xsum_recipe(new + sampling), rows),
              need=N_FULL / 60, into=runs)
    # The yardstick: the old path against itself with another batch size (other kernels, other padding).
    stage("old greedy, batch 32", lambda: generation("old greedy, batch 32", model, tokenizer, prompts[:N_SELF],
                                                     xsum_recipe(["generation.backend=plain", "generation.batch_size=32",
                                                                  *greedy]), rows), need=15, into=runs)
    by = {r["run"]: r for r in runs}
    if "old greedy" in by and "new greedy" in by:
        report["greedy_agreement"] = agreement(by["old greedy"], by["new greedy"])
        log("AGREE", json.dumps(report["greedy_agreement"]))
    if "old greedy" in by and "old greedy, batch 32" in by:
        report["greedy_agreement_old_batch_16_vs_32"] = agreement(by["old greedy"], by["old greedy, batch 32"])
        log("AGREE old 16 vs 32", json.dumps(report["greedy_agreement_old_batch_16_vs_32"]))
    report["loss"] = stage("loss", lambda: loss_check(model, tokenizer, examples, base))
    rank_over, rank_prompts = rank_examples(tokenizer)
    # The full test split's size (AG News: 7,600), the rows repeated; and the packed passes on the 4-bit model
    # itself (generation.backend=batched: no merged copy to make).
    rank_full = (rank_prompts * (N_RANK_FULL // len(rank_prompts) + 1))[:N_RANK_FULL]
    plain32 = ["generation.backend=plain", "generation.batch_size=32"]
    for label, over, chosen in (("old rank", plain32, rank_prompts[:N_RANK_OLD]),
                                ("filed rank", plain32, rank_prompts[:N_RANK_OLD]),
                                ("new rank", new, rank_prompts), ("new rank, 4-bit", ["generation.backend=batched"],
                                                                  rank_prompts),
                                ("new rank, full split size", new, rank_full if N_RANK_FULL else []),
                                *((label, new, rank_full or rank_prompts) for label in COMPILED_RANK)):
        if chosen:
            stage(label, lambda o=over, c=chosen, lb=label: ranking(lb, model, tokenizer, c,
                                                                     rank_recipe(rank_over + o)), into=report["rank"])
    if len(report["rank"]) >= 2 and report["rank"][0]["run"] == "old rank":
        old_r = report["rank"][0]
        for new_r in report["rank"][1:]:
            n = min(old_r["examples"], new_r["examples"])
            new_r["agreement_with_old"] = sum(a == b for a, b in zip(old_r["_preds"][:n], new_r["_preds"][:n])) / n
        report["rank_agreement"] = next(r["agreement_with_old"] for r in report["rank"][1:] if r["run"] != "filed rank")
    if cuda:
        stage("low_memory", lambda: generation("new sampling, profile low_memory", model, tokenizer,
                                               prompts[:N_LOWMEM], xsum_recipe(["training.profile=low_memory"]),
                                               rows), need=20, into=runs)
    if COMPILED and cuda:
        for label in ("compiled sampling (first call: compiles)", "compiled sampling (again: a new copy)"):
            stage(label, lambda lb=label: generation(lb, model, tokenizer, prompts,
                                                     xsum_recipe(["generation.backend=compiled"]), rows),
                  need=90, into=runs)
    finish(report)


def finish(report: dict, show: bool = True) -> None:
    runs = {r["run"]: r for r in report["generation"]}
    lines = [f"Evaluation speed, {report['gpu'] or 'CPU'}: {report['prompts']} XSum prompts (mean "
             f"{report['mean_prompt_tokens']:.0f} tokens), 64 new tokens; versions {report['versions']}", "",
             "| run | backend | batch | prompts | s | prompts/s | x old | generated tok/s | gen. length p10/p50/p90 | "
             "peak alloc GiB | peak reserved GiB | predicted GiB |", "|" + "---|" * 12]
    for r in report["generation"]:
        old = runs.get("old greedy" if r["decoding"] == "greedy" else "old sampling")
        x = r["prompts_per_s"] / old["prompts_per_s"] if old else float("nan")
        d = r["generated_lengths"]
        lines.append(f"| {r['run']} | {r['backend']} | {r['batch_size']} | {r['prompts']} | {r['seconds']:.1f} | "
                     f"{r['prompts_per_s']:.2f} | {x:.1f} | {r['generated_tok_per_s']:,.0f} | "
                     f"{d['p10']}/{d['p50']}/{d['p90']} | {_num(r['peak_alloc_gib'])} | "
                     f"{_num(r['peak_reserved_gib'])} | {_num(r['predicted_gib'])} |")
    for name in ("new sampling, every row", "new sampling"):
        if name in runs:
            r = runs[name]
            lines += ["", f"Full XSum test split (11,334 prompts) at the rate of '{name}' ({r['prompts']} prompts, "
                          f"batch {r['batch_size']}): {11334 / r['prompts_per_s'] / 60:.1f} min."]
            break
    if "new sampling, full split size" in runs:
        r = runs["new sampling, full split size"]
        lines += ["", f"Measured at the full XSum test split's size ({r['prompts']:,} prompts, the rows repeated): "
                      f"{r['seconds']:.0f} s = {r['seconds'] / 60:.2f} min, {r['prompts_per_s']:.1f} prompts/s."]
    for key, what in (("greedy_agreement", "old vs new"), ("greedy_agreement_old_batch_16_vs_32",
                                                           "old at batch 16 vs old at batch 32 (the yardstick)")):
        if report.get(key):
            a = report[key]
            lines += ["", f"Greedy {what} on {a['prompts']} prompts: {a['identical_rows']} identical token rows, "
                          f"{a['identical_predictions']} identical predictions, mean share of tokens before the first "
                          f"difference {a['mean_share_before_first_difference']:.3f}"
                          + (f"; first differences at token p10/p50/p90 {a['first_difference_positions']['p10']}/"
                             f"{a['first_difference_positions']['p50']}/{a['first_difference_positions']['p90']}"
                             if a["first_difference_positions"] else "")]
    if report.get("loss"):
        L = report["loss"]
        lines += ["", f"Loss of {L['examples']} reference summaries ({L['tokens']} tokens): 4-bit + LoRA "
                      f"{L['loss_4bit_lora']:.5f}, merged copy {L['loss_merged']:.5f}; per-example per-token |diff| "
                      f"mean {L['mean_abs_per_token_diff']:.2e}, max {L['max_abs_per_token_diff']:.2e}"]
    if report["rank"]:
        # x old: against today's code on the plain backend; x filed: against the code of the issue's day.
        lines += ["", "| rank mode (4 labels) | backend | batch | examples | s | examples/s | x old | x filed | peak "
                      "reserved GiB | predicted GiB |", "|" + "---|" * 10]
        base = report["rank"][0]["examples_per_s"]
        filed = next((r["examples_per_s"] for r in report["rank"] if r["run"] == "filed rank"), None)
        for r in report["rank"]:
            lines.append(f"| {r['run']} | {r['backend']} | {r['batch_size']} | {r['examples']} | {r['seconds']:.1f} "
                         f"| {r['examples_per_s']:.1f} | {r['examples_per_s'] / base:.1f} | "
                         f"{_num(filed and r['examples_per_s'] / filed)} | "
                         f"{_num(r['peak_reserved_gib'])} | {_num(r['predicted_gib'])} |")
        same = [f"{r['run']} {100 * r['agreement_with_old']:.1f}%" for r in report["rank"] if "agreement_with_old" in r]
        if same:
            lines.append(f"\nRank predictions identical to the old path's (its {report['rank'][0]['examples']} "
                         f"examples): {', '.join(same)}")
    if report["skipped"]:
        lines += ["", f"Skipped: {'; '.join(report['skipped'])}"]
    lines.append(f"\ntotal {time.time() - T0:.0f} s")
    text = "\n".join(lines)
    if show:
        print(text, flush=True)
    if OUT is not None:
        OUT.mkdir(parents=True, exist_ok=True)
        clean = {**report, "generation": [_public(r) for r in report["generation"]],
                 "rank": [_public(r) for r in report["rank"]]}
        (OUT / "eval_bench.json").write_text(json.dumps(clean, indent=1))
        (OUT / "eval_table.md").write_text(text + "\n")


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
