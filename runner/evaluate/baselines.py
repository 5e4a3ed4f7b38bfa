"""Trivial baselines, scored by the recipe's own evaluators on the examples the model was evaluated on.

How much of a score would a system get that never reads the input, or copies its start? Each evaluator declares
the baselines that fit its task (``baselines``, keys of evaluators.base.BASELINES); the built-ins:

- classification: the **majority class** of the train split, and a **label-distribution** guesser (each
  prediction drawn from the train split's label frequencies, from the recipe's seed);
- multi-label: the **most frequent label set** of the train split (the evaluator's ``gold_names`` lists a
  reference's labels);
- summarization (``rouge``): **LEAD-1**, the first sentence of the input field (``prompt.truncate``, or the
  template's only field) as the model saw it, and the **first N words** of it, N = the median length in words of
  the train split's references.

Train-split statistics come from the train rows the recipe samples (``data.train_samples`` from the sample seed),
never from the evaluated references. The input field is read back from each evaluated prompt by matching the
template, so no data is loaded for LEAD-1. Each baseline's predictions and metrics go to
``<run>/baselines/<name>/``; the summary to ``<run>/baselines.json``.

A run is **degenerate** (``degenerate``) when its predictions are all the same, or its headline metric is no
better than a trivial baseline's: report.md and ``runner sweep`` say so.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from evaluators.base import Record
from runner.common.errors import RecipeError, short
from runner.common.labels import normalize
from runner.data import data as data_mod
from runner.evaluate import compare
from runner.evaluate import evaluate as evaluate_mod
from runner.evaluate.metrics import DECLARED, better_of, declared_by, headline
from runner.recipe.templates import render, template_fields, unrender

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def input_field(recipe: dict) -> str | None:
    """The field holding the text to summarize: prompt.truncate, else the template's only field."""
    if recipe["prompt"].get("messages"):
        return None  # chat data: the input is a conversation, not one field of a template
    if recipe["prompt"]["truncate"]:
        return recipe["prompt"]["truncate"]
    fields = template_fields(recipe["prompt"]["template"], "prompt.template")
    return fields[0] if len(fields) == 1 else None


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    return _SENTENCE_END.split(text, maxsplit=1)[0] if text else ""


def first_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def train_references(recipe: dict) -> list[str] | None:
    """The completions of the train rows the recipe samples (stripped), or None without a train split."""
    if recipe["data"]["splits"]["train"] is None:
        return None
    raw = data_mod.sample(data_mod.load_raw(recipe), recipe).get("train")
    if raw is None:
        return None
    rows = data_mod.name_labels(raw, recipe)
    if recipe["prompt"].get("messages"):  # chat data: the reference is the last (assistant) turn's content
        refs = [row[recipe["prompt"]["messages"]][-1]["content"].strip() for row in rows]
        return [r for r in refs if r]
    completion, sep = recipe["prompt"]["completion"], recipe["prompt"]["list_separator"]
    refs = [render(completion, row, sep).strip() for row in rows]
    return [r for r in refs if r]  # an empty target is dropped from training too


# ---------------------------------------------------------------- the baselines


def _label_baselines(wanted: set[str], n: int, train_refs: list[str], seed: int) -> dict:
    """The majority class and the label-distribution guesser, each reference one label (case and spaces ignored)."""
    out = {}
    counts = Counter(normalize(r) for r in train_refs)
    spelled = {}
    for r in train_refs:
        spelled.setdefault(normalize(r), " ".join(r.split()))
    if "majority_class" in wanted:
        majority = spelled[counts.most_common(1)[0][0]]
        share = counts.most_common(1)[0][1] / len(train_refs)
        out["majority class"] = (f"always `{majority}`, the train split's most frequent label ({share:.1%})",
                                 [majority] * n)
    if "label_distribution" in wanted:
        labels = sorted(counts)
        probs = np.array([counts[k] for k in labels], dtype=float) / len(train_refs)
        draws = np.random.default_rng(seed).choice(len(labels), size=n, p=probs)
        out["label distribution"] = ("a label drawn at random from the train split's label frequencies "
                                     f"(seed {seed})", [spelled[labels[i]] for i in draws])
    return out


