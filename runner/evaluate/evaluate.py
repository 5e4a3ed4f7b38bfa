"""Evaluation: predictions (streamed to predictions.jsonl) -> the recipe's evaluators -> metrics.json."""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path

from evaluators.base import Record
from runner.common import dist, safeio
from runner.common.errors import USER_EVALUATOR, RecipeError, short
from runner.common.labels import normalize, with_unlisted
from runner.data import data as data_mod
from runner.data import prepared_cache
from runner.evaluate import backend as backend_mod
from runner.evaluate import generate as generate_mod
from runner.evaluate import rank
from runner.evaluate.metrics import DECLARED, declared_by
from runner.recipe.checks import rank_labels
from runner.recipe.evaluator_refs import check_declaration, evaluator_classes
from runner.store import runs as runs_mod


def build_evaluators(recipe: dict, user: bool = True) -> list:
    """(name, evaluator) of each of the recipe's evaluators, built with its keys; ``user=False``: a user's own
    evaluator is left unbuilt (None in its place)."""
    built = []
    for i, (spec, cls) in enumerate(evaluator_classes(recipe)):
        if not user and ":" in spec["name"]:
            built.append((spec["name"], None))
            continue
        params = {k: v for k, v in spec.items() if k != "name"}
        try:
            evaluator = cls(seed=recipe["seed"], **params)
        except Exception as exc:
            if ":" not in spec["name"]:  # a built-in refusing keys its params_schema accepted: a bug, not the recipe's
                raise
            # a user's class refusing the recipe's keys: the recipe's mistake
            raise RecipeError(f"evaluation.evaluators[{i}]", f"{spec['name']} refused its parameters: "
                              f"{type(exc).__name__}: {short(exc, 150)}", "check the keys given to it") from None
        if ":" in spec["name"] and hasattr(evaluator, "__dict__"):
            # what it raises later is blamed on it (runner.common.errors), not on the runner; set past any __setattr__
            vars(evaluator)[USER_EVALUATOR] = f"evaluation.evaluators[{i}] ({spec['name']})"
        check_declaration(evaluator, i, spec["name"])  # its own, as built (ROUGE's follow its types)
        built.append((spec["name"], evaluator))
    return built


def references(examples) -> list[str]:
    """The reference of each prepared example, as evaluators get it: its completion without surrounding spaces."""
    return [c.strip() for c in examples["completion"]]


def _label_lists(recipe: dict, refs: list[str]):
    """(key path, labels, the label names the references hold, whether rank mode predicts only these labels) of
    each label list of the recipe: the built-in labelled evaluators', and in rank mode generation.labels. A user's
    own evaluator is built after training, as before these checks: its code may do anything, also differ by rank,
    and until the ranks first meet only rank 0 reports a mistake (runner.cli.cli._for_rank)."""
    ranked = recipe["generation"]["mode"] == "rank"
    chosen = rank_labels(recipe) if ranked else None
    given = recipe["generation"].get("labels")
    for i, (_, evaluator) in enumerate(build_evaluators(recipe, user=False)):
        labels = getattr(evaluator, "labels", None)
        if labels and hasattr(evaluator, "gold_names"):
            yield (f"evaluation.evaluators[{i}].labels", labels, evaluator.gold_names(refs),
                   ranked and not given and evaluator.completion == "label" and labels == chosen)
    if ranked and given:
        yield "generation.labels", list(given), refs, True


