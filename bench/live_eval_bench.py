#!/usr/bin/env python3
"""What task metrics while training cost (training.task_metrics): the study's XSum recipe on the Phi-2-shaped model
(random weights, bench/bench.py make_model), trained through `runner train` twice: without any in-training
evaluation, and with a ROUGE evaluation of 200 eval prompts every 50 steps. The overhead is the ROUGE evaluations'
time (env.json's task_metrics.seconds) over the training steps' time, and, as a check, the wall-time difference of
the two runs; the target is <= 15% of the training time.

    python bench/live_eval_bench.py                  # on the device: the Phi-2 shape (bash bench/device_env.sh first)
    python bench/live_eval_bench.py --tiny           # CPU smoke test: the tiny model and tiny XSum data

Writes $OUT/live_eval.json and prints one RESULT line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT", "/tmp/bench_out"))


def _run(recipe: Path, overrides: list[str], out_dir: Path) -> dict:
    """One `runner train --no-eval` in a fresh process; its env.json, wall time and what it printed last."""
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "runner", "train", str(recipe), *overrides,
                           f"output_dir={out_dir}", "--no-eval"], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode != 0:
        sys.exit(f"runner train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    run = Path(next(line for line in done.stdout.splitlines() if line.startswith("done: "))[6:])
    return {"env": json.loads((run / "env.json").read_text()), "wall_seconds": round(wall, 2), "run": str(run)}


def settings(tiny: bool, steps: int, every: int, prompts: int) -> tuple[Path, list[str], list[str]]:
    """(recipe, overrides both runs share, those of the run with task metrics)."""
    if tiny:
        recipe = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
        common = [f"training.max_steps={steps}", "training.save_every=null", "training.save_every_minutes=null",
                  "training.report_to=none", "training.resume=never", f"data.eval_samples={prompts}"]
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        import bench  # the Phi-2-shaped model, the real XSum rows, the study's settings

        recipe = bench.RECIPE
        common = [o for o in bench.base_overrides(steps) if not o.startswith("data.splits.eval")]
        common += ["data.splits.eval=train", "data.holdout.eval=200", f"data.eval_samples={prompts}", "training.save_every_minutes=null"]
    live = [f"training.eval_every={every}", f"training.task_metrics={prompts}",
            "evaluation.evaluators=[{name: rouge}]"]
    return recipe, common + ["training.eval_every=null"], common + live


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU (a smoke test, not a measurement)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of each run (default 100; tiny 20)")
    parser.add_argument("--every", type=int, default=None, help="evaluate every N steps (default 50; tiny 10)")
    parser.add_argument("--prompts", type=int, default=None, help="eval prompts per evaluation (default 200; tiny 8)")
    args = parser.parse_args(argv)
    steps = args.steps or (20 if args.tiny else 100)
    every = args.every or (10 if args.tiny else 50)
    prompts = args.prompts or (8 if args.tiny else 200)
    recipe, plain, live = settings(args.tiny, steps, every, prompts)
    out_dir = OUT / "live_eval_runs"
    none = _run(recipe, plain, out_dir)
    rouge = _run(recipe, live, out_dir)
    spent = rouge["env"]["task_metrics"]["seconds"]
    evaluations = rouge["env"]["task_metrics"]["evaluations"]
    steps_seconds = rouge["env"]["train_seconds"] - spent  # the training steps (and eval loss passes) alone
    # Per `every` steps: one evaluation against `every` steps' training, as in a run of any length.
    per_eval = spent / max(evaluations, 1)
    per_step = none["env"]["train_seconds"] / steps
    row = {"tiny": args.tiny, "steps": steps, "every": every, "prompts": prompts, "evaluations": evaluations,
           "task_metrics_seconds": spent, "seconds_per_evaluation": round(per_eval, 2),
           "train_seconds_none": none["env"]["train_seconds"], "train_seconds_rouge": rouge["env"]["train_seconds"],
           "seconds_per_step_none": round(per_step, 4),
           "overhead_of_training": round(per_eval / (every * per_step), 4),
           "overhead_in_this_run": round(spent / max(steps_seconds, 1e-9), 4),
           "wall_difference_share": round((rouge["wall_seconds"] - none["wall_seconds"]) / none["wall_seconds"], 4),
           "backend": rouge["env"]["task_metrics"]["backend"], "device": rouge["env"].get("device"),
           "target": 0.15}
    row["within_target"] = row["overhead_of_training"] <= row["target"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "live_eval.json").write_text(json.dumps(row, indent=1))
    print("RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