def _label_set_baseline(evaluator, n: int, train_refs: list[str]) -> dict:
    """Always the train split's most frequent set of labels, as the evaluator's ``gold_names`` lists them."""
    def key(ref: str) -> tuple:
        return tuple(sorted({normalize(name) for name in evaluator.gold_names([ref])}))

    sets = Counter(key(r) for r in train_refs)
    top, count = sets.most_common(1)[0]
    text = next(r for r in train_refs if key(r) == top)
    return {"most frequent label set": (f"always `{text}`, the train split's most frequent set of labels "
                                        f"({count / len(train_refs):.1%})", [text] * n)}


def _text_baselines(wanted: set[str], recipe: dict, records: list[Record], train_refs: list[str] | None):
    """LEAD-1 and the first N words of the input field; the reasons for any left out."""
    out, skipped = {}, []
    field = input_field(recipe)
    inputs = [(unrender(recipe["prompt"]["template"], r.prompt) or {}).get(field) if field else None
              for r in records]
    if field is None or any(text is None for text in inputs):
        return out, ["LEAD-1: the input field cannot be read back from the prompts (set prompt.truncate)"]
    if "lead_1" in wanted:
        out["LEAD-1"] = (f"the first sentence of `{{{field}}}` (as the model saw it)",
                         [first_sentence(t) for t in inputs])
    if "first_words" in wanted and train_refs:
        words = int(np.median([len(r.split()) for r in train_refs]))
        out[f"first {words} words"] = (f"the first {words} words of `{{{field}}}` ({words} = the median "
                                       "reference length in the train split)", [first_words(t, words) for t in inputs])
    elif "first_words" in wanted:
        skipped.append("first N words: no train split to take N from")
    return out, skipped


def _predictors(recipe: dict, evaluators: list, records: list[Record], train_refs: list[str] | None):
    """{name: (description, [prediction per record])} of the baselines the recipe's evaluators declare, and the
    reasons for any left out."""
    out, skipped = {}, []
    wanted = {b for _, ev in evaluators for b in ev.baselines}
    by_labels = wanted & {"majority_class", "label_distribution", "label_set"}
    if by_labels and not train_refs:
        skipped.append("majority/most frequent label: no train split to count labels in")
    elif by_labels:
        out.update(_label_baselines(wanted, len(records), train_refs, recipe["seed"]))
        declaring = next((ev for _, ev in evaluators if "label_set" in ev.baselines), None)
        if declaring is not None:
            out.update(_label_set_baseline(declaring, len(records), train_refs))
    if wanted & {"lead_1", "first_words"}:
        text, why = _text_baselines(wanted, recipe, records, train_refs)
        out.update(text)
        skipped += why
    return out, skipped


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def compute(recipe: dict, run_dir: Path, records: list[Record]) -> dict:
    """Score every baseline that fits the recipe's evaluators on ``records``' examples; writes
    ``<run_dir>/baselines/<name>/`` and ``<run_dir>/baselines.json`` and returns the latter's content."""
    # Baselines make predictions only: evaluators that read the model's scores of the references are left out,
    # and those that return no numbers (samples).
    evaluators = [(name, ev) for name, ev in evaluate_mod.build_evaluators(recipe)
                  if "predictions" in ev.needs and "logprobs" not in ev.needs and ev.metrics != ()]
    result = {"examples": len(records), "baselines": {}, "skipped": []}
    if not evaluators or not records:
        return result
    try:
        train_refs = train_references(recipe)
    except RecipeError as exc:  # the train data cannot be read here (e.g. offline): say so, score the rest
        train_refs = None
        result["skipped"].append(f"train split unreadable: {exc.problem}")
    predictors, skipped = _predictors(recipe, evaluators, records, train_refs)
    result["skipped"] += skipped
    for name, (description, predictions) in predictors.items():
        folder = Path(run_dir) / "baselines" / _slug(name)
        folder.mkdir(parents=True, exist_ok=True)
        rows = [Record(index=r.index, prompt=r.prompt, reference=r.reference, prediction=p, id=r.id)
                for r, p in zip(records, predictions, strict=True)]
        with open(folder / "predictions.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"index": r.index, "id": r.id, "prompt": r.prompt, "reference": r.reference,
                                    "prediction": r.prediction}, ensure_ascii=False) + "\n")
        metrics = {"split": recipe["evaluation"]["split"], "examples": len(rows)}
        for ev_name, evaluator in evaluators:
            metrics[ev_name] = evaluator.evaluate(rows, folder)
        metrics[DECLARED] = declared_by(evaluators)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        # The model against this baseline on the same examples: paired bootstrap of model - baseline.
        paired = compare.paired_scores(recipe, rows, records)
        result["baselines"][name] = {"description": description, "folder": folder.relative_to(run_dir).as_posix(),
                                     "metrics": metrics, "model_minus_baseline": paired}
    (Path(run_dir) / "baselines.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def degenerate(records: list[Record], model_metrics: dict, result: dict | None, metric: str | None,
               declared: dict | None = None) -> list[str]:
    """Why a run tells little about its model, one sentence each (none: it is not degenerate): every prediction
    the same, or ``metric`` (its headline) no better than a trivial baseline's on the same examples (``result``:
    ``compute``'s; ``declared``: the evaluators' declarations, else metrics.json's). A metric whose direction is
    not declared is compared with no baseline."""
    reasons = []
    predicted = {" ".join(r.prediction.split()) for r in records}
    if len(records) > 1 and len(predicted) == 1:
        reasons.append(f"all {len(records)} predictions are the same: `{short(next(iter(predicted)), 60)}`")
    row = headline(model_metrics, declared).get(metric) if metric else None
    if row is None or row["better"] is None or not result:
        return reasons
    for name, b in result["baselines"].items():
        base = headline(b["metrics"], declared).get(metric)
        if base is not None and better_of(row["value"], base["value"], row["better"]) != 1:
            reasons.append(f"{metric} {row['value']:.4g} is no better than the {name} baseline's {base['value']:.4g}")
    return reasons


