"""Did fine-tuning cost general ability? ``evaluation.retention``'s benchmarks run on the base model (the adapter
disabled) and on the adapter over the same items; the paired difference of their accuracy, its bootstrap 95% CI
and a plain verdict go into ``retention.json``, report.md's "General ability" section and ``runner compare``.

The base's choices are cached in ``.cache/retention/`` under a key made of the base model (its name, and for a local
folder its weight files' sizes and times), the quantization and model settings, the benchmark's settings and its
items: computed once per base model + benchmark + settings, whatever recipe or run asks again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from evaluators.base import Record
from evaluators.multiple_choice import MultipleChoice
from runner.common import safeio
from runner.common.markdown import table
from runner.common.stats import paired_bootstrap
from runner.evaluate import benchmark

CACHE_DIR = Path(".cache") / "retention"
FILE = "retention.json"
VERSION = 1  # of the cached files' content: a change of what they hold invalidates them all
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model")


def model_identity(model_section: dict) -> dict:
    """The base model as the cache tells it apart: its name and revision, and for a local folder the size and
    modification time of every weight, config and tokenizer file (a re-trained base is another model)."""
    name = model_section["name_or_path"]
    folder = Path(name).expanduser()
    files = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
                st = p.stat()
                files[p.name] = [st.st_size, st.st_mtime_ns]
    return {"name": name, "revision": model_section.get("revision"), "files": files}


def cache_key(recipe: dict, spec: dict, items: list[benchmark.Item] | None) -> str:
    """What decides the base's choices: the base model, how it is loaded, the benchmark's settings and items."""
    parts = {"model": model_identity(recipe["model"]),
             "loading": {k: v for k, v in recipe["model"].items() if k != "name_or_path"},
             "quantization": recipe["quantization"], "benchmark": {k: v for k, v in spec.items() if k != "name"},
             "items": hashlib.sha256(json.dumps([list(vars(it).values()) for it in items or []]).encode()).hexdigest(),
             "version": VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _score(model, tokenizer, recipe: dict, spec: dict, items):
    """Records of the model as it is now: the benchmark's items scored, or its lm-eval task run."""
    if spec["lm_eval"] is not None:
        return benchmark.lm_eval_records(model, tokenizer, spec)
    return benchmark.records(items, benchmark.chosen(model, tokenizer, recipe, spec, items))


def base_records(recipe: dict, spec: dict, items, model, tokenizer, cache_dir: Path) -> tuple[list, bool]:
    """(the base's records, whether they came from the cache). ``model``: the PeftModel, its adapter disabled here."""
    path = Path(cache_dir) / f"{cache_key(recipe, spec, items)}.json"
    if path.is_file():
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
            return [Record(**row) for row in rows], True
        except (json.JSONDecodeError, TypeError):
            pass  # a torn or foreign cache file is recomputed
    with model.disable_adapter():
        records = _score(model, tokenizer, recipe, spec, items)
    path.parent.mkdir(parents=True, exist_ok=True)
    safeio.write_json(path, [vars(r) for r in records], indent=None)
    return records, False


def verdict(name: str, paired: dict, n: int) -> str:
    """``MMLU −1.8 [−3.1, −0.5]: forgetting resolved`` (accuracy points, adapter − base, paired 95% CI)."""
    d = paired["difference"] * 100
    lo, hi = (v * 100 for v in paired["difference_ci95"])
    text = f"{name} {d:+.1f} [{lo:+.1f}, {hi:+.1f}]".replace("-", "\u2212")
    if hi < 0:
        return f"{text}: forgetting resolved"
    if lo > 0:
        return f"{text}: gain resolved"
    return f"{text}: within noise at n = {n}"


def load_all(recipe: dict) -> list[list[benchmark.Item] | None]:
    """Every benchmark's items (None for an lm-eval task): read before training, so that a file or hub dataset that
    cannot be read stops the run before it trains, not after."""
    return [benchmark.load(spec, i) if spec["lm_eval"] is None else None
            for i, spec in enumerate(recipe["evaluation"]["retention"])]


