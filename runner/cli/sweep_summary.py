"""``runner sweep``'s summary of its finished cells: ``sweep.json``, ``sweep.md``, ``sweep.png`` and the lines it
prints.

One row per setting with the mean over seeds of each metric, the spread across seeds, the test-example
uncertainty, training time and peak memory; then every setting against the one with the best mean on the primary
metric, with the two sources of uncertainty kept apart (runner.common.stats): Welch's t-test over seeds and the
paired bootstrap over the shared test examples. A difference is called real only when it exceeds both, and a
setting is named the best only when it beats every other one for real and its runs are not degenerate.

Which way a metric is better, its scale and the primary metric (the first evaluator's headline) come from the
evaluators' declarations (runner.evaluate.metrics), never from a metric's name. A run is degenerate when its
predictions are all the same or its primary metric is no better than a trivial baseline's
(runner.evaluate.baselines.degenerate): every such run is marked.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from runner.common import stats
from runner.common.errors import RecipeError
from runner.common.stats import bootstrap_ci, paired_bootstrap
from runner.evaluate import baselines as baselines_mod
from runner.evaluate import evaluate as evaluate_mod
from runner.evaluate.metrics import declared_by, headline, primary_metric


def unknown_metric(metric: str, names: list[str]) -> RecipeError:
    return RecipeError("--metric", f"{metric!r} is not a metric of these runs", f"one of: {', '.join(names)}")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def run_results(recipe: dict, run_dir: Path) -> dict:
    """One finished run as the summary reads it: its metrics, env, predictions, per-example scores ({metric:
    array}), baselines.json and its evaluators' declarations (from the cell's recipe)."""
    records = evaluate_mod.read_records(run_dir / "predictions.jsonl")
    evaluators = evaluate_mod.build_evaluators(recipe)
    scores = {}
    for name, evaluator in evaluators:
        if hasattr(evaluator, "per_example") and records:
            for key, values in evaluator.per_example(records).items():
                scores[f"{name}.{key}"] = np.asarray(values, dtype=float)
    return {"metrics": _json(run_dir / "metrics.json"), "env": _json(run_dir / "env.json"), "records": records,
            "scores": scores, "baselines": _json(run_dir / "baselines.json"), "declared": declared_by(evaluators)}


def _setting_row(setting, setting_cells: list, results: dict[int, dict], run_dirs: dict, primary: str | None,
                 seed: int) -> tuple[dict, dict]:
    """(the setting's row of sweep.json, {metric: its seed-averaged per-example scores})."""
    runs, values, cis, scores, kinds = [], {}, {}, {}, {}
    for cell in setting_cells:
        res = results[id(cell)]
        flat = headline(res["metrics"], res["declared"])
        for metric, row in flat.items():
            values.setdefault(metric, []).append(row["value"])
            cis.setdefault(metric, []).append(stats.half_width(row["ci95"]))
            kinds.setdefault(metric, {"better": row["better"], "scale": row["scale"]})
        for metric, arr in res["scores"].items():
            scores.setdefault(metric, []).append(arr)
        degenerate = baselines_mod.degenerate(res["records"], res["metrics"], res["baselines"], primary,
                                              res["declared"])
        runs.append({"seed": cell.seed, "run": str(run_dirs[id(cell)]),
                     "metrics": {m: r["value"] for m, r in flat.items()}, "degenerate": degenerate,
                     "train_seconds": res["env"].get("train_seconds"),
                     "peak_reserved_gb": res["env"].get("peak_reserved_gb")})
    summary = {}
    for metric, vals in values.items():
        entry = stats.seed_spread(vals)
        if metric in scores and len({len(a) for a in scores[metric]}) == 1:
            # test-example uncertainty of the seed-averaged score: bootstrap over the shared examples
            low, high = bootstrap_ci(np.mean(scores[metric], axis=0), seed)
            entry["test_ci95_half"] = (high - low) / 2
        else:  # no per-example scores: the runs' own bootstrap intervals, averaged
            known = [h for h in cis[metric] if h is not None]
            entry["test_ci95_half"] = float(np.mean(known)) if known else None
        entry["values"] = vals
        summary[metric] = {**entry, **kinds[metric]}
    times = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
    peaks = [r["peak_reserved_gb"] for r in runs if r["peak_reserved_gb"] is not None]
    averaged = {m: np.mean(arrs, axis=0) for m, arrs in scores.items() if len({len(a) for a in arrs}) == 1}
    return {"setting": dict(setting), "label": setting_cells[0].label, "runs": runs, "metrics": summary,
            "degenerate_runs": sum(bool(r["degenerate"]) for r in runs),
            "train_seconds": stats.seed_spread(times) if times else None,
            "peak_reserved_gb": max(peaks) if peaks else None}, averaged


def summarize(folder: Path, grid: dict[tuple, list], run_dirs: dict[int, Path], plans: dict, primary: str | None,
              axes: list, fixed: list[str]) -> dict:
    first_cell = next(iter(grid.values()))[0]
    seed = first_cell.recipe["seed"]
    results = {id(c): run_results(c.recipe, run_dirs[id(c)]) for group in grid.values() for c in group}
    first = results[id(first_cell)]
    names = list(headline(first["metrics"], first["declared"]))
    if primary is None:  # the first evaluator's headline metric, as it declares it
        primary = primary_metric(first["metrics"], first["declared"])
    elif primary not in names:  # a user's evaluator that declares no metrics: known only now
        raise unknown_metric(primary, names)
    keys = [[(r.index, r.reference) for r in results[id(c)]["records"]] for group in grid.values() for c in group]
    same_examples = all(k == keys[0] for k in keys)
    rows, per_example = [], {}
    for setting, setting_cells in grid.items():
        row, per_example[setting] = _setting_row(setting, setting_cells, results, run_dirs, primary, seed)
        rows.append({**row, "plan": plans.get(setting)})
    out = {"recipe": first_cell.recipe["name"], "sweep": str(folder), "axes": [k for k, _ in axes], "fixed": fixed,
           "seeds": [c.seed for c in next(iter(grid.values()))], "primary_metric": primary,
           "examples": len(keys[0]), "same_examples": same_examples, "settings": rows, "comparisons": [],
           "leader": None, "best": None, "no_winner": None}
    if primary is None:
        return out
    baselines = first["baselines"]
    out["baselines"] = {name: headline(b["metrics"], first["declared"]).get(primary, {}).get("value")
                        for name, b in baselines.get("baselines", {}).items()}
    better = rows[0]["metrics"][primary]["better"]
    if better is None:
        out["no_winner"] = (f"the evaluator of {primary} declares no direction (higher or lower is better), so no "
                            "setting is ranked")
        return out
    leader = max(range(len(rows)), key=lambda i: rows[i]["metrics"][primary]["mean"] * (1 if better == "higher"
                                                                                       else -1))
    out["leader"] = rows[leader]["label"]
    leader_setting = list(grid)[leader]
    for i, (setting, row) in enumerate(zip(grid, rows, strict=True)):
        if i == leader:
            continue
        seeds_test = stats.welch(rows[leader]["metrics"][primary]["values"], row["metrics"][primary]["values"])
        paired = None
        if same_examples and primary in per_example[setting] and primary in per_example[leader_setting]:
            paired = paired_bootstrap(per_example[leader_setting][primary], per_example[setting][primary], seed)
        beyond_seed = stats.excludes_zero(seeds_test["ci95"]) if seeds_test else None
        beyond_test = stats.excludes_zero(paired["difference_ci95"]) if paired else None
        out["comparisons"].append({
            "setting": row["label"], "against": out["leader"], "metric": primary,
            "difference": row["metrics"][primary]["mean"] - rows[leader]["metrics"][primary]["mean"],
            "seeds": seeds_test, "test_examples": paired, "beyond_seed_noise": beyond_seed,
            "beyond_test_noise": beyond_test, "real": bool(beyond_seed and beyond_test)})
    out["best"], out["no_winner"] = _winner(rows[leader], out["comparisons"], primary)
    return out


def _winner(leader: dict, comparisons: list[dict], primary: str) -> tuple[str | None, str | None]:
    """(the best setting, None) when the leader beats every other setting beyond both sources of noise and none of
    its runs is degenerate; else (None, why no setting is named)."""
    if not comparisons:
        return None, "one setting: nothing to rank"
    if leader["degenerate_runs"]:
        return None, (f"{leader['label']} has the best mean {primary}, but {leader['degenerate_runs']} of its "
                      f"{len(leader['runs'])} run(s) are degenerate")
    within = [c["setting"] for c in comparisons if not c["real"]]
    if within:
        return None, (f"{leader['label']} has the best mean {primary}, but not beyond the noise (seeds and test "
                      f"examples) against {', '.join(within)}")
    return leader["label"], None


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


def _degenerate_text(row: dict) -> str:
    return f"{row['degenerate_runs']} of {len(row['runs'])}" if row["degenerate_runs"] else "–"


def _table(summary: dict) -> list[str]:
    """The settings table: each metric's mean ± seed sd (± test half-width), time, memory, degenerate runs."""
    rows = summary["settings"]
    metrics = list(rows[0]["metrics"]) if rows else []
    header = ["setting", *metrics, "train time (s)", "peak GPU GiB (measured / predicted)", "degenerate runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        time = row["train_seconds"]
        time_text = "–" if not time else _fmt(time["mean"], 3) + (f" ± {_fmt(time['sd'], 2)}" if time["sd"] else "")
        plan = row["plan"] or {}
        memory = f"{_fmt(row['peak_reserved_gb'], 3)} / {_fmt(plan.get('peak_reserved_gb'), 3)}"
        lines.append("| " + " | ".join([row["label"], *(_cell(row["metrics"][m]) for m in metrics), time_text,
                                        memory, _degenerate_text(row)]) + " |")
    return lines


def _ranking(summary: dict) -> list[str]:
    primary = summary["primary_metric"]
    lines = []
    if summary["best"]:
        lines += ["", f"## Against the best setting on {primary}: {summary['best']}", ""]
    elif summary["no_winner"]:
        lines += ["", f"## No best setting on {primary}", "", f"No winner is named: {summary['no_winner']}."]
        if summary["comparisons"]:
            lines += ["", f"Against the best mean, {summary['leader']}:", ""]
    if summary["comparisons"]:
        lines += ["| setting | difference | seeds: Welch 95% CI | test examples: paired bootstrap 95% CI | "
                  "beyond both? |", "|---|---|---|---|---|"]
        for c in summary["comparisons"]:
            seeds_ci = _ci(c["seeds"]["ci95"]) if c["seeds"] else "–"
            test_ci = _ci(c["test_examples"]["difference_ci95"]) if c["test_examples"] else "–"
            lines.append(f"| {c['setting']} | {c['difference']:+.4g} | {seeds_ci} | {test_ci} | {_verdict(c)} |")
        lines += ["", "A difference is real when it exceeds both sources of uncertainty: the seed interval (Welch's "
                  "t-test over the per-seed scores: would retraining with other seeds give it again?) and the "
                  "test-example interval (paired bootstrap of the seed-averaged per-example scores over the shared "
                  "examples: would other test examples give it again?). With 2 seeds the seed interval is wide "
                  "(t with 1-2 degrees of freedom): add seeds to narrow it. A setting is named the best only when it "
                  "beats every other one for real and none of its runs is degenerate."]
    return lines


def _degenerate_lines(summary: dict) -> list[str]:
    found = [(row["label"], run) for row in summary["settings"] for run in row["runs"] if run["degenerate"]]
    if not found:
        return []
    lines = ["", "## Degenerate runs", "", "Runs whose predictions are all the same, or whose "
             f"{summary['primary_metric']} is no better than a trivial baseline's: their scores say little about "
             "the setting (too few steps, a learning rate that diverged).", ""]
    return lines + [f"- {label}, seed {run['seed']}: {'; '.join(run['degenerate'])}" for label, run in found]


def markdown(summary: dict) -> str:
    from runner.speed import throughput

    rows = summary["settings"]
    n_seeds = len(summary["seeds"])
    lines = [f"# Sweep: {summary['recipe']}", "",
             f"Folder `{summary['sweep']}`; axes {', '.join(summary['axes']) or '(none)'}; seeds "
             f"{', '.join(map(str, summary['seeds']))}; {summary['examples']} test examples, the same for every cell"
             + ("" if summary["same_examples"] else " (NOT the same: paired tests skipped)") + ".", ""]
    if summary["fixed"]:
        lines += ["Fixed overrides: " + " ".join(f"`{o}`" for o in summary["fixed"]), ""]
    lines += _table(summary)
    lines += ["", f"Each metric: mean over the {n_seeds} seed(s) ± the standard deviation across seeds (training "
              "randomness) (± the 95% bootstrap half-width over test examples of the seed-averaged score). Peak GPU "
              "memory is torch's peak reserved (– on a CPU); predicted by `runner plan` from the config."]
    if rows and rows[0]["plan"] and rows[0]["plan"]["card"]:  # no card: no GPU, no time predicted
        plan = rows[0]["plan"]
        lines += ["", "Predicted training time per seed on " + plan["card"] + f" ({plan['card_why']}): "
                  + "; ".join(f"{r['label']} {throughput.duration((r['plan'] or {}).get('train_seconds'))}"
                              for r in rows) + "."]
    primary = summary["primary_metric"]
    lines += _ranking(summary) + _degenerate_lines(summary)
    if primary and rows:
        half = rows[0]["metrics"][primary].get("test_ci95_half")
        if half:
            smallest = stats.smallest_difference([0.0, 2 * half])
            unit = stats.point(rows[0]["metrics"][primary]["scale"])
            needed = stats.examples_for(unit, [0.0, 2 * half], summary["examples"]) if unit else None
            lines += ["", f"How many examples: with {summary['examples']} test examples the smallest difference in "
                      f"{primary} resolvable at 95% (two systems scored separately) is about {smallest:.3g}"
                      + (f"; resolving {unit:g} would need about {needed:,} examples." if needed else ".")]
    if summary.get("baselines"):
        lines += ["", f"Trivial baselines on the same examples ({primary}): "
                  + ", ".join(f"{name} {_fmt(v)}" for name, v in summary["baselines"].items()) + "."]
    if rows:
        lines += ["", "![sweep](sweep.png)", "", "## Runs", "", f"| setting | seed | {primary} | degenerate | run |",
                  "|---|---|---|---|---|"]
        for row in rows:
            for run in row["runs"]:
                lines.append(f"| {row['label']} | {run['seed']} | {_fmt(run['metrics'].get(primary))} | "
                             f"{'yes' if run['degenerate'] else 'no'} | `{run['run']}` |")
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


def summary_lines(summary: dict) -> list[str]:
    """What `runner sweep` prints at the end: each setting's primary metric (and its degenerate runs), the
    winner or why there is none, each setting against the best mean."""
    primary = summary["primary_metric"]
    out = []
    for row in summary["settings"]:
        if primary:
            line = f"{row['label']}: {primary} {_cell(row['metrics'][primary])}"
            if row["degenerate_runs"]:
                first = next(run for run in row["runs"] if run["degenerate"])
                line += (f"; degenerate in {_degenerate_text(row)} seed(s) ({first['degenerate'][0]})")
            out.append(line)
    if summary["best"]:
        out.append(f"best: {summary['best']}")
    elif summary["no_winner"]:
        out.append(f"no winner: {summary['no_winner']}")
    for c in summary["comparisons"]:
        out.append(f"{c['setting']} vs the best mean ({c['against']}): {c['difference']:+.4g}, real: {_verdict(c)}")
    return out