def check_labels(recipe: dict, splits: dict) -> None:
    """The recipe's label lists against the labels of the data loaded (every split of ``splits``), before any weight
    loads. A listed label missing from all of it is fine on its own (a rare class a sample can miss), but not while
    the data holds labels outside the list: then the two disagree (a typo, another spelling) and the label could
    never be scored right. In rank mode a data label outside the list is one the model can never predict."""
    refs = [ref for examples in splits.values() for ref in references(examples)]
    for key, labels, names, ranked in _label_lists(recipe, refs):
        try:
            _, unlisted = with_unlisted(labels, names)
        except ValueError as exc:  # two labels that evaluation would take for one
            raise RecipeError(key, str(exc), "list each label once") from None
        present = {normalize(name) for name in names}
        missing = [j for j, label in enumerate(labels) if normalize(label) not in present]
        if missing and unlisted:
            found = [label for j, label in enumerate(labels) if j not in missing]
            raise _not_in_data(f"{key}[{missing[0]}]", labels[missing[0]], found + unlisted, unlisted)
        if ranked and unlisted:
            raise RecipeError(key, f"rank mode chooses among these labels, and the data's {short(unlisted[0], 40)!r} "
                              "is not one of them, so the model can never predict it",
                              f"add the data's labels the list lacks: {short(', '.join(unlisted), 200)}")


def _not_in_data(key: str, label: str, data_labels: list[str], unlisted: list[str]) -> RecipeError:
    close = difflib.get_close_matches(label.casefold(), [u.casefold() for u in unlisted], n=1, cutoff=0.5)
    guess = next((u for u in unlisted if close and u.casefold() == close[0]), None)
    return RecipeError(key, f"{short(label, 40)!r} is not a label of the data",
                       f"the data's labels: {short(', '.join(data_labels), 200)}; "
                       + (f"did you mean {guess!r}?" if guess else "write the labels as the data does"))


def metric_names(recipe: dict) -> list[str] | None:
    """The metrics the recipe's evaluators declare, named as in runner.evaluate.metrics.headline (``rouge.rougeL``); None
    when one of them (a user's own) declares none, so that only its results can tell."""
    names = []
    for name, evaluator in build_evaluators(recipe):
        if evaluator.metrics is None:
            return None
        names += [f"{name}.{m.name}" for m in evaluator.metrics if "." not in m.name and "*" not in m.name]
    return names


def _part_files(path: Path) -> list[Path]:
    """The per-rank files of a distributed evaluation (merged into ``path`` when it finishes)."""
    return sorted(path.parent.glob(f"{path.stem}.rank*.jsonl"))


def _read_done(path: Path) -> dict[int, dict]:
    """Predictions an interrupted evaluation already wrote, also by the ranks of a distributed one (a torn last
    line is ignored)."""
    done = {}
    for file in [path, *_part_files(path)]:
        if not file.exists():
            continue
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["index"]] = row
    return done


def choose(model, tokenizer, prompts: list[str], recipe: dict, skip: set[int] = frozenset()) -> backend_mod.Choice:
    """The backend and batch size that predict these prompts (runner.evaluate.backend, for generation.mode): decided
    once, by the caller of ``predict``, which records it and hands it on."""
    ranked = recipe["generation"]["mode"] == "rank"
    return (rank.choose if ranked else generate_mod.choose)(model, tokenizer, prompts, recipe, skip=skip)


def predict(model, tokenizer, prompts: list[str], recipe: dict, choice: backend_mod.Choice,
            skip: set[int] = frozenset(), on_batch=None) -> dict[int, str]:
    """generation.mode: free generation, or ranking the allowed labels, with ``choice``'s backend and batch size;
    both stream (index, text) batches to ``on_batch``."""
    ranked = recipe["generation"]["mode"] == "rank"
    return (rank.rank if ranked else generate_mod.generate)(model, tokenizer, prompts, recipe, skip=skip,
                                                           on_batch=on_batch, choice=choice)


def _examples_for(role: str, recipe: dict, tokenizer, known: dict):
    if role not in known:
        known[role] = prepared_cache.prepared(recipe, tokenizer, (role,), data_mod.prepare).splits[role]
    return known[role]