# ---------------------------------------------------------------- report.md


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(result: dict, model_metrics: dict) -> list[str]:
    """The report's Baselines section: the model and each baseline side by side, then model − baseline paired."""
    lines = ["## Baselines", ""]
    if not result["baselines"]:
        reason = "; ".join(result["skipped"]) or "no evaluator of this recipe has a trivial baseline"
        return [*lines, f"No trivial baseline: {reason}."]
    names = list(result["baselines"])
    lines.append(f"Trivial systems scored by the same evaluators on the same {result['examples']} examples:")
    lines.append("")
    lines += [f"- **{n}**: {b['description']}" for n, b in result["baselines"].items()]
    model = headline(model_metrics)
    scored = {n: headline(b["metrics"]) for n, b in result["baselines"].items()}
    lines += ["", "| metric | this model | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for metric, row in model.items():
        cells = [_with_ci(scored[n].get(metric)) for n in names]
        lines.append(f"| {metric} | {_with_ci(row)} | " + " | ".join(cells) + " |")
    paired = {n: b["model_minus_baseline"] for n, b in result["baselines"].items()}
    metrics = [m for m in model if any(m in p for p in paired.values())]
    if metrics:
        lines += ["", "Model − baseline, paired bootstrap over the same examples (95% CI):", "",
                  "| metric | " + " | ".join(f"vs {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
        for metric in metrics:
            cells = []
            for n in names:
                p = paired[n].get(metric)
                cells.append("–" if p is None else f"{p['difference']:+.4g} [{p['difference_ci95'][0]:+.4g}, "
                                                   f"{p['difference_ci95'][1]:+.4g}]")
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    if result["skipped"]:
        lines += ["", "Not computed: " + "; ".join(result["skipped"]) + "."]
    return lines


def _with_ci(row: dict | None) -> str:
    if row is None:
        return "–"
    ci = row.get("ci95")
    return _fmt(row["value"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
