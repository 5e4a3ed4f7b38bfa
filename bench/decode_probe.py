#!/usr/bin/env python3
"""Where a decoding step of the evaluation's generation goes (issue 9), on one GPU.

The study's XSum generation as ``runner.evaluate.generate`` runs it on the merged copy (the default on a GPU): the Phi-2-shaped
random model + adapter of bench/generate_bench.py, one batch of XSum prompts of median length. For each variant it
times ``generate`` with 1 and with 1 + STEPS new tokens (min_new_tokens forces every step), so
``(t[1+STEPS] - t[1]) / STEPS`` is one decoding step and ``t[1]`` the prefill; then torch.profiler over a few steps
of the recipe's own settings. Diagnostic only (the variants that change decoding are not the recipe's).

    BENCH_ONLY=... python bench/decode_probe.py   # on the device: source bench/device_env.sh first
Writes $OUT/decode_probe.json and $OUT/decode_profile.txt.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_bench as gb  # noqa: E402  (the model, adapter and recipe of the evaluation benchmark)

STEPS = int(os.environ.get("PROBE_STEPS", 32))
BATCHES = [int(b) for b in os.environ.get("PROBE_BATCHES", "424").split(",")]
OUT = Path(os.environ.get("OUT", "/tmp/bench_out"))


def timed(net, tokenizer, texts, config, new_tokens: int) -> tuple[float, int]:
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True).to(next(net.parameters()).device)
    config = config.__class__.from_dict({**config.to_dict(), "max_new_tokens": new_tokens,
                                         "min_new_tokens": new_tokens})
    gb.sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = net.generate(**enc, generation_config=config, tokenizer=tokenizer)
    gb.sync()
    return time.perf_counter() - start, out.shape[1] - enc["input_ids"].shape[1]


def variant(name, net, tokenizer, texts, config) -> dict:
    timed(net, tokenizer, texts[:8], config, 2)  # warm: kernels loaded, caches sized
    t1, _ = timed(net, tokenizer, texts, config, 1)
    tn, steps = timed(net, tokenizer, texts, config, 1 + STEPS)
    row = {"variant": name, "batch": len(texts), "prefill_s": t1, "step_ms": (tn - t1) / (steps - 1) * 1e3,
           "steps": steps, "peak_gib": gb.peaks()["peak_alloc_gib"] or 0.0}
    print("PROBE", json.dumps(row), flush=True)
    return row


def profile(net, tokenizer, texts, config) -> str:
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * torch.cuda.is_available()
    timed(net, tokenizer, texts, config, 2)
    with torch.profiler.profile(activities=acts) as prof:
        timed(net, tokenizer, texts, config, 9)
    events = prof.key_averages()
    return "\n".join([f"## recipe settings, batch {len(texts)}, prefill + 8 decoding steps",
                      events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=80),
                      events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=80)])


def forced(label: str, n: int, cudnn: bool, call) -> dict:
    """``call(cudnn)`` timed: generate() or rank() with cuDNN's attention forced on or off (their ``cudnn_attention``)
    where runner.model.attention's phase would choose it."""
    gb.sync()
    start = time.perf_counter()
    call(cudnn)
    gb.sync()
    seconds = time.perf_counter() - start
    row = {"variant": f"{label}, cuDNN attention {'on' if cudnn else 'off'}", "prompts": n, "seconds": seconds,
           "prompts_per_s": n / seconds}
    print("TIMED", json.dumps(row), flush=True)
    return row


def full_runs(model, tokenizer, every: list[str]) -> list[dict]:
    """``runner.evaluate.generate.generate`` over every prompt, as evaluation runs it, with cuDNN's attention on and off
    (each twice: the second run of a setting meets attention shapes the first one already planned)."""
    from runner.evaluate import generate as gen_mod

    recipe = gb.xsum_recipe([])
    gen_mod.generate(model, tokenizer, every[:8], gb.xsum_recipe(["generation.max_new_tokens=4"]))
    return [forced("generate()", len(every), cudnn,
                   lambda on: gen_mod.generate(model, tokenizer, every, recipe, cudnn_attention=on))
            for cudnn in (True, False, True, False)]


def rank_runs(model, tokenizer) -> list[dict]:
    """``runner.evaluate.rank.rank`` over the AG News rows (BENCH_RANK of them) as an evaluation meets them: the allocator's
    cache emptied and every batch a shape not seen before (each run cuts a few more characters off every prompt),
    cuDNN's attention on and off in turn; then cProfile over one more run."""
    import cProfile
    import io
    import pstats

    import torch

    from runner.evaluate import rank as rank_mod

    over, prompts = gb.rank_examples(tokenizer)
    recipe = gb.rank_recipe(over)
    rank_mod.rank(model, tokenizer, prompts[:8], recipe)
    rows = []
    for run, cudnn in enumerate((False, True, False, True, False, True)):
        texts = [p[:-(2 + 3 * run)] + p[-2:] for p in prompts]  # new widths, the same ending ("Topic:" stays)
        torch.cuda.empty_cache()
        rows.append(forced("rank(), new shapes", len(texts), cudnn,
                           lambda on, t=texts: rank_mod.rank(model, tokenizer, t, recipe, cudnn_attention=on)))
    texts = [p[:-40] + p[-2:] for p in prompts]
    torch.cuda.empty_cache()
    prof = cProfile.Profile()
    prof.enable()
    rank_mod.rank(model, tokenizer, texts, recipe)
    gb.sync()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumtime").print_stats(40)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rank_cprofile.txt").write_text(text.getvalue())
    print(text.getvalue()[:5000], flush=True)
    return rows


