#!/usr/bin/env python3
"""Tokenize once (runner.data.prepared_cache), measured on a CPU: 200,000 XSum-sized rows prepared through the
runner's own path (the study's prompt at max_length 512, GPT-2's BPE tokenizer, the same as Phi-2's), first into
an empty cache, then again from it. Each pass runs in a fresh process, for its own time and peak memory.

    python bench/prepare_bench.py [--rows 200000] [--work /tmp/prepare_bench]

The rows are the real XSum articles of ../shared/data/xsum (1,000), each repeated with a numbered first sentence so
that no two rows are the same. Prints a markdown table with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = next((p for p in (ROOT / ".shared-data", ROOT.parent / "shared" / "data", Path("/work/shared/data"))
             if (p / "xsum").is_dir()), ROOT.parent / "shared" / "data")
RECIPE = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


def make_rows(path: Path, rows: int) -> None:
    real = [json.loads(line) for line in (DATA / "xsum" / "sample.jsonl").read_text().splitlines()]
    with open(path, "w") as f:
        for i in range(rows):
            r = real[i % len(real)]
            f.write(json.dumps({"id": str(i), "document": f"Report {i}. {r['document']}",
                                "summary": r["summary"]}) + "\n")


def one(work: Path) -> dict:
    """One preparation in this process: seconds, peak memory, whether it came from the cache, the workers."""
    from transformers import AutoTokenizer

    from runner.cli import recipes
    from runner.common import cpu
    from runner.data import data, prepared_cache

    cpu.settle()
    recipe = recipes.load(RECIPE, [f"data.source={{train: {work / 'rows.jsonl'}}}", "data.splits.eval=null",
                                   "data.holdout.test=100", "data.eval_samples=null", "data.test_samples=null",
                                   "prompt.max_length=512", "training.eval_every=null"])
    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizers" / "gpt2")
    start = time.perf_counter()
    out = prepared_cache.prepared(recipe, tokenizer, ("train",), data.prepare, folder=work / "cache")
    seconds = time.perf_counter() - start
    train = out.splits["train"]
    return {"seconds": round(seconds, 2), "rows": len(train), "tokens": int(sum(train["n_tokens"])),
            "truncated": out.stats["train"]["truncated"], "cached": out.cached is not None,
            "workers": "-" if out.cached else cpu.data_workers(len(train)) or 1,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "worker_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prepare_bench"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.work)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    rows = args.work / "rows.jsonl"
    if not rows.is_file() or sum(1 for _ in open(rows)) != args.rows:
        make_rows(rows, args.rows)
    shutil.rmtree(args.work / "cache", ignore_errors=True)
    results = []
    for label in ("first (empty cache)", "second (cached)"):
        done = subprocess.run([sys.executable, __file__, "--one", "--work", str(args.work)], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        results.append((label, json.loads(done.stdout.strip().splitlines()[-1])))
    size = sum(p.stat().st_size for p in (args.work / "cache").rglob("*") if p.is_file()) / 1e9
    print(f"{args.rows:,} rows ({rows.stat().st_size / 1e9:.2f} GB of JSONL), {cpu_name()}, "
          f"{len(os.sched_getaffinity(0))} cores; cache entry {size:.2f} GB\n")
    print("| pass | seconds | peak RSS (main, largest worker) | processes | rows kept | tokens | truncated | "
          "from the cache |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in results:
        print(f"| {label} | {r['seconds']} | {r['peak_rss_gb']} GB, {r['worker_peak_rss_gb']} GB | {r['workers']} | "
              f"{r['rows']:,} | "
              f"{r['tokens']:,} | {r['truncated']:,} | {'yes' if r['cached'] else 'no'} |")
    first, second = results[0][1]["seconds"], results[1][1]["seconds"]
    print(f"\nsecond / first: {first / second:.1f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