def evaluate(recipe: dict, model, tokenizer, out_dir: Path, examples=None, splits: dict | None = None,
             choice: backend_mod.Choice | None = None) -> dict | None:
    """Predict for the evaluation split, score, and write predictions.jsonl, metrics.json and evaluator files.

    ``splits`` ({role: prepared examples}) saves re-preparing the splits that model-scoring evaluators (``loss``)
    read; missing ones are prepared here. ``choice``: the backend and batch size to predict with; decided here once
    (``choose``, from the prompts still to predict) unless given, then used and recorded in metrics.json as it is.
    Under a launcher every rank predicts its share of the examples and rank 0 alone scores and writes; the other
    ranks return None.
    """
    world = dist.world()
    role = recipe["evaluation"]["split"]
    known = dict(splits or {})
    if examples is not None:
        known[role] = examples
    examples = _examples_for(role, recipe, tokenizer, known)
    evaluators = build_evaluators(recipe)
    _reset_peak_memory()
    start = time.time()
    records, speed = [], {}
    if any("predictions" in ev.needs for _, ev in evaluators):
        records, speed = _predictions(recipe, model, tokenizer, examples, out_dir / "predictions.jsonl", choice)
    metrics = {"split": role, "examples": len(examples), "mode": recipe["generation"]["mode"],
               "prediction_seconds": round(time.time() - start, 2), **speed}
    if not world.main:
        return None
    for name, evaluator in evaluators:
        given = records
        if "logprobs" in evaluator.needs:
            scored_role = evaluator.split or role
            given = scored_records(recipe, model, tokenizer, _examples_for(scored_role, recipe, tokenizer, known),
                                   evaluator.batch_size, records if scored_role == role else [])
        metrics[name] = evaluator.evaluate(given, out_dir)
    metrics["evaluation_seconds"] = round(time.time() - start, 2)
    metrics.update(runs_mod.peak_memory())  # of this evaluation: the peak was reset at its start
    metrics[DECLARED] = declared_by(evaluators)  # which way each metric is better, read with the numbers
    safeio.write_json(out_dir / "metrics.json", metrics)
    print(speed_line(metrics), flush=True)
    return metrics


def scored_records(recipe: dict, model, tokenizer, examples, batch_size: int | None = None,
                   predicted: list[Record] = (), choice: backend_mod.Choice | None = None) -> list[Record]:
    """The examples as records carrying the model's log-probability of each reference completion + EOS and its
    token count (what an evaluator that ``needs`` "logprobs" reads), with the predictions made for them, if any."""
    completions = list(examples["completion"])
    scores = rank.completion_logprobs(model, tokenizer, list(examples["prompt"]), completions, recipe,
                                      batch_size=batch_size, choice=choice)
    made = {r.index: r.prediction for r in predicted}
    ids = examples["id"] if "id" in getattr(examples, "column_names", examples) else [None] * len(completions)
    refs = references(examples)
    return [Record(index=i, prompt=prompt, reference=refs[i], prediction=made.get(i, ""), id=ids[i],
                   logprob=logprob, tokens=tokens)
            for i, (prompt, (logprob, tokens)) in enumerate(zip(examples["prompt"], scores))]


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # blocks training cached are not this evaluation's: its peak starts from what is held
        torch.cuda.reset_peak_memory_stats()


def _write_rows(path: Path, rows) -> None:
    safeio.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _resumable(pred_path: Path, prompts: list[str]) -> dict[int, dict]:
    """The predictions already made for these prompts, rewritten into ``pred_path`` without any torn line."""
    # Lines for other prompts (the data or template changed since the interruption) are not resumed from.
    done = {i: r for i, r in _read_done(pred_path).items() if i < len(prompts) and r["prompt"] == prompts[i]}
    if done:
        print(f"resuming evaluation: {len(done)} of {len(prompts)} predictions already in {pred_path}", flush=True)
    if pred_path.exists() or done:
        _write_rows(pred_path, (done[i] for i in sorted(done)))
    for part in _part_files(pred_path):
        part.unlink()
    return done