def run(recipe: dict, model, tokenizer, out_dir: Path, cache_dir: Path = CACHE_DIR,
        loaded: list | None = None) -> dict | None:
    """Every benchmark of evaluation.retention on the base and on the adapter; writes ``out_dir/retention.json``
    and returns what it holds (None without benchmarks). ``loaded``: the items load_all read already."""
    specs = recipe["evaluation"]["retention"]
    if not specs:
        return None
    evaluator = MultipleChoice(seed=recipe["seed"])
    loaded = loaded if loaded is not None else load_all(recipe)
    rows = []
    for spec, items in zip(specs, loaded, strict=True):
        start = time.time()
        base, cached = base_records(recipe, spec, items, model, tokenizer, cache_dir)
        adapter = _score(model, tokenizer, recipe, spec, items)
        by_index = {r.index: r for r in adapter}
        pairs = [(b, by_index[b.index]) for b in base if b.index in by_index]
        base_correct = evaluator.per_example([b for b, _ in pairs])["accuracy"]
        adapter_correct = evaluator.per_example([a for _, a in pairs])["accuracy"]
        paired = paired_bootstrap(base_correct, adapter_correct, recipe["seed"])
        row = {"name": spec["name"], "n": len(pairs), "base_cached": cached,
               "base": evaluator.evaluate([b for b, _ in pairs], out_dir),
               "adapter": evaluator.evaluate([a for _, a in pairs], out_dir),
               "paired": paired, "verdict": verdict(spec["name"], paired, len(pairs)),
               "seconds": round(time.time() - start, 2)}
        row["per_subject"] = _per_subject(pairs, evaluator, recipe["seed"])
        rows.append(row)
        print(f"general ability: {row['verdict']} (base {row['base']['accuracy']:.3f}"
              f"{', cached' if cached else ''}; adapter {row['adapter']['accuracy']:.3f})", flush=True)
    result = {"benchmarks": rows}
    safeio.write_json(Path(out_dir) / FILE, result)
    return result


def _per_subject(pairs: list, evaluator, seed: int) -> dict:
    """Subject -> the paired difference over that subject's items (where the items name subjects)."""
    subjects: dict[str, list[int]] = {}
    for j, (b, _) in enumerate(pairs):
        if b.group is not None:
            subjects.setdefault(b.group, []).append(j)
    if len(subjects) < 2:
        return {}
    base = evaluator.per_example([b for b, _ in pairs])["accuracy"]
    adapter = evaluator.per_example([a for _, a in pairs])["accuracy"]
    return {s: {"n": len(idx), "base": round(float(base[idx].mean()), 4),
                "adapter": round(float(adapter[idx].mean()), 4),
                **paired_bootstrap(base[np.array(idx)], adapter[np.array(idx)], seed)}
            for s, idx in sorted(subjects.items())}


def read(run_dir: Path) -> dict | None:
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _pct(value) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}"


def section(result: dict | None, subjects: int = 20) -> list[str]:
    """report.md's "General ability": per benchmark base and adapter accuracy, the paired difference and verdict;
    then the subjects (at most ``subjects`` per benchmark, the largest drops first)."""
    if not result or not result.get("benchmarks"):
        return []
    lines = ["## General ability", "",
             "Multiple-choice benchmarks (evaluation.retention) scored on the base model and on the adapter over the "
             "same items: accuracy in %, the difference adapter \u2212 base in points with its paired bootstrap 95% CI.",
             ""]
    rows = [[b["name"], b["n"], _pct(b["base"]["accuracy"]), _pct(b["adapter"]["accuracy"]), b["verdict"]]
            for b in result["benchmarks"]]
    lines += table(["benchmark", "items", "base", "adapter", "difference [95% CI]: verdict"], rows)
    for b in result["benchmarks"]:
        per = b.get("per_subject") or {}
        if not per:
            continue
        worst = sorted(per.items(), key=lambda kv: kv[1]["difference"])[:subjects]
        shown = f"the {subjects} largest drops" if len(per) > subjects else "all"
        lines += ["", f"{b['name']} by subject ({len(per)} subjects; {shown}):", ""]
        lines += table(["subject", "items", "base", "adapter", "difference [95% CI]"],
                       [[s, v["n"], _pct(v["base"]), _pct(v["adapter"]), verdict("", v, v["n"]).strip()]
                        for s, v in worst])
    return lines


def summary_lines(result: dict | None) -> list[str]:
    """One line per benchmark, as ``runner compare`` prints it."""
    return [f"general ability: {b['verdict']}" for b in (result or {}).get("benchmarks", [])]
