"""Base model vs fine-tuned adapter on the same examples with the same seed: comparison.md + comparison.json.

One model is loaded; the base is evaluated with the adapter disabled, then the adapter itself. Each metric is
shown side by side with its difference and whether the two bootstrap 95% confidence intervals overlap. Evaluators
with per-example scores (``per_example(records)``, e.g. ROUGE) also get a paired bootstrap of the difference:
the same resampled examples for both models, which is far more sensitive than comparing two separate intervals.

Two adapters (``runner compare RECIPE --run A --run B``) are compared the same way: one base model holding both
adapters, each evaluated on the same examples with the same seed, the difference taken as B − A.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from runner.common import dist, safeio
from runner.common.markdown import cell
from runner.common.stats import ci_overlap, paired_bootstrap
from runner.evaluate import evaluate as evaluate_mod
from runner.evaluate import retention
from runner.evaluate.metrics import better_of, finite, flatten
from runner.store import runs

SYSTEMS = ("base", "adapter")
# The "better" cell of a metric whose evaluator declares no direction (evaluators.base.Evaluator.metrics).
UNDECLARED = "– (direction not declared)"


# ---------------------------------------------------------------- metrics side by side


def side_by_side(base: dict, adapter: dict, paired: dict, names: tuple[str, str] = SYSTEMS) -> dict[str, dict]:
    """Every metric of both systems (``names``: the first, the second), the difference second − first; which is
    better by the direction the evaluator declares (None where it declares none)."""
    first, second = names
    flat_b, flat_a = flatten(base), flatten(adapter)
    rows = {}
    for metric in [m for m in flat_b if m in flat_a and finite(flat_b[m]["value"]) and finite(flat_a[m]["value"])]:
        b, a = flat_b[metric], flat_a[metric]
        diff = a["value"] - b["value"]
        better = {1: second, 0: "tie", -1: first, None: None}[better_of(a["value"], b["value"], b["better"])]
        rows[metric] = {first: b["value"], second: a["value"], "difference": round(diff, 6),
                        f"{first}_ci95": b["ci95"], f"{second}_ci95": a["ci95"],
                        "ci_overlap": ci_overlap(b["ci95"], a["ci95"]), "better": better}
        if metric in paired:
            rows[metric]["paired"] = paired[metric]
    return rows


def paired_scores(recipe: dict, base_records: list, adapter_records: list) -> dict[str, dict]:
    """Paired bootstrap for every evaluator that scores examples one by one (matched by example index)."""
    by_index = {r.index: r for r in adapter_records}
    pairs = [(r, by_index[r.index]) for r in base_records if r.index in by_index]
    if not pairs:
        return {}
    out = {}
    for name, evaluator in evaluate_mod.build_evaluators(recipe):
        if not hasattr(evaluator, "per_example"):
            continue
        base_scores = evaluator.per_example([b for b, _ in pairs])
        adapter_scores = evaluator.per_example([a for _, a in pairs])
        for key, scores in base_scores.items():
            out[f"{name}.{key}"] = paired_bootstrap(scores, adapter_scores[key], recipe["seed"])
    return out


# ---------------------------------------------------------------- files


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _p(paired: dict) -> str:
    floor = 1 / paired["resamples"]
    return f"< {floor:g}" if paired["p_value"] < floor else f"{paired['p_value']:.3g}"


def _with_ci(value, ci) -> str:
    return _fmt(value) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def _cell(text: str, limit: int = 160) -> str:
    return cell(text, limit)


def write_markdown(path: Path, summary: dict, base_records: list, adapter_records: list, examples: int = 5) -> None:
    first, second = summary.get("systems", SYSTEMS)
    if "runs" in summary:  # adapter vs adapter
        lines = [f"# Adapter vs adapter: {summary['recipe']}", "",
                 f"A = `{summary['runs'][first]}`, B = `{summary['runs'][second]}`; split `{summary['split']}` "
                 f"({summary['examples']} examples), seed {summary['seed']}, mode `{summary['mode']}`. Both adapters "
                 "sit on one loaded base model and saw the same examples with the same seed.", ""]
    else:
        lines = [f"# Base model vs adapter: {summary['recipe']}", "",
                 f"Run `{summary['run']}`; split `{summary['split']}` ({summary['examples']} examples), seed "
                 f"{summary['seed']}, mode `{summary['mode']}`. Both models saw the same examples with the same seed; "
                 "the base is the same loaded model with the adapter disabled.", ""]
    if "runs" in summary:
        lines += _difference_lines(summary.get("recipe_differences"))
    lines += [f"| metric | {first} | {second} | {second} − {first} | better | 95% CIs overlap | paired 95% CI of the "
              "difference | p |", "|---|---|---|---|---|---|---|---|"]
    for metric, row in summary["metrics"].items():
        paired = row.get("paired")
        overlap = {True: "yes", False: "no", None: "–"}[row["ci_overlap"]]
        paired_ci = "[{}, {}]".format(*map(_fmt, paired["difference_ci95"])) if paired else "–"
        lines.append(f"| {metric} | {_with_ci(row[first], row[f'{first}_ci95'])} | "
                     f"{_with_ci(row[second], row[f'{second}_ci95'])} | {row['difference']:+.4g} | "
                     f"{row['better'] or UNDECLARED} | {overlap} | {paired_ci} | {_p(paired) if paired else '–'} |")
    lines += ["", "Intervals: percentile bootstrap over examples (1000 resamples from the seed). Non-overlapping "
              "intervals mean a clear difference; overlapping ones do not mean no difference. The paired interval "
              "resamples the same examples for both models; when it excludes 0 the difference is significant at the "
              "5% level (p: two-sided bootstrap p-value).", ""]
    general = retention.section(summary.get("retention"))
    if general:
        lines += [*general, ""]
    adapted = {r.index: r for r in adapter_records}
    shown = [r for r in base_records if r.index in adapted][:examples]
    if shown:
        lines += ["## Examples", "", f"| # | input | reference | {first} | {second} |", "|---|---|---|---|---|"]
        for r in shown:
            lines.append(f"| {r.index} | {_cell(r.prompt)} | {_cell(r.reference)} | {_cell(r.prediction)} | "
                         f"{_cell(adapted[r.index].prediction)} |")
    safeio.write_text(path, "\n".join(lines) + "\n")


def _value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _difference_lines(differences: list | None) -> list[str]:
    """comparison.md's account of how A and B were trained differently (their recipe.yaml)."""
    if differences is None:
        return ["A's or B's recipe.yaml is missing or unreadable: how they were trained differently is not known.", ""]
    if not differences:
        return ["A and B were trained with the same recipe (their recipe.yaml, where they write and how they started "
                "aside).", ""]
    lines = ["## How A and B were trained differently", "", "| recipe key | A | B |", "|---|---|---|"]
    lines += [f"| {d['key']} | {_cell(_value(d['A']))} | {_cell(_value(d['B']))} |" for d in differences]
    return [*lines, ""]