def main() -> None:
    import torch

    from runner.data import data as data_mod
    from runner.evaluate import backend
    from runner.evaluate import generate as gen_mod
    from runner.model import model as model_mod

    if not (gb.phi2.MODEL_DIR / "config.json").is_file():
        gb.phi2.cmd_make_model()
    base = gb.xsum_recipe([])
    gb.make_adapter(base)
    tokenizer = model_mod.load_tokenizer(base)
    every = list(data_mod.prepare(gb.xsum_recipe([f"data.train_samples={os.environ.get('PROBE_PROMPTS', 'null')}"]), tokenizer, roles=("train",))
                 .splits["train"]["prompt"])
    lengths = [len(ids) for ids in tokenizer(every)["input_ids"]]
    order = sorted(range(len(every)), key=lambda i: lengths[i])
    model = model_mod.load_trained(base, gb.ADAPTER)
    rows = full_runs(model, tokenizer, every) if os.environ.get("PROBE_FULL") else []
    rows += rank_runs(model, tokenizer) if os.environ.get("PROBE_RANK") else []
    tokenizer.padding_side = "left"
    recipe = gb.xsum_recipe([])
    with backend.model_for(backend.Choice("merged", max(BATCHES)), model) as net:
        for batch in BATCHES:
            mid = len(order) // 2
            idx = order[max(0, mid - batch // 2):][:batch]
            texts = [every[i] for i in idx]
            print(f"batch {batch}: prompt tokens {statistics.fmean(lengths[i] for i in idx):.0f} mean, "
                  f"{max(lengths[i] for i in idx)} max", flush=True)
            own = gen_mod.generation_config(recipe, tokenizer, "merged")
            variants = {
                "recipe (sampling, rep. penalty, stop, static cache)": own,
                "no stop string": own.__class__.from_dict({**own.to_dict(), "stop_strings": None}),
                "no repetition penalty": own.__class__.from_dict({**own.to_dict(), "repetition_penalty": 1.0}),
                "greedy": own.__class__.from_dict({**own.to_dict(), "do_sample": False, "top_p": 1.0,
                                                   "temperature": 1.0}),
                "greedy, no penalty, no stop": own.__class__.from_dict(
                    {**own.to_dict(), "do_sample": False, "top_p": 1.0, "temperature": 1.0,
                     "repetition_penalty": 1.0, "stop_strings": None}),
                "dynamic cache": own.__class__.from_dict({**own.to_dict(), "cache_implementation": None}),
            }
            for name, config in variants.items():
                if os.environ.get("PROBE_VARIANTS", "all") == "all" or name in os.environ["PROBE_VARIANTS"]:
                    rows.append(variant(name, net, tokenizer, texts, config))
            if os.environ.get("PROBE_NO_CUDNN"):
                torch.backends.cuda.enable_cudnn_sdp(False)
                rows.append(variant("recipe, cuDNN attention off", net, tokenizer, texts, own))
                rows.append(variant("recipe, cuDNN attention off (again)", net, tokenizer, texts, own))
                torch.backends.cuda.enable_cudnn_sdp(True)
            if batch == BATCHES[0] and not os.environ.get("PROBE_NO_PROFILE"):
                text = profile(net, tokenizer, texts, own)
                OUT.mkdir(parents=True, exist_ok=True)
                (OUT / "decode_profile.txt").write_text(text)
                print(text[:6000], flush=True)
        for impl in os.environ.get("PROBE_ATTN", "eager").split(","):
            if not impl:
                continue
            net.set_attn_implementation(impl)
            texts = [every[i] for i in order[len(order) // 2 - BATCHES[0] // 2:][:BATCHES[0]]]
            rows.append(variant(f"attention {impl}", net, tokenizer, texts,
                                gen_mod.generation_config(recipe, tokenizer, "merged")))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    (OUT / "decode_probe.json").write_text(json.dumps({"gpu": gpu, "rows": rows},
                                                      indent=1))
    for r in rows:
        if "batch" not in r:
            print(f"{r['variant']:55s} {r['prompts']} prompts {r['seconds']:6.2f} s  {r['prompts_per_s']:6.1f} p/s")
            continue
        print(f"{r['variant']:55s} batch {r['batch']:4d}  prefill {r['prefill_s']:6.2f} s  "
              f"step {r['step_ms']:6.1f} ms  peak {r['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
