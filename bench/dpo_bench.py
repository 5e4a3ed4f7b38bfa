#!/usr/bin/env python3
"""DPO on a Phi-2-shaped model (random weights) under each speed profile, on one GPU, through the runner's own
path: tokens per second (the chosen and rejected sequences both counted, prompt included, as the model runs them)
and the peak reserved memory against `runner plan`'s prediction (runner.speed.memory with training.method dpo:
two sequences per pair and the frozen reference adapter); a peak off the plan by more than 15% is flagged.

The pairs are the real XSum rows: the article's own summary chosen, the next article's summary rejected (fluent
but unfaithful). Each profile trains in a fresh process (its own peak memory).

    python bench/dpo_bench.py                      # profiles none, low_memory, balanced, fast
    python bench/dpo_bench.py fast balanced        # some of them
    python bench/dpo_bench.py --tiny               # CPU smoke test: a tiny Phi shape, 1 + 2 steps per profile

Needs the random Phi-2-shaped model (`python bench/bench.py make_model`, into $BENCH_MODEL) and the XSum rows
(../shared/data or .shared-data/, as bench/bench.py finds them). Writes $OUT/dpo_results.jsonl and
$OUT/dpo_table.md, and prints the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

if "--tiny" in sys.argv:  # before bench.py reads it
    os.environ["BENCH_TINY"] = "1"
    os.environ.setdefault("BENCH_MODEL", "/tmp/phi2tiny")  # not the full-size model's folder

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (bench/bench.py: the model folder, the data, the base overrides)

PROFILES = ("none", "low_memory", "balanced", "fast")
WARM, MEASURED = (1, 2) if bench.TINY else (2, 8)
TOLERANCE = 0.15


def pairs_file() -> Path:
    """XSum rows as preference pairs: document, its summary (chosen), the next row's summary (rejected)."""
    rows = [json.loads(line) for line in (bench.DATA / "xsum" / "sample.jsonl").read_text().splitlines() if line]
    path = bench.OUT / "dpo_pairs.jsonl"
    bench.OUT.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            other = rows[(i + 1) % len(rows)]["summary"]
            if other.strip() != row["summary"].strip():
                f.write(json.dumps({"id": row["id"], "document": row["document"], "summary": row["summary"],
                                    "rejected": other}) + "\n")
    return path


def overrides(profile: str, data: Path) -> list[str]:
    # base_overrides evaluates the train split, whose rows are pairs under dpo: the same file as the test split
    return [*bench.base_overrides(WARM + MEASURED), f"data.source={data}", "data.splits.test=train",
            "evaluation.split=test", "training.method=dpo", "prompt.chosen=' {summary}'", "prompt.rejected=' {rejected}'",
            f"training.profile={profile}",
            # the CPU smoke test: a few short pairs a step (the profiles still re-split them)
            *(["training.micro_batch_size=2", "training.gradient_accumulation_steps=1", "data.train_samples=16"]
              if bench.TINY else [])]


class Counter:
    """Wraps the DPO collator: the tokens of every micro-batch's sequences (prompt + chosen, prompt + rejected)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, examples):
        batch = self.inner(examples)
        real = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
        self.calls.append((real, batch["input_ids"].numel()))
        return batch


def run_one(profile: str) -> dict:
    import torch

    from runner.cli import recipes
    from runner.train import train as train_mod

    recipe = recipes.load(bench.RECIPE, overrides(profile, pairs_file()))
    cuda = torch.cuda.is_available()
    stamps: dict[int, float] = {}
    held: dict = {}

    def instrument(trainer):
        held["counter"] = trainer.data_collator = Counter(trainer.data_collator)
        held["trainer"] = trainer
        trainer.add_callback(bench.step_timer(stamps))

    # the profile's speed as train would resolve it, with the plan's prediction for every profile (none included)
    speed = bench.forced_speed(recipe, {})
    run_dir, _, _, _ = train_mod.train(recipe, instrument=instrument, speed=speed)
    speed = json.loads((run_dir / "env.json").read_text())["speed"]
    ga = speed["gradient_accumulation_steps"]
    calls = held["counter"].calls[WARM * ga:(WARM + MEASURED) * ga]
    seconds = stamps[WARM + MEASURED] - stamps[WARM]
    real, padded = sum(c[0] for c in calls), sum(c[1] for c in calls)
    peak = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    plan = speed["predicted_gb"]
    log = held["trainer"].state.log_history
    return dict(profile=profile, micro_batch=speed["micro_batch_size"], accumulation=ga,
                checkpointing=speed["gradient_checkpointing"], compiled=speed.get("compiled"),
                sec_per_step=seconds / MEASURED, tok_per_s=real / seconds, padded_tok_per_s=padded / seconds,
                pairs_per_s=speed["micro_batch_size"] * ga * MEASURED / seconds,
                peak_reserved_gib=peak, plan_gib=plan,
                within_15pct=None if peak is None or plan is None else abs(peak / plan - 1) <= TOLERANCE,
                reward_accuracy_last=next((h["rewards/accuracies"] for h in reversed(log)
                                           if "rewards/accuracies" in h), None),
                tiny=bench.TINY)


def table(rows: list[dict]) -> str:
    head = ("| profile | micro-batch x acc. | ckpt | s/step | tokens/s (chosen + rejected) | pairs/s | "
            "peak reserved GiB | plan GiB | within 15% |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['profile']} | {r['micro_batch']} x {r['accumulation']} | {r['checkpointing']} | "
                     f"{r['sec_per_step']:.2f} | {r['tok_per_s']:,.0f} | {r['pairs_per_s']:.2f} | "
                     f"{_num(r['peak_reserved_gib'])} | {_num(r['plan_gib'])} | {r['within_15pct']} |")
    return "\n".join(lines)


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        row = run_one(argv[1])
        with open(bench.OUT / "dpo_results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    profiles = [a for a in argv if a != "--tiny"] or list(PROFILES)
    if bench.TINY and not (bench.MODEL_DIR / "config.json").is_file():
        subprocess.run([sys.executable, str(Path(bench.__file__)), "make_model"], check=True)
    results = bench.OUT / "dpo_results.jsonl"
    results.unlink(missing_ok=True)
    failed = []
    for profile in profiles:  # a fresh process each: its own peak memory
        rc = subprocess.run([sys.executable, __file__, "--one", profile, *(["--tiny"] if bench.TINY else [])]).returncode
        if rc:
            failed.append(profile)
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    text = table(rows)
    (bench.OUT / "dpo_table.md").write_text(text + "\n")
    print(text)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
