"""Evaluation: predictions (streamed to predictions.jsonl) -> the recipe's evaluators -> metrics.json."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from evaluators import BUILTINS
from evaluators.base import Record
from runner import data as data_mod
from runner import generate as generate_mod
from runner import recipe as recipe_mod


def build_evaluators(recipe: dict) -> list:
    built = []
    for i, spec in enumerate(recipe["evaluation"]["evaluators"]):
        params = {k: v for k, v in spec.items() if k != "name"}
        target = BUILTINS.get(spec["name"], spec["name"])
        if target in BUILTINS.values():
            module, _, cls_name = target.partition(":")
            cls = getattr(importlib.import_module(module), cls_name)
        else:
            cls = recipe_mod.import_evaluator(target, f"evaluation.evaluators[{i}].name")
        built.append((spec["name"], cls(seed=recipe["seed"], **params)))
    return built


def _read_done(path: Path) -> dict[int, dict]:
    """Predictions an interrupted evaluation already wrote (a torn last line is ignored)."""
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["index"]] = row
    return done


def evaluate(recipe: dict, model, tokenizer, out_dir: Path, examples=None) -> dict:
    """Generate for the evaluation split, score, and write predictions.jsonl, metrics.json and evaluator files."""
    role = recipe["evaluation"]["split"]
    if examples is None:
        examples = data_mod.prepare(recipe, tokenizer, roles=(role,)).splits[role]
    prompts, references = examples["prompt"], [c.strip() for c in examples["completion"]]
    ids = examples["id"]
    pred_path = out_dir / "predictions.jsonl"
    done = _read_done(pred_path)
    if done:
        print(f"resuming evaluation: {len(done)} of {len(prompts)} predictions already in {pred_path}", flush=True)
    if pred_path.exists():  # rewrite without any torn line, then append
        pred_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()), encoding="utf-8")

    start, produced = time.time(), 0

    def write(batch):
        nonlocal produced
        with open(pred_path, "a", encoding="utf-8") as f:
            for i, text in batch:
                row = {"index": i, "id": ids[i], "prompt": prompts[i], "reference": references[i], "prediction": text}
                done[i] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        produced += len(batch)
        rate = produced / max(time.time() - start, 1e-9)
        print(f"\rgenerating: {len(done)}/{len(prompts)} ({rate:.1f} examples/s)", end="", flush=True)

    generate_mod.generate(model, tokenizer, prompts, recipe, skip=set(done), on_batch=write)
    print(flush=True)
    records = [Record(index=i, prompt=r["prompt"], reference=r["reference"], prediction=r["prediction"], id=r["id"])
               for i, r in sorted(done.items())]
    metrics = {"split": role, "examples": len(records), "generation_seconds": round(time.time() - start, 2)}
    for name, evaluator in build_evaluators(recipe):
        metrics[name] = evaluator.evaluate(records, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def summary_line(metrics: dict) -> str:
    parts = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            for key, sub in value.items():
                if isinstance(sub, dict) and "f1" in sub:
                    parts.append(f"{key} {sub['f1']:.2f} [{sub['ci95'][0]:.2f}, {sub['ci95'][1]:.2f}]")
                elif isinstance(sub, (int, float)) and not isinstance(sub, bool) and key != "count":
                    parts.append(f"{name}.{key} {sub:.4g}")
    return f"{metrics['split']} ({metrics['examples']} examples): " + (", ".join(parts) or "no metrics")
