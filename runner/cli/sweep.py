"""``runner sweep RECIPE key=v1,v2 ... [--seeds N]``: a grid of settings x training seeds, each cell a normal run.

Every cell is trained, evaluated and reported by ``runner train``'s own command, in this process, into its own
output folder ``<output_dir>/<name>/sweeps/<sweep>/<cell>/`` (cell_name: ``r-8_learning_rate-0.001_seed-42``), so ``training.resume: auto`` and the run folder
layout work as for any run. A cell whose finished run (adapter, metrics.json, report.md) was made from exactly the
cell's resolved recipe is not trained again: repeating the command resumes an interrupted sweep, or just rewrites
the summary. All cells pin ``data.seed`` to the recipe's sample seed, so every training seed sees the same train,
eval and test examples and the seeds differ only in training randomness (LoRA init, data order, dropout, sampling).

Before anything trains, every cell's recipe is validated and checked against the model's config, and the plan
(profile, micro-batch, predicted peak GPU memory and training time) of every setting is printed.

The summary (``sweep.md``, ``sweep.json``, ``sweep.png``): one row per setting with the mean over seeds of each
metric, the spread across seeds, the test-example uncertainty, training time and peak memory; then every setting
against the best one on the primary metric, with the two sources of uncertainty kept apart (runner.common.stats): Welch's
t-test over seeds and the paired bootstrap over the shared test examples. A difference is called real only when it
exceeds both.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runner.common import stats
from runner.common.errors import RecipeError
from runner.common.stats import bootstrap_ci, paired_bootstrap
from runner.evaluate.metrics import headline, lower_is_better
from runner.recipe import recipe as recipe_mod
from runner.store import runs

PRIMARY = ("rouge.rougeL", "classification.accuracy", "multilabel.exact_match", "loss.loss")


# ---------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """``8,16`` -> ["8", "16"]; commas inside [...], {...} or quotes belong to one value
    (``[q_proj,v_proj],all-linear`` is two values)."""
    parts, current, depth, quote = [], "", 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    return [*parts, current.strip()]


def parse_grid(overrides: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(axes [(key, [value text, ...])], fixed overrides): an override with several comma-separated values is an
    axis of the grid; one with a single value applies to every cell."""
    axes, fixed, given = [], [], {}  # given: key -> "an axis" / "a fixed override", as first given
    for text in overrides:
        if "=" not in text:
            raise RecipeError(text, "an override must look like key.path=value", "an axis: key.path=v1,v2")
        key, _, value = text.partition("=")
        key = key.strip()
        values = split_values(value)
        kind = "an axis" if len(values) > 1 else "a fixed override"
        if key in given:  # one of the two would be dropped silently: the last one given wins in a recipe
            raise RecipeError(key, f"is given twice: as {given[key]}, then as {kind}",
                              "give each key once: key=v1,v2,... to sweep it, key=value to fix it")
        given[key] = kind
        if len(values) == 1:
            fixed.append(text)
            continue
        if key == "seed":
            raise RecipeError("seed", "is swept with --seeds N, not as an axis", "e.g. runner sweep R lora.r=8,16 --seeds 3")
        if "" in values or len(set(values)) < len(values):
            raise RecipeError(key, f"has an empty or repeated value in {value!r}", "list each value once: key=v1,v2")
        axes.append((key, values))
    return axes, fixed


def check_name(name: str | None) -> None:
    """``--name`` is one folder under ``<output_dir>/<name>/sweeps/``, spelled as a recipe's ``name`` must be
    (the schema's pattern): no ``..``, no ``/``, no absolute path that would put the sweep elsewhere."""
    pattern = recipe_mod.schema()["properties"]["name"]["pattern"]
    if name is not None and not re.fullmatch(pattern, name):
        raise RecipeError("--name", f"{name[:60]!r} is not a folder name", "one name of letters, digits, '.', '_' "
                          "and '-', starting with a letter or digit, e.g. --name lora-rank")


