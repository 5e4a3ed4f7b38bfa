"""``report.md`` for a run: the recipe in brief, the data statistics (``runner inspect``), trainable parameters,
training time and peak memory, loss curves, the metrics and the samples — like the study's REPORT folders, made
from the run folder's own files. Plots (PNG, matplotlib) go to ``<run>/report/``.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

from runner.common import safeio, stats
from runner.common.markdown import cell, table
from runner.data import inspection as inspect_mod
from runner.evaluate import baselines, retention
from runner.evaluate import evaluate as evaluate_mod
from runner.evaluate.metrics import DECLARED, by_evaluator, headline, primary_metric
from runner.model.lora import lora_variants
from runner.report import signals
from runner.speed import profiles
from runner.store import checkpoints

PLOTS = "report"


# ---------------------------------------------------------------- reading the run folder


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of an interrupted run
    return rows


def loss_points(log: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train loss, eval loss) as (step, value) pairs, in step order."""
    train = [(r["step"], float(r["loss"])) for r in log if "loss" in r and "train_loss" not in r]
    evals = [(r["step"], float(r["eval_loss"])) for r in log if "eval_loss" in r]
    return sorted(train), sorted(evals)


# ---------------------------------------------------------------- plots


def plot_loss(log: list[dict], path: Path) -> Path | None:
    train, evals = loss_points(log)
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#4878a8")
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", color="#c03030", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    values = [v for _, v in train + evals]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def task_metric_points(log: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """training.task_metrics' numbers (``eval_<evaluator>.<metric>``) as (step, value) pairs, per metric."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in log:
        for k, v in r.items():
            if k.startswith("eval_") and "." in k and isinstance(v, (int, float)):
                out.setdefault(k[5:], []).append((r["step"], float(v)))
    return {k: sorted(v) for k, v in out.items()}


def plot_task_metrics(log: list[dict], path: Path) -> Path | None:
    """The task metrics measured while training, one panel each, to set beside the loss."""
    points = task_metric_points(log)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points) + 0.8, 3.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], points.items()):
        ax.plot(*zip(*values, strict=True), color="#3a8a3a", marker="o")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- markdown pieces


def _num(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value)


def _source(source) -> str:
    if isinstance(source, list):  # data.sources: a weighted mixture
        total = sum(s["weight"] for s in source)
        return "mixture of " + "; ".join(f"{_source(s['source'])} ({100 * s['weight'] / total:.0f}%)" for s in source)
    if isinstance(source, dict):
        return ", ".join(f"{role}: {path}" for role, path in source.items())
    return str(source)


def recipe_section(recipe: dict) -> list[str]:
    m, q, lora, d = recipe["model"], recipe["quantization"], recipe["lora"], recipe["data"]
    t, g, p = recipe["training"], recipe["generation"], recipe["prompt"]
    quant = q["method"] if q["method"] == "none" else (
        f"{q['method']} ({q['quant_type']}, double quant {q['double_quant']})" if q["method"] == "bnb_4bit" else q["method"])
    adapter = "full fine-tuning" if lora is None else (
        f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']} on {lora['target_modules']}"
        + "".join(f"; {part}" for part in lora_variants(lora)))
    if m["adapter"] is not None:  # its own LoRA settings are the ones trained (runner.model.start)
        adapter = f"continues {m['adapter']}"
    steps = f"{t['max_steps']} steps" if t["max_steps"] else f"{t['epochs']} epoch(s)"
    decode = ("sampling (top_p {top_p}, temperature {temperature})".format(**g) if g["do_sample"]
              else ("beam search" if g["num_beams"] > 1 else "greedy"))
    if g.get("mode") == "rank":
        decode = "rank (label log-likelihood)"
    used = [role for role in ("train", "eval", "test") if (d.get("splits") or {}).get(role, role) is not None]
    samples = ", ".join(f"{role} {d[f'{role}_samples'] or 'all'}" for role in used)  # a null split: not used
    rows = [
        ["model", m["name_or_path"]],
        ["quantization", quant],
        ["adapter", adapter],
        ["data", f"{_source(d['source'] if d.get('sources') is None else d['sources'])}"
                 + (f" (config {d['config']})" if d["config"] else "")
                 + f"; samples: {samples}"],
        ["prompt", f"max_length {p['max_length']}, truncate {p['truncate']}, data.max_tokens {d['max_tokens']}"],
        ["training", f"{t['method']}, {steps}, micro-batch {t['micro_batch_size']} x {t['gradient_accumulation_steps']} "
                     f"accumulation, lr {t['learning_rate']} ({t['lr_scheduler']}, warmup {t['warmup_ratio']}), "
                     f"{t['optimizer']}, gradient checkpointing {t['gradient_checkpointing']}"],
        ["generation", f"{decode}, max_new_tokens {g['max_new_tokens']}, stop {g['stop']}"],
        ["evaluators", ", ".join(e["name"] for e in recipe["evaluation"]["evaluators"])
         + f" on the {recipe['evaluation']['split']} split"],
        ["seed", recipe["seed"]],
    ]
    lines = ["## Recipe", ""] + table(["", ""], rows)
    if p.get("messages"):
        template = p["chat_template"]
        named = "of the tokenizer" if template is None else (f"`{template}`" if "{" not in template
                                                             else "written in recipe.yaml")
        lines += ["", f"Chat data in `{p['messages']}`, rendered with the chat template {named} (saved with the "
                  "adapter's tokenizer); loss on the assistant turns only.", "", "The full resolved recipe is "
                  "`recipe.yaml`."]
        return lines
    lines += ["", "Template (completion: `" + p["completion"].replace("`", "'") + "`):", "", "```text",
              p["template"], "```", "", "The full resolved recipe is `recipe.yaml`."]
    return lines


