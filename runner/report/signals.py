"""What the report shows of training.method beyond the loss: the adapter a run started from (and that one's own
start: the chain), and a preference method's signals as TRL logs them (reward margins, chosen and rejected
log-probabilities, preference accuracy), on the held-out eval pairs at every evaluation and on the last train log."""

from __future__ import annotations

from runner.common.markdown import table

# TRL's names (without the eval_ prefix) -> the report's words
SIGNALS = {"rewards/accuracies": "preference accuracy", "rewards/margins": "reward margin",
           "rewards/chosen": "reward chosen", "rewards/rejected": "reward rejected",
           "logps/chosen": "log-prob chosen", "logps/rejected": "log-prob rejected"}


def chain(started: dict | None) -> list[str]:
    """The adapters this run descends from, nearest first."""
    names = []
    while started:
        names.append(started.get("run") or started.get("loaded") or started.get("adapter"))
        started = started.get("started_from")
    return names


def section(recipe: dict, env: dict, log: list[dict]) -> list[str]:
    method = recipe["training"]["method"]
    started = chain(env.get("started_from"))
    if method == "sft" and not started:
        return []
    lines = ["## Method", "", f"training.method **{method}**"
             + (f", started from `{started[0]}`" if started else ", from a new adapter") + "."]
    if len(started) > 1:
        lines += ["", "Chain of adapters, nearest first: " + " ← ".join(f"`{s}`" for s in started) + "."]
    evals = [r for r in log if any(f"eval_{k}" in r for k in SIGNALS)]
    trains = [r for r in log if any(k in r for k in SIGNALS)]
    if evals or trains:
        names = [k for k in SIGNALS if any(f"eval_{k}" in r or k in r for r in evals + trains)]
        rows = [[f"eval pairs, step {r['step']}", *(_fmt(r.get(f"eval_{k}")) for k in names)] for r in evals]
        if trains:
            rows.append([f"train, last log (step {trains[-1]['step']})", *(_fmt(trains[-1].get(k)) for k in names)])
        lines += ["", "Training signals (TRL's; preference accuracy: the share of pairs whose chosen answer gets the "
                  "higher reward; on the held-out eval pairs, above 0.5 means the preference was learned):", ""]
        lines += table(["", *(SIGNALS[k] for k in names)], rows)
    losses = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    if method == "pretrain" and len(losses) > 1:
        lines += ["", f"Held-out loss {losses[0][1]:.4g} (step {losses[0][0]}) → {losses[-1][1]:.4g} "
                  f"(step {losses[-1][0]})."]
    return lines


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"