@dataclass
class Cell:
    setting: tuple[tuple[str, str], ...]  # (key, value text) per axis
    seed: int
    overrides: list[str]
    recipe: dict

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.setting) or "(recipe as written)"


def _slug(text: str, limit: int = 90) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
    if len(slug) > limit:
        slug = slug[:limit - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return slug


def cell_names(grid: list[tuple[tuple, int]]) -> list[str]:
    """A folder name per (setting, seed): each axis's last key part and value, then the seed
    (``r-8_learning_rate-0.001_seed-42``), in letters, digits, '.', '_' and '-' only (no '=' for a shell or a path to
    trip on). A long value is cut (with a hash of it); two cells that would come out the same get a hash of their
    exact setting each."""
    names = ["_".join([*(f"{k.rsplit('.', 1)[-1]}-{_slug(v, 24) or 'x'}" for k, v in setting), f"seed-{seed}"])
             for setting, seed in grid]
    return [name if names.count(name) == 1 else f"{name}-{hashlib.sha1(repr(cell).encode()).hexdigest()[:8]}"
            for name, cell in zip(names, grid, strict=True)]


def sweep_folder(base: dict, axes, fixed, seeds: list[int], name: str | None) -> Path:
    """``<output_dir>/<name>/sweeps/<id>``: the same command finds the same folder again."""
    if name is None:
        spec = json.dumps({"axes": axes, "fixed": fixed, "seeds": seeds}, sort_keys=True)
        readable = "_".join(k.rsplit(".", 1)[-1] for k, _ in axes) or "seeds"
        name = _slug(f"{readable}_{len(seeds)}seeds", 60) + "-" + hashlib.sha1(spec.encode()).hexdigest()[:8]
    return Path(base["output_dir"]) / base["name"] / "sweeps" / name


def _check_local(recipe: dict) -> None:
    """What `runner validate` checks beyond the schema: the local files and folders a cell names, and the local
    data's columns (a swept data.source or model path is found missing before any cell trains)."""
    from runner.data import data
    from runner.model import model

    model.check_local(recipe)
    data.check_files(recipe)


def cells(recipe_path, overrides: list[str], seeds: int, name: str | None = None) -> tuple[Path, list[Cell], list, list]:
    """(sweep folder, every cell with its resolved recipe, the axes, the fixed overrides). Any cell's recipe mistake
    is raised here, before anything trains, naming the cell."""
    axes, fixed = parse_grid(overrides)
    check_name(name)
    if seeds < 1:
        raise RecipeError("--seeds", f"{seeds} is out of range", "must be >= 1")
    if not axes and seeds < 2:
        raise RecipeError("sweep", "nothing to sweep", "give key.path=v1,v2,... and/or --seeds N with N >= 2")
    base = recipe_mod.load(recipe_path, fixed)
    seed_list = [base["seed"] + i for i in range(seeds)]
    data_seed = base["data"]["seed"] if base["data"]["seed"] is not None else base["seed"]
    folder = sweep_folder(base, axes, fixed, seed_list, name)
    out = []
    grid = [(tuple(zip((k for k, _ in axes), values, strict=True)), seed)
            for values in itertools.product(*(vals for _, vals in axes)) for seed in seed_list]
    for (setting, seed), cell_name in zip(grid, cell_names(grid), strict=True):
        cell_overrides = [*fixed, *(f"{k}={v}" for k, v in setting), f"seed={seed}", f"data.seed={data_seed}",
                          f"output_dir={folder / cell_name}"]
        cell = Cell(setting, seed, cell_overrides, {})
        try:
            cell.recipe = recipe_mod.load(recipe_path, cell_overrides)
            _check_local(cell.recipe)
        except RecipeError as exc:
            raise RecipeError(exc.key_path, f"{exc.problem} (in the cell {cell.label})", exc.hint) from None
        out.append(cell)
    return folder, out, axes, fixed


def finished_run(cell: Cell) -> Path | None:
    """The cell's newest run that finished (adapter, metrics.json, report.md) from exactly its resolved recipe."""
    root = Path(cell.recipe["output_dir"]) / cell.recipe["name"]
    if not root.is_dir():
        return None
    for run_dir in sorted((p for p in root.iterdir() if p.is_dir()), reverse=True):
        done = all((run_dir / f).is_file() for f in ("adapter/adapter_config.json", "metrics.json", "report.md",
                                                       "recipe.yaml"))
        if done and runs.saved_recipe(run_dir) == cell.recipe:
            return run_dir
    return None


def check_metric(metric: str | None, grid: dict[tuple, list[Cell]]) -> None:
    """``--metric`` against the metrics every setting's evaluators declare, before anything trains; a setting with
    a user's evaluator that declares none is checked on its finished runs (summarize)."""
    from runner.evaluate import evaluate as evaluate_mod

    if metric is None:
        return
    for group in grid.values():
        names = evaluate_mod.metric_names(group[0].recipe)
        if names is not None and metric not in names:
            raise _unknown_metric(metric, names)


def _unknown_metric(metric: str, names: list[str]) -> RecipeError:
    return RecipeError("--metric", f"{metric!r} is not a metric of these runs", f"one of: {', '.join(names)}")


# ---------------------------------------------------------------- plan and run


def settings(all_cells: list[Cell]) -> dict[tuple, list[Cell]]:
    out: dict[tuple, list[Cell]] = {}
    for cell in all_cells:
        out.setdefault(cell.setting, []).append(cell)
    return out


def plan_setting(recipe: dict, card_gb: float | None, card: tuple[str, str] | None) -> dict:
    """Config-only checks and the plan of one setting: the profile's choice, predicted peak memory and time (on
    ``card``; None: no GPU here, no time predicted)."""
    from runner.model import model as model_mod
    from runner.speed import memory, profiles, throughput

    meta = model_mod.check(recipe)
    info = memory.model_info(recipe, meta.config)
    speed = profiles.resolve(recipe, meta.config, card_gb, detect=False, info=info)
    predicted = speed.predicted_gb or memory.estimate(recipe, meta.config, speed, info).reserved_gb
    seconds = throughput.predict_seconds(recipe, card[0], speed.profile, info["total"]) if card else None
    return {"profile": speed.profile, "micro_batch": f"{speed.micro_batch_size} x {speed.gradient_accumulation_steps}",
            "checkpointing": speed.gradient_checkpointing, "peak_reserved_gb": round(predicted, 2),
            "card": throughput.CARDS[card[0]]["name"] if card else None, "card_why": card[1] if card else None,
            "train_seconds": None if seconds is None else round(seconds, 1)}


def plan_lines(plans: dict[tuple, dict], grid: dict[tuple, list[Cell]]) -> list[str]:
    from runner.speed import throughput

    first = next(iter(plans.values()))
    timed = first["card"] is not None
    lines = [f"plan per setting (peak GPU memory from the config; time on {first['card']}, {first['card_why']}):"
             if timed else f"plan per setting (peak GPU memory from the config; {throughput.NOT_PREDICTED}):"]
    for setting, p in plans.items():
        label = grid[setting][0].label
        lines.append(f"  {label}: profile {p['profile']}, micro-batch {p['micro_batch']}, "
                     f"{'checkpointing' if p['checkpointing'] else 'no checkpointing'}, predicted peak "
                     f"{p['peak_reserved_gb']:.2f} GiB"
                     + (f", training {throughput.duration(p['train_seconds'])} per seed" if timed else ""))
    return lines


def run_cell(recipe_path, cell: Cell) -> Path:
    """Train, evaluate and report the cell with `runner train`'s own code (runner.cli.pipeline), in this process (under
    a launcher, every rank takes part and rank 0 writes the records, as for `runner train`)."""
    # A fresh recipe, as `runner train` would load it: the cell's own stays as planned, for comparing with its run.
    from runner.cli import pipeline
    from runner.common import dist
    pipeline.train_evaluate_report(recipe_mod.load(recipe_path, cell.overrides), recipe_path)
    dist.barrier()  # rank 0 writes the report after the other ranks are done
    gc.collect()  # the cell's model and trainer are garbage now: free them before the next cell loads its own
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    run_dir = dist.broadcast(finished_run(cell) if dist.world().main else None)
    if run_dir is None:
        raise RuntimeError(f"the cell {cell.label}, seed {cell.seed} trained but left no finished run folder")
    return run_dir


# ---------------------------------------------------------------- the summary


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def per_example_scores(recipe: dict, run_dir: Path) -> tuple[list, dict[str, np.ndarray]]:
    """(the evaluated examples as (index, reference), {metric: per-example scores}) of one run."""
    from runner.evaluate import evaluate as evaluate_mod

    records = evaluate_mod.read_records(run_dir / "predictions.jsonl")
    scores = {}
    for name, evaluator in evaluate_mod.build_evaluators(recipe):
        if hasattr(evaluator, "per_example") and records:
            for key, values in evaluator.per_example(records).items():
                scores[f"{name}.{key}"] = np.asarray(values, dtype=float)
    return [(r.index, r.reference) for r in records], scores


def summarize(folder: Path, grid: dict[tuple, list[Cell]], run_dirs: dict[int, Path], plans: dict, primary: str | None,
              axes: list, fixed: list[str]) -> dict:
    first_cell = next(iter(grid.values()))[0]
    seed = first_cell.recipe["seed"]
    rows, examples, per_example = [], None, {}
    same_examples = True
    for setting, setting_cells in grid.items():
        runs, values, cis, scores = [], {}, {}, {}
        for cell in setting_cells:
            run_dir = run_dirs[id(cell)]
            metrics, env = _json(run_dir / "metrics.json"), _json(run_dir / "env.json")
            flat = headline(metrics)
            keys, run_scores = per_example_scores(cell.recipe, run_dir)
            if examples is None:
                examples = keys
            same_examples &= keys == examples
            for metric, row in flat.items():
                values.setdefault(metric, []).append(row["value"])
                cis.setdefault(metric, []).append(stats.half_width(row["ci95"]))
            for metric, arr in run_scores.items():
                scores.setdefault(metric, []).append(arr)
            runs.append({"seed": cell.seed, "run": str(run_dir), "metrics": {m: r["value"] for m, r in flat.items()},
                         "train_seconds": env.get("train_seconds"), "peak_reserved_gb": env.get("peak_reserved_gb")})
        summary = {}
        for metric, vals in values.items():
            entry = stats.seed_spread(vals)
            if metric in scores and len({len(a) for a in scores[metric]}) == 1:
                # test-example uncertainty of the seed-averaged score: bootstrap over the shared examples
                averaged = np.mean(scores[metric], axis=0)
                low, high = bootstrap_ci(averaged, seed)
                entry["test_ci95_half"] = (high - low) / 2
            else:  # no per-example scores: the runs' own bootstrap intervals, averaged
                known = [h for h in cis[metric] if h is not None]
                entry["test_ci95_half"] = float(np.mean(known)) if known else None
            entry["values"] = vals
            summary[metric] = entry
        times = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
        peaks = [r["peak_reserved_gb"] for r in runs if r["peak_reserved_gb"] is not None]
        per_example[setting] = {m: np.mean(arrs, axis=0) for m, arrs in scores.items()
                                if len({len(a) for a in arrs}) == 1}
        rows.append({"setting": dict(setting), "label": setting_cells[0].label, "runs": runs, "metrics": summary,
                     "train_seconds": stats.seed_spread(times) if times else None,
                     "peak_reserved_gb": max(peaks) if peaks else None, "plan": plans.get(setting)})
    metric_names = list(rows[0]["metrics"])
    if primary is None:
        primary = next((m for m in PRIMARY if m in metric_names), metric_names[0] if metric_names else None)
    elif primary not in metric_names:  # a user's evaluator that declares no metrics: known only now
        raise _unknown_metric(primary, metric_names)
    out = {"recipe": first_cell.recipe["name"], "sweep": str(folder), "axes": [k for k, _ in axes], "fixed": fixed,
           "seeds": [c.seed for c in next(iter(grid.values()))], "primary_metric": primary,
           "examples": len(examples or []), "same_examples": same_examples, "settings": rows, "comparisons": []}
    if primary is None:
        return out
    lower = lower_is_better(primary)
    pick = min if lower else max
    best_i = pick(range(len(rows)), key=lambda i: rows[i]["metrics"][primary]["mean"])
    out["best"] = rows[best_i]["label"]
    best_setting = list(grid)[best_i]
    for i, (setting, row) in enumerate(zip(grid, rows, strict=True)):
        if i == best_i:
            continue
        seeds_test = stats.welch(rows[best_i]["metrics"][primary]["values"], row["metrics"][primary]["values"])
        paired = None
        if same_examples and primary in per_example[setting] and primary in per_example[best_setting]:
            paired = paired_bootstrap(per_example[best_setting][primary], per_example[setting][primary], seed)
        beyond_seed = stats.excludes_zero(seeds_test["ci95"]) if seeds_test else None
        beyond_test = stats.excludes_zero(paired["difference_ci95"]) if paired else None
        out["comparisons"].append({
            "setting": row["label"], "against": out["best"], "metric": primary,
            "difference": row["metrics"][primary]["mean"] - rows[best_i]["metrics"][primary]["mean"],
            "seeds": seeds_test, "test_examples": paired, "beyond_seed_noise": beyond_seed,
            "beyond_test_noise": beyond_test, "real": bool(beyond_seed and beyond_test)})
    baselines = _json(Path(run_dirs[id(first_cell)]) / "baselines.json")
    out["baselines"] = {name: headline(b["metrics"]).get(primary, {}).get("value")
                        for name, b in baselines.get("baselines", {}).items()}
    return out


# ---------------------------------------------------------------- files


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _cell(entry: dict) -> str:
    text = _fmt(entry["mean"])
    if entry["sd"] is not None:
        text += f" ± {_fmt(entry['sd'], 2)}"
    if entry.get("test_ci95_half") is not None:
        text += f" (±{_fmt(entry['test_ci95_half'], 2)})"
    return text


def _verdict(c: dict) -> str:
    if c["real"]:
        return "**yes**"
    reasons = []
    if c["beyond_seed_noise"] is None:
        reasons.append("seed noise unknown (1 seed)")
    elif not c["beyond_seed_noise"]:
        reasons.append("within seed noise")
    if c["beyond_test_noise"] is None:
        reasons.append("no paired test (examples differ)")
    elif not c["beyond_test_noise"]:
        reasons.append("within test-example noise")
    return "no: " + ", ".join(reasons)


def _ci(ci: list | None) -> str:
    return "–" if not ci else f"[{ci[0]:+.4g}, {ci[1]:+.4g}]"


def markdown(summary: dict) -> str:
    from runner.speed import throughput

    rows = summary["settings"]
    metrics = list(rows[0]["metrics"]) if rows else []
    n_seeds = len(summary["seeds"])
    lines = [f"# Sweep: {summary['recipe']}", "",
             f"Folder `{summary['sweep']}`; axes {', '.join(summary['axes']) or '(none)'}; seeds "
             f"{', '.join(map(str, summary['seeds']))}; {summary['examples']} test examples, the same for every cell"
             + ("" if summary["same_examples"] else " (NOT the same: paired tests skipped)") + ".", ""]
    if summary["fixed"]:
        lines += ["Fixed overrides: " + " ".join(f"`{o}`" for o in summary["fixed"]), ""]
    header = ["setting", *metrics, "train time (s)", "peak GPU GiB (measured / predicted)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        time = row["train_seconds"]
        time_text = "–" if not time else _fmt(time["mean"], 3) + (f" ± {_fmt(time['sd'], 2)}" if time["sd"] else "")
        plan = row["plan"] or {}
        memory = f"{_fmt(row['peak_reserved_gb'], 3)} / {_fmt(plan.get('peak_reserved_gb'), 3)}"
        lines.append("| " + " | ".join([row["label"], *(_cell(row["metrics"][m]) for m in metrics), time_text,
                                        memory]) + " |")
    lines += ["", f"Each metric: mean over the {n_seeds} seed(s) ± the standard deviation across seeds (training "
              "randomness) (± the 95% bootstrap half-width over test examples of the seed-averaged score). Peak GPU "
              "memory is torch's peak reserved (– on a CPU); predicted by `runner plan` from the config."]
    if rows and rows[0]["plan"] and rows[0]["plan"]["card"]:  # no card: no GPU, no time predicted
        plan = rows[0]["plan"]
        lines += ["", "Predicted training time per seed on " + plan["card"] + f" ({plan['card_why']}): "
                  + "; ".join(f"{r['label']} {throughput.duration((r['plan'] or {}).get('train_seconds'))}"
                              for r in rows) + "."]
    primary = summary["primary_metric"]
    if summary["comparisons"]:
        lines += ["", f"## Against the best setting on {primary}: {summary['best']}", "",
                  "| setting | difference | seeds: Welch 95% CI | test examples: paired bootstrap 95% CI | "
                  "beyond both? |", "|---|---|---|---|---|"]
        for c in summary["comparisons"]:
            seeds_ci = _ci(c["seeds"]["ci95"]) if c["seeds"] else "–"
            test_ci = _ci(c["test_examples"]["difference_ci95"]) if c["test_examples"] else "–"
            lines.append(f"| {c['setting']} | {c['difference']:+.4g} | {seeds_ci} | {test_ci} | {_verdict(c)} |")
        lines += ["", "A difference is real when it exceeds both sources of uncertainty: the seed interval (Welch's "
                  "t-test over the per-seed scores: would retraining with other seeds give it again?) and the "
                  "test-example interval (paired bootstrap of the seed-averaged per-example scores over the shared "
                  "examples: would other test examples give it again?). With 2 seeds the seed interval is wide "
                  "(t with 1-2 degrees of freedom): add seeds to narrow it."]
    if primary and rows:
        half = rows[0]["metrics"][primary].get("test_ci95_half")
        if half:
            smallest = stats.smallest_difference([0.0, 2 * half])
            unit = stats.point(primary)
            needed = stats.examples_for(unit, [0.0, 2 * half], summary["examples"]) if unit else None
            lines += ["", f"How many examples: with {summary['examples']} test examples the smallest difference in "
                      f"{primary} resolvable at 95% (two systems scored separately) is about {smallest:.3g}"
                      + (f"; resolving {unit:g} would need about {needed:,} examples." if needed else ".")]
    if summary.get("baselines"):
        lines += ["", f"Trivial baselines on the same examples ({primary}): "
                  + ", ".join(f"{name} {_fmt(v)}" for name, v in summary["baselines"].items()) + "."]
    if rows:
        lines += ["", "![sweep](sweep.png)", "", "## Runs", "", "| setting | seed | " + primary + " | run |",
                  "|---|---|---|---|"]
        for row in rows:
            for run in row["runs"]:
                lines.append(f"| {row['label']} | {run['seed']} | {_fmt(run['metrics'].get(primary))} | "
                             f"`{run['run']}` |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path | None:
    """The primary metric per setting: each seed's score, the mean ± seed sd (thick) and ± the test-example 95%
    half-width (thin), with the trivial baselines as dashed lines."""
    primary, rows = summary["primary_metric"], summary["settings"]
    if primary is None or not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2.5), 4.4))
    for x, row in enumerate(rows):
        entry = row["metrics"][primary]
        ax.scatter([x - 0.12] * len(entry["values"]), entry["values"], color="#999999", s=16, zorder=3,
                   label="one seed" if x == 0 else None)
        if entry.get("test_ci95_half") is not None:
            ax.errorbar(x + 0.08, entry["mean"], yerr=entry["test_ci95_half"], color="#c03030", capsize=5, lw=1,
                        label="± test examples (95%)" if x == 0 else None)
        ax.errorbar(x, entry["mean"], yerr=entry["sd"] or 0, fmt="o", color="#4878a8", lw=4, capsize=0, zorder=4,
                    label="mean ± seed sd" if x == 0 else None)
    colors = ["#6a9a3a", "#b07a2a", "#7a4ab0", "#333333"]
    for (name, value), color in zip(summary.get("baselines", {}).items(), itertools.cycle(colors)):
        if value is not None:
            ax.axhline(value, ls="--", lw=1, color=color, label=f"baseline: {name}")
    labels = ["\n".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r["setting"].items()) or r["label"] for r in rows]
    ax.set_xticks(range(len(rows)), labels=labels, fontsize=8)
    ax.set_ylabel(primary)
    ax.set_title(f"{summary['recipe']}: {len(summary['seeds'])} seed(s) per setting, {summary['examples']} examples",
                 fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(summary: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    plot(summary, folder / "sweep.png")
    (folder / "sweep.md").write_text(markdown(summary), encoding="utf-8")
    (folder / "sweep.json").write_text(json.dumps(summary, indent=2, default=_plain), encoding="utf-8")
    return folder / "sweep.md"


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# ---------------------------------------------------------------- the command


def sweep(recipe_path, overrides: list[str], seeds: int = 1, name: str | None = None, metric: str | None = None,
          card_name: str | None = None, card_gb: float | None = None, dry_run: bool = False) -> Path | None:
    from runner.common import dist
    from runner.speed import throughput

    folder, all_cells, axes, fixed = cells(recipe_path, overrides, seeds, name)
    main = dist.init().main  # under a launcher every rank trains each cell; rank 0 alone decides and writes
    grid = settings(all_cells)
    check_metric(metric, grid)
    card = throughput.find_card(card_name, throughput.gpu_name())
    if card_gb is None and card_name is not None:
        card_gb = throughput.CARDS[card[0]]["memory_gb"]
    elif card_gb is None:
        from runner.speed import profiles

        card_gb = profiles.gpu_memory_gb()
    plans = {}
    for setting, group in grid.items():
        try:
            plans[setting] = plan_setting(group[0].recipe, card_gb, card)
        except RecipeError as exc:  # the model's config rejects this setting (or the hub is out of reach): say which
            raise type(exc)(exc.key_path, f"{exc.problem} (in the cell {group[0].label})", exc.hint) from None
    if main:
        print(f"sweep folder: {folder}\n{len(grid)} setting(s) x {seeds} seed(s) = {len(all_cells)} cells", flush=True)
        print("\n".join(plan_lines(plans, grid)), flush=True)
    if dry_run:
        return None
    run_dirs = {}
    for i, cell in enumerate(all_cells, 1):
        where = f"cell {i}/{len(all_cells)} [{cell.label}, seed={cell.seed}]"
        done = dist.broadcast(finished_run(cell) if main else None)
        if main:
            print(f"{where}: {'training' if done is None else f'finished already: {done}'}", flush=True)
        if done is not None:
            run_dirs[id(cell)] = done
            continue
        run_dirs[id(cell)] = run_cell(recipe_path, cell)
    if not main:
        return None
    summary = summarize(folder, grid, run_dirs, plans, metric, axes, fixed)
    path = write(summary, folder)
    for line in summary_lines(summary):
        print(line)
    return path


def summary_lines(summary: dict) -> list[str]:
    primary = summary["primary_metric"]
    out = []
    for row in summary["settings"]:
        if primary:
            out.append(f"{row['label']}: {primary} {_cell(row['metrics'][primary])}")
    for c in summary["comparisons"]:
        out.append(f"{c['setting']} vs best ({c['against']}): {c['difference']:+.4g}, real: {_verdict(c)}")
    return out