def data_section(result: dict | None, env: dict, images: list[Path], run_dir: Path) -> list[str]:
    lines = ["## Data", ""]
    if env.get("data"):
        rows = [[role, s["rows"], s["kept"], s["truncated"], s["dropped_too_long"], s["dropped_empty_completion"]]
                for role, s in env["data"].items()]
        lines += ["Used by this run:", ""]
        lines += table(["split", "rows", "kept", "truncated", "dropped (too long)", "dropped (empty target)"], rows)
        lines.append("")
    if result is None:
        return [*lines, "Data statistics were not computed."]
    keep_key = f"max_length_for_{round(inspect_mod.KEEP_SHARE * 100)}pct"
    lines.append(f"Token lengths ({result['tokenizer']}; prompt.max_length {result['max_length']}, "
                 f"data.max_tokens {result['max_tokens']}):")
    for role, s in result["splits"].items():
        rows = [["prompt + completion + EOS" if name == "example" else f"`{name}`",
                 *(st[f"p{p}"] for p in inspect_mod.PERCENTILES), st["max"], st["mean"]]
                for name, st in s["lengths"].items()]
        lines += ["", f"**{role}** ({s['rows']} rows; {s['over_max_length']} longer than max_length, "
                  f"{s['truncated']} truncated, {s['dropped_too_long']} dropped; 95% fit whole in "
                  f"{s[keep_key]} tokens)", ""]
        lines += table(["tokens", *(f"p{p}" for p in inspect_mod.PERCENTILES), "max", "mean"], rows)
        if "labels" in s:
            total = max(sum(s["labels"].values()), 1)
            lines += ["", "Labels: " + ", ".join(f"{k or '(empty)'} {v} ({100 * v / total:.1f}%)"
                                                 for k, v in s["labels"].items())]
    for image in images:
        lines += ["", f"![{image.stem}]({image.relative_to(run_dir).as_posix()})"]
    return lines


def _speed_text(speed: dict) -> str:
    """What trained, as the speed profile resolved it (env.json's ``speed``): the recipe section shows what the
    recipe writes, which a profile may split differently or checkpoint otherwise."""
    known = {k: v for k, v in speed.items() if k in profiles.Speed.__dataclass_fields__}
    try:
        return profiles.Speed(**known).describe()
    except TypeError:  # a record from a version that lacked a setting: show what it has
        return ", ".join(f"{k} {v}" for k, v in speed.items())