def recipe_differences(run_a: Path, run_b: Path) -> list[dict] | None:
    """Every recipe key the two runs were trained with differently, as {key, A, B} (None: a recipe unreadable)."""
    found = runs.recipe_differences(run_a, run_b)
    return None if found is None else [{"key": key, "A": a, "B": b} for key, a, b in found]


def open_compare_dir(recipe: dict, run_dir: Path) -> Path:
    """``<run>/compare-<time>/``; an interrupted comparison (no comparison.json yet) is picked up again."""
    return runs.reopen_or_new(recipe, run_dir, "compare-", lambda p: not (p / "comparison.json").exists())


def open_pair_dir(recipe: dict, run_a: Path, run_b: Path) -> Path:
    """``<run B>/vs-<time>/`` (``runs.json`` names A and B); an interrupted comparison of the same two runs is
    picked up again."""
    pair = {"A": str(run_a), "B": str(run_b)}

    def interrupted(p: Path) -> bool:
        named = p / "runs.json"
        return not (p / "comparison.json").exists() and named.is_file() and json.loads(named.read_text()) == pair

    out = runs.reopen_or_new(recipe, run_b, "vs-", interrupted)
    (out / "runs.json").write_text(json.dumps(pair), encoding="utf-8")
    return out


# ---------------------------------------------------------------- the command


def _evaluate_systems(recipe: dict, systems: dict, net, tokenizer, examples, out_dir: Path) -> dict:
    """Evaluate each system (name -> a context manager that makes ``net`` that system) into ``out_dir/<name>/``;
    a system whose metrics.json exists finished before an interruption and is read back."""
    results = {}
    for system, activate in systems.items():
        folder = out_dir / system
        folder.mkdir(exist_ok=True)
        if dist.broadcast((folder / "metrics.json").exists()):  # finished before an interruption
            results[system] = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
            continue
        print(f"{system}: evaluating into {folder}", flush=True)
        with activate():
            results[system] = evaluate_mod.evaluate(recipe, net, tokenizer, folder, examples=examples)
    return results