def _predictions(recipe: dict, model, tokenizer, examples, pred_path: Path,
                 choice: backend_mod.Choice | None = None) -> tuple[list[Record], dict]:
    """Every example's prediction, streamed to ``pred_path``; an interrupted run's lines are kept and skipped.
    Returns the records and the speed: backend, batch size (``choice``, or rank 0's decision), prompts/s and
    prediction tokens/s of this call.

    Under a launcher each rank predicts whole batches of its own (runner.common.dist.share) into ``predictions.rank<r>.jsonl``
    and rank 0 merges them, in example order, into ``pred_path``; the backend and batch size are rank 0's, so every
    rank cuts the same batches."""
    from tqdm.auto import tqdm

    world = dist.world()
    prompts, refs = examples["prompt"], references(examples)
    ids = examples["id"]
    done = dist.broadcast(_resumable(pred_path, prompts) if world.main else None)
    out_path = pred_path if world.size == 1 else pred_path.with_name(f"{pred_path.stem}.rank{world.rank}.jsonl")
    if choice is None:
        choice = dist.broadcast(choose(model, tokenizer, prompts, recipe, skip=set(done)) if world.main else None)
    if len(done) < len(prompts):
        print(f"evaluation: {choice.describe()}" + (f" per process, {world.size} processes" if world.size > 1 else ""),
              flush=True)
    rank = recipe["generation"]["mode"] == "rank"
    verb = "ranking labels" if rank else "generating"
    if world.size > 1:
        verb += f" ({world.size} processes, counted from rank 0)"
    bar = tqdm(total=len(prompts), initial=len(done), desc=verb, unit=" examples" if rank else " prompts",
               dynamic_ncols=True, disable=not world.main)
    count = {"predictions": 0, "tokens": 0}
    start = time.time()

    def write(batch):
        with open(out_path, "a", encoding="utf-8") as f:
            for i, text in batch:
                row = {"index": i, "id": ids[i], "prompt": prompts[i], "reference": refs[i], "prediction": text}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        count["predictions"] += len(batch)
        count["tokens"] += sum(map(len, tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]))
        bar.set_postfix_str(f"{count['tokens'] * world.size / max(time.time() - start, 1e-6):,.0f} tok/s",
                            refresh=False)
        bar.update(min(len(batch) * world.size, bar.total - bar.n))

    try:
        predict(model, tokenizer, prompts, recipe, choice, skip=set(done), on_batch=write)
    finally:
        bar.close()
    if world.size > 1:
        dist.barrier()  # every rank's file is complete
        if world.main:
            _write_rows(pred_path, (row for _, row in sorted(_read_done(pred_path).items())))
            for part in _part_files(pred_path):
                part.unlink()
    seconds = max(time.time() - start, 1e-6)
    counts = dist.gather(count)
    made, tokens = sum(c["predictions"] for c in counts), sum(c["tokens"] for c in counts)
    speed = {**choice.record(), "new_predictions": made,
             "prompts_per_s": round(made / seconds, 3) if made else None,
             "tokens_per_s": round(tokens / seconds, 3) if made else None,
             **({"processes": world.size} if world.size > 1 else {})}
    return (read_records(pred_path) if world.main else []), speed


def read_records(pred_path: Path) -> list[Record]:
    """The records of a predictions.jsonl, by example index."""
    return [Record(index=i, prompt=r["prompt"], reference=r["reference"], prediction=r["prediction"], id=r["id"])
            for i, r in sorted(_read_done(pred_path).items())]


def speed_line(metrics: dict) -> str | None:
    """One line: how long the evaluation took, how fast it predicted, with which backend, batch and peak memory."""
    if metrics.get("evaluation_seconds") is None:
        return None
    text = f"Evaluation: {metrics['evaluation_seconds']:.1f} s"
    if metrics.get("prompts_per_s"):
        unit = "examples" if metrics.get("mode") == "rank" else "prompts"
        text += (f"; {metrics['new_predictions']} predictions at {metrics['prompts_per_s']:.2f} {unit}/s, "
                 f"{metrics['tokens_per_s']:,.0f} prediction tokens/s")
    if metrics.get("backend"):
        text += f"; backend {metrics['backend']}, batch {metrics['batch_size']}"
    if metrics.get("peak_reserved_gb") is not None:
        text += f"; peak GPU memory {metrics['peak_reserved_gb']:.2f} GiB reserved"
    return text + "."