def training_section(env: dict, log: list[dict], loss_png: Path | None, run_dir: Path, rss_gb: float | None) -> list[str]:
    lines = ["## Training", ""]
    rows = []
    if env.get("trainable") is not None and env.get("total"):
        rows.append(["trainable parameters", f"{env['trainable']:,} of {env['total']:,} "
                                             f"({100 * env['trainable'] / env['total']:.4f}%)"])
    if env.get("speed"):
        rows.append(["settings used", _speed_text(env["speed"])])
    if env.get("global_step") is not None:
        rows.append(["optimizer steps", env["global_step"]])
    if env.get("train_loss") is not None:
        rows.append(["mean train loss", _num(float(env["train_loss"]))])
    _, evals = loss_points(log)
    if evals:
        rows.append(["last eval loss", f"{evals[-1][1]:.4g} (step {evals[-1][0]})"])
    if env.get("early_stopping"):
        rows.append(["adapter kept (early stopping)", checkpoints.describe_best(env["early_stopping"])])
    if env.get("train_seconds") is not None:
        rows.append(["training time", f"{env['train_seconds']:.1f} s (+ {env.get('load_seconds', 0):.1f} s loading)"])
    live = env.get("task_metrics")
    if live:
        spent = live["seconds"] / max(env.get("train_seconds", 0) - live["seconds"], 1e-9)
        rows.append(["task metrics while training", f"{live['evaluations']} evaluations of {live['examples']} eval "
                     f"examples (backend {live['backend']}): {live['seconds']:.1f} s, +{100 * spent:.0f}% on the "
                     "training steps' time"])
    if env.get("peak_allocated_gb") is not None:
        rows.append(["peak GPU memory", f"{env['peak_allocated_gb']} GiB allocated, "
                                        f"{env.get('peak_reserved_gb')} GiB reserved"])
    if rss_gb is not None:
        rows.append(["peak process memory (RSS)", f"{rss_gb:.2f} GiB"])
    device = env.get("device", {})
    if device:
        rows.append(["device", ", ".join(f"{k} {v}" for k, v in device.items())])
    versions = env.get("versions", {})
    if versions:
        rows.append(["versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)])
    lines += table(["", ""], rows) if rows else ["No training record (env.json) in this folder."]
    if loss_png is not None:
        lines += ["", f"![loss]({loss_png.relative_to(run_dir).as_posix()})"]
    live_png = plot_task_metrics(log, run_dir / PLOTS / "task_metrics.png")
    if live_png is not None:
        lines += [f"![task metrics while training]({live_png.relative_to(run_dir).as_posix()})"]
    return lines


def _scalar_rows(name: str, block: dict[str, dict]) -> list[list]:
    rows = []
    for key, m in block.items():
        if "." in key:  # per-class rows have tables of their own
            continue
        ci = m["ci95"]
        rows.append([name, key, _num(m["value"]), f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else ""])
    return rows


def metrics_section(metrics: dict, run_dir: Path) -> list[str]:
    lines = ["## Metrics", ""]
    if not metrics:
        return [*lines, "Not evaluated (`runner train --no-eval`); `runner eval RECIPE --run DIR` evaluates later."]
    lines.append(f"{metrics.get('examples')} examples of the {metrics.get('split')} split.")
    speed = evaluate_mod.speed_line(metrics)
    if speed:
        lines += ["", speed]
    rows = []
    for name, block in by_evaluator(metrics).items():  # the declared numbers (runner.evaluate.metrics)
        rows += _scalar_rows(name, block)
    lines += [""] + table(["evaluator", "metric", "value", "95% CI"], rows)
    for name, values in metrics.items():
        if not isinstance(values, dict) or name == DECLARED:
            continue
        for key in ("per_class", "per_label"):
            per = values.get(key)
            if per:
                columns = list(next(iter(per.values())))
                lines += ["", f"{name}, {key.replace('_', ' ')}:", ""]
                lines += table([key.split("_")[1], *columns],
                                [[label, *(_num(v[c]) for c in columns)] for label, v in per.items()])
        if values.get("invalid_examples"):
            shown = "; ".join(f"`{cell(e.get('prediction', e.get('name')))}` x{e['count']}"
                              for e in values["invalid_examples"])
            lines += ["", f"{name}: invalid predictions, most frequent: {shown}"]
        if values.get("references_not_in_labels"):
            lines += ["", f"{name}: reference labels missing from the recipe's list: "
                          f"{', '.join(values['references_not_in_labels'])}"]
        image = values.get("file")
        if isinstance(image, str) and image.endswith(".png") and (run_dir / image).is_file():
            lines += ["", f"![{name}]({image})"]
    return lines


def samples_section(run_dir: Path, count: int = 8) -> list[str]:
    samples = run_dir / "samples.md"
    lines = ["## Samples", ""]
    if samples.is_file():
        body = [line for line in samples.read_text(encoding="utf-8").splitlines() if not line.startswith("# ")]
        return lines + "\n".join(body).strip().splitlines()
    pred = run_dir / "predictions.jsonl"
    if not pred.is_file():
        return [*lines, "No predictions in this folder."]
    rows = []
    with open(pred, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            prompt = " ".join(r["prompt"].split())
            rows.append([r["index"], prompt if len(prompt) <= 200 else prompt[:97] + " [...] " + prompt[-97:],
                         r["reference"], r["prediction"]])
            if len(rows) >= count:
                break
    return lines + table(["#", "input", "reference", "prediction"], rows)


def resolution_section(metrics: dict) -> list[str]:
    """How precise the test set is: per metric with a bootstrap interval, the smallest difference between two
    systems it resolves at 95%, and the test examples a one-point difference would need (runner.common.stats)."""
    n = metrics.get("examples") or 0
    rows = []
    for metric, row in headline(metrics).items():
        smallest = stats.smallest_difference(row["ci95"])
        if smallest is None:
            continue
        unit = stats.point(row["scale"])
        needed = stats.examples_for(unit, row["ci95"], n) if unit else None
        rows.append([metric, _num(float(row["value"])), f"±{_num(float(stats.half_width(row['ci95'])))}",
                     _num(float(smallest)), f"{needed:,} (for {_num(unit)})" if needed else "–"])
    if not rows:
        return []
    lines = ["## How many examples", "", f"From the bootstrap spread over the {n} test examples: a difference "
             "between two systems smaller than the *smallest resolvable difference* is within what another draw "
             "of examples could produce (95%, two systems scored separately; a paired comparison such as "
             "`runner compare` often resolves somewhat less). The interval narrows with the square root of the "
             "number of examples.", ""]
    return lines + table(["metric", "value", "95% CI half-width", "smallest resolvable difference",
                           "examples to resolve one point"], rows)


def baselines_section(run_dir: Path, recipe: dict, metrics: dict) -> list[str]:
    """Trivial baselines on the evaluated examples (runner.evaluate.baselines), and first whether the run is
    degenerate (constant predictions, or its headline metric no better than a baseline's); nothing without
    predictions."""
    pred = run_dir / "predictions.jsonl"
    if not metrics or not pred.is_file():
        return []
    records = evaluate_mod.read_records(pred)
    result = baselines.compute(recipe, run_dir, records)
    reasons = baselines.degenerate(records, metrics, result, primary_metric(metrics))
    warning = ["**Degenerate run**: " + "; ".join(reasons) + ". Its scores say little about what the model "
               "learned (too few steps, a learning rate that diverged, a prompt it cannot read).", ""] if reasons else []
    section = baselines.markdown(result, metrics)
    return [*section[:2], *warning, *section[2:]]


# ---------------------------------------------------------------- the report


def peak_rss_gb() -> float:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def write(run_dir: Path, recipe: dict, tokenizer=None, data_stats: dict | None = None,
          rss_gb: float | None = None) -> Path:
    """Write ``<run_dir>/report.md`` and its plots. ``tokenizer`` lets it compute the data statistics
    (cached, see runner.data.inspection); ``data_stats`` passes ones already computed."""
    run_dir = Path(run_dir)
    plots = run_dir / PLOTS
    plots.mkdir(exist_ok=True)
    env, metrics, log = _json(run_dir / "env.json"), _json(run_dir / "metrics.json"), read_log(run_dir)
    if data_stats is None and tokenizer is not None:
        data_stats = inspect_mod.analyze(recipe, tokenizer)
    images = []
    if data_stats is not None:
        inspect_mod.write(data_stats, plots)
        images = [plots / f"lengths_{role}.png" for role in data_stats["splits"]]
    loss_png = plot_loss(log, plots / "loss.png")
    title = f"# Report: {recipe['name']}"
    lines = [title, "", f"Run folder `{run_dir}`; started {env.get('started', 'n/a')}, git commit "
             f"{(env.get('git_commit') or 'n/a')[:12]}, data fingerprint {env.get('data_fingerprint', 'n/a')}.", ""]
    for section in (recipe_section(recipe), data_section(data_stats, env, images, run_dir),
                    training_section(env, log, loss_png, run_dir, rss_gb), signals.section(recipe, env, log),
                    metrics_section(metrics, run_dir),
                    baselines_section(run_dir, recipe, metrics), resolution_section(metrics),
                    retention.section(retention.read(run_dir)),
                    samples_section(run_dir)):
        if not section:
            continue
        lines += [*section, ""]
    path = run_dir / "report.md"
    safeio.write_text(path, "\n".join(lines))  # written last, whole: report.md marks a finished run
    return path