def compare(recipe: dict, run_dir: Path, net, tokenizer, examples, out_dir: Path) -> dict:
    """Evaluate ``net`` (a PeftModel) with the adapter disabled, then enabled; write the comparison files (rank 0
    under a launcher: the other ranks predict their shares and return None)."""
    results = _evaluate_systems(recipe, {"base": net.disable_adapter, "adapter": contextlib.nullcontext}, net,
                                tokenizer, examples, out_dir)
    if not dist.world().main:
        return None
    records = {s: evaluate_mod.read_records(out_dir / s / "predictions.jsonl") for s in SYSTEMS}
    paired = paired_scores(recipe, records["base"], records["adapter"])
    summary = {"recipe": recipe["name"], "run": str(run_dir), "split": recipe["evaluation"]["split"],
               "examples": results["adapter"]["examples"], "seed": recipe["seed"],
               "mode": recipe["generation"]["mode"],
               "metrics": side_by_side(results["base"], results["adapter"], paired)}
    general = retention.run(recipe, net, tokenizer, out_dir)  # the base's scores come from the cache when known
    if general is not None:
        summary["retention"] = general
    write_markdown(out_dir / "comparison.md", summary, records["base"], records["adapter"])
    # comparison.json last: its presence marks the comparison finished.
    safeio.write_json(out_dir / "comparison.json", summary)
    return summary


def compare_adapters(recipe: dict, run_a: Path, run_b: Path, net, tokenizer, examples, out_dir: Path) -> dict:
    """``net``: the base model with run A's adapter as "default" and run B's as "B"; each evaluated on the same
    examples; the difference is B − A, paired over examples where the evaluator scores them one by one."""

    @contextlib.contextmanager
    def active(name: str):
        net.set_adapter(name, inference_mode=True)
        yield

    names = ("A", "B")
    results = _evaluate_systems(recipe, {"A": lambda: active("default"), "B": lambda: active("B")}, net, tokenizer,
                                examples, out_dir)
    if not dist.world().main:
        return None
    records = {s: evaluate_mod.read_records(out_dir / s / "predictions.jsonl") for s in names}
    paired = paired_scores(recipe, records["A"], records["B"])
    summary = {"recipe": recipe["name"], "systems": list(names), "runs": {"A": str(run_a), "B": str(run_b)},
               "recipe_differences": recipe_differences(run_a, run_b),
               "split": recipe["evaluation"]["split"], "examples": results["B"]["examples"], "seed": recipe["seed"],
               "mode": recipe["generation"]["mode"],
               "metrics": side_by_side(results["A"], results["B"], paired, names)}
    write_markdown(out_dir / "comparison.md", summary, records["A"], records["B"])
    # comparison.json last: its presence marks the comparison finished.
    (out_dir / "comparison.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def summary_lines(summary: dict) -> list[str]:
    """One line per headline metric; per-class rows stay in comparison.md."""
    first, second = summary.get("systems", SYSTEMS)
    out = []
    if "runs" in summary:
        out.append(difference_line(summary.get("recipe_differences")))
    for metric, row in summary["metrics"].items():
        if metric.count(".") > 1:
            continue
        extra = ""
        if "paired" in row:
            lo, hi = row["paired"]["difference_ci95"]
            extra = f", paired 95% CI [{lo:+.4g}, {hi:+.4g}], p {_p(row['paired'])}"
        elif row["ci_overlap"] is not None:
            extra = f", CIs {'overlap' if row['ci_overlap'] else 'do not overlap'}"
        out.append(f"{metric}: {first} {_fmt(row[first])} -> {second} {_fmt(row[second])} "
                   f"({row['difference']:+.4g}{extra}; better: {row['better'] or UNDECLARED})")
    return out + retention.summary_lines(summary.get("retention"))


def difference_line(differences: list | None) -> str:
    """How A and B were trained differently, in one line."""
    if differences is None:
        return "A vs B: a recipe.yaml is missing or unreadable, how they differ is not known"
    if not differences:
        return "A vs B: trained with the same recipe"
    return "A vs B: trained with " + ", ".join(f"{d['key']} {_value(d['A'])} -> {_value(d['B'])}" for d in differences)
