"""``runner inspect RECIPE``: the data exploration the study did by hand, as a command.

For each split the recipe uses: rows, token-length percentiles of every template field, of the rendered prompt,
of the completion and of the whole example (prompt + completion + EOS, what ``prompt.max_length`` bounds), how
many examples ``prompt.max_length`` truncates and ``data.max_tokens`` drops (by the runner's own fitting code),
the label distribution for classification recipes, and the smallest max_length that keeps 95% of the examples
whole. Printed as a table, saved as ``inspect.json`` with one length histogram PNG per split.

Results are cached in ``.cache/inspect/`` under a key made of the data and prompt settings, the sampled data's
fingerprints and the tokenizer, so a second look (or a run's report) costs no tokenization.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from runner.common import safeio
from runner.common.errors import RecipeError
from runner.data import chat, mixture, preference
from runner.data import data as data_mod
from runner.recipe import methods
from runner.recipe.evaluator_refs import evaluator_classes
from runner.recipe.templates import render, template_fields, text

PERCENTILES = (50, 90, 95, 99)
KEEP_SHARE = 0.95
CACHE_DIR = Path(".cache") / "inspect"
_BATCH = 1000


# ---------------------------------------------------------------- measuring


def token_lengths(tokenizer, texts: list[str], special: bool = False) -> np.ndarray:
    """Token counts of ``texts``, tokenized in batches (the fast tokenizers do a batch in parallel)."""
    out = []
    for start in range(0, len(texts), _BATCH):
        out.extend(len(ids) for ids in tokenizer(texts[start:start + _BATCH], add_special_tokens=special)["input_ids"])
    return np.asarray(out, dtype=int)


def summarize(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {f"p{p}": 0 for p in PERCENTILES} | {"max": 0, "mean": 0.0}
    # inverted_cdf: the pXX is a real length that at least XX% of the examples do not exceed.
    values = np.percentile(lengths, PERCENTILES, method="inverted_cdf")
    return ({f"p{p}": int(v) for p, v in zip(PERCENTILES, values, strict=True)}
            | {"max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)})


def keep_length(totals: np.ndarray, share: float = KEEP_SHARE) -> int:
    """The smallest length L such that at least ``share`` of the examples have at most L tokens."""
    if len(totals) == 0:
        return 0
    return int(np.sort(totals)[math.ceil(share * len(totals)) - 1])


def classifies(recipe: dict) -> bool:
    """An evaluator whose completion is labels, or rank mode."""
    labelled = any(cls.completion is not None for _, cls in evaluator_classes(recipe))
    return labelled or recipe["generation"].get("mode") == "rank"


def label_column(recipe: dict) -> str | None:
    """The completion's field when the recipe classifies (an evaluator whose completion is labels, or rank mode)."""
    if chat.is_chat(recipe):
        return None  # the label is the last assistant turn's content (inspect_chat_split)
    fields = template_fields(recipe["prompt"]["completion"], "prompt.completion")
    if classifies(recipe) and len(fields) == 1:
        return fields[0]
    return None


def label_counts(values: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        for name in value if isinstance(value, list) else [value]:
            key = "" if name is None else str(name)
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def inspect_split(ds, recipe: dict, tokenizer, role: str) -> tuple[dict, dict]:
    """(statistics, raw lengths per series) of one split, already label-named."""
    if role in methods.pair_roles(recipe):
        return inspect_pairs(ds, recipe, tokenizer, role)
    if chat.is_chat(recipe):
        return inspect_chat_split(ds, recipe, tokenizer, role)
    prompt_cfg = recipe["prompt"]
    sep, max_length = prompt_cfg["list_separator"], prompt_cfg["max_length"]
    limit = recipe["data"]["max_tokens"] or max_length
    data_mod.check_columns(ds, recipe, role)
    # Text far longer than max_length tokens is measured on its first char_cap characters: enough to show it does
    # not fit, without tokenizing a hostile 30 MB record whole (its counts are then lower bounds, and counted).
    cap = data_mod.char_cap(tokenizer, max_length)
    rows, cut = [], 0
    for row in ds.to_list():
        capped = {k: data_mod.cap_text(v, cap, sep) for k, v in row.items()}
        cut += sum(capped[k] is not row[k] for k in row)
        rows.append(capped)
    fields = template_fields(prompt_cfg["template"], "prompt.template")
    fields += [f for f in template_fields(prompt_cfg["completion"], "prompt.completion") if f not in fields]
    series = {f"{{{name}}}": token_lengths(tokenizer, [text(r.get(name), sep) for r in rows])
              for name in fields}
    prompts = [render(prompt_cfg["template"], r, sep) for r in rows]
    completions = [render(prompt_cfg["completion"], r, sep) for r in rows]
    series["prompt"] = token_lengths(tokenizer, prompts)
    series["completion"] = token_lengths(tokenizer, completions)
    # Counted the way data.fit_batch counts: prompt and completion tokenized together, plus EOS.
    series["example"] = token_lengths(tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)],
                                      special=True) + 1
    fitted = ds.map(data_mod.fit_batch, batched=True, batch_size=256, remove_columns=ds.column_names,
                    fn_kwargs={"recipe": recipe, "tokenizer": tokenizer}, keep_in_memory=True,
                    load_from_cache_file=False)
    empty = np.array([not c.strip() for c in fitted["completion"]], dtype=bool)
    too_long = np.asarray(fitted["n_tokens"]) > limit
    stats = {
        "rows": len(rows),
        "lengths": {name: summarize(v) for name, v in series.items()},
        "over_max_length": int((series["example"] > max_length).sum()),
        "truncated": int(sum(fitted["truncated"])),
        "dropped_too_long": int((too_long & ~empty).sum()),
        "dropped_empty_completion": int(empty.sum()),
        "kept": int((~too_long & ~empty).sum()),
        f"max_length_for_{round(KEEP_SHARE * 100)}pct": keep_length(series["example"]),
    }
    if cut:
        stats["cut_before_tokenizing"] = {"values": cut, "characters": cap}
    column = label_column(recipe)
    if column is not None:
        stats["labels"] = label_counts([r.get(column) for r in rows])
    if mixture.shares(ds, recipe):
        stats["sources"] = mixture.shares(ds, recipe)
    return stats, {name: v.tolist() for name, v in series.items()}


def inspect_pairs(ds, recipe: dict, tokenizer, role: str) -> tuple[dict, dict]:
    """A split of preference pairs: both sides' lengths, truncation and drops (runner.data.preference)."""
    max_length = recipe["prompt"]["max_length"]
    limit = recipe["data"]["max_tokens"] or max_length
    series, longer, truncated = preference.pair_lengths(ds, recipe, tokenizer, role)
    too_long = longer > limit
    stats = {"rows": len(longer), "lengths": {name: summarize(v) for name, v in series.items()},
             "over_max_length": int((longer > max_length).sum()), "truncated": truncated,
             "dropped_too_long": int(too_long.sum()), "dropped_empty_completion": 0, "kept": int((~too_long).sum()),
             f"max_length_for_{round(KEEP_SHARE * 100)}pct": keep_length(longer)}
    return stats, {name: v.tolist() for name, v in series.items()}


def inspect_chat_split(ds, recipe: dict, tokenizer, role: str) -> tuple[dict, dict]:
    """A chat split: per conversation, the tokens of each role's turns (content only, summed over its turns), the
    prompt (the turns before the last assistant turn, rendered, + the generation prompt), the completion (the last
    assistant turn's content) and the whole rendered conversation, which prompt.max_length bounds."""
    data_mod.check_columns(ds, recipe, role)
    max_length = recipe["prompt"]["max_length"]
    limit = recipe["data"]["max_tokens"] or max_length
    rendered = chat.render_batch(ds.to_dict(), recipe, tokenizer)
    conversations = rendered["messages"]
    present = [r for r in chat.ROLES if any(t["role"] == r for c in conversations for t in c)]
    turns = [(i, r, t["content"]) for i, c in enumerate(conversations) for t in c for r in [t["role"]]]
    counts = token_lengths(tokenizer, [text for _, _, text in turns])
    series = {}
    for name in present:
        per = np.zeros(len(conversations), dtype=int)
        for (i, r, _), n in zip(turns, counts, strict=True):
            if r == name:
                per[i] += n
        series[f"{name} turns"] = per
    series["turns per conversation"] = np.asarray([len(c) for c in conversations], dtype=int)
    series["prompt"] = token_lengths(tokenizer, rendered["prompt"], special=True)
    series["completion"] = token_lengths(tokenizer, rendered["completion"])
    series["example"] = np.asarray(rendered["n_tokens"], dtype=int)
    too_long = series["example"] > limit
    stats = {"rows": len(conversations), "lengths": {name: summarize(v) for name, v in series.items()},
             "over_max_length": int((series["example"] > max_length).sum()), "truncated": 0,
             "dropped_too_long": int(too_long.sum()), "dropped_empty_completion": 0, "kept": int((~too_long).sum()),
             f"max_length_for_{round(KEEP_SHARE * 100)}pct": keep_length(series["example"])}
    if classifies(recipe):
        stats["labels"] = label_counts(rendered["completion"])
    if mixture.shares(ds, recipe):
        stats["sources"] = mixture.shares(ds, recipe)
    return stats, {name: v.tolist() for name, v in series.items()}


# ---------------------------------------------------------------- the whole recipe, cached


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(recipe: dict, raw: dict, tokenizer) -> str:
    parts = {"data": recipe["data"], "prompt": recipe["prompt"], "label_column": label_column(recipe),
             "pair_roles": methods.pair_roles(recipe),
             "tokenizer": _tokenizer_identity(tokenizer),
             "fingerprints": {role: getattr(ds, "_fingerprint", None) for role, ds in raw.items()},
             "version": 3}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def analyze(recipe: dict, tokenizer, use_cache: bool = True, cache_dir: Path = CACHE_DIR) -> dict:
    """The statistics of every split the recipe uses (``{"splits": {role: stats}, "lengths": {role: ...}}``)."""
    raw = data_mod.sample(data_mod.load_raw(recipe), recipe)
    key = cache_key(recipe, raw, tokenizer)
    path = Path(cache_dir) / f"{key}.json"
    if use_cache and path.is_file():
        try:
            return {**json.loads(path.read_text(encoding="utf-8")), "cached": True}
        except (json.JSONDecodeError, OSError):
            pass  # a torn cache file is recomputed
    result = {"recipe": recipe["name"], "tokenizer": tokenizer.name_or_path,
              "max_length": recipe["prompt"]["max_length"],
              "max_tokens": recipe["data"]["max_tokens"] or recipe["prompt"]["max_length"],
              "truncate": recipe["prompt"]["truncate"], "splits": {}, "lengths": {}}
    if chat.is_chat(recipe):
        result["chat"] = {"messages": recipe["prompt"]["messages"],
                          "chat_template": recipe["prompt"]["chat_template"] or "the tokenizer's own"}
    for role, ds in raw.items():
        if ds is None:
            continue
        stats, lengths = inspect_split(data_mod.name_labels(ds, recipe), recipe, tokenizer, role)
        result["splits"][role] = stats
        result["lengths"][role] = lengths
    path.parent.mkdir(parents=True, exist_ok=True)
    safeio.write_json(path, result, indent=None)  # atomic: a concurrent reader never sees half a file
    return {**result, "cached": False}


# ---------------------------------------------------------------- output


def _display(series: str) -> str:
    return "prompt+completion+EOS" if series == "example" else series


def _display_for(result: dict, series: str) -> str:
    return "whole conversation" if series == "example" and result.get("chat") else _display(series)


def table(result: dict) -> str:
    """The statistics as a readable plain-text table."""
    lines = [f"{result['recipe']}: tokenizer {result['tokenizer']}, prompt.max_length {result['max_length']}, "
             f"data.max_tokens {result['max_tokens']}, " + (
                 f"chat data in {{{result['chat']['messages']}}}, chat template {result['chat']['chat_template']}"
                 if result.get("chat") else f"prompt.truncate {result['truncate']}")]
    keep_key = f"max_length_for_{round(KEEP_SHARE * 100)}pct"
    for role, s in result["splits"].items():
        lines += ["", f"{role}: {s['rows']} rows"]
        width = max(len(_display_for(result, n)) for n in s["lengths"]) + 2
        head = "".join(f"{c:>7}" for c in [*(f"p{p}" for p in PERCENTILES), "max", "mean"])
        lines.append(f"  {'tokens':<{width}}{head}")
        for name, st in s["lengths"].items():
            label = _display_for(result, name)
            values = [*(st[f"p{p}"] for p in PERCENTILES), st["max"]]
            lines.append(f"  {label:<{width}}" + "".join(f"{v:>7}" for v in values) + f"{st['mean']:>7.1f}")
        n = max(s["rows"], 1)
        lines.append(f"  prompt.max_length {result['max_length']}: {s['over_max_length']} examples longer "
                     f"({100 * s['over_max_length'] / n:.1f}%), {s['truncated']} truncated; "
                     f"data.max_tokens {result['max_tokens']}: {s['dropped_too_long']} dropped"
                     + (f"; {s['dropped_empty_completion']} dropped for an empty completion"
                        if s["dropped_empty_completion"] else "") + f"; {s['kept']} kept")
        lines.append(f"  {round(KEEP_SHARE * 100)}% of examples fit whole in {s[keep_key]} tokens "
                     f"(the smallest prompt.max_length that keeps them)")
        if s.get("cut_before_tokenizing"):
            c = s["cut_before_tokenizing"]
            lines.append(f"  {c['values']} field values longer than {c['characters']:,} characters were measured on "
                         "that many (far more than fit): their token counts are lower bounds")
        if "labels" in s:
            total = max(sum(s["labels"].values()), 1)
            shown = list(s["labels"].items())
            text = ", ".join(f"{k or '(empty)'} {v} ({100 * v / total:.1f}%)" for k, v in shown[:30])
            more = f", ... {len(shown) - 30} more" if len(shown) > 30 else ""
            lines.append(f"  labels ({len(shown)} names, share of {total} mentions): {text}{more}")
        if s.get("sources"):
            total = max(sum(s["sources"].values()), 1)
            text = ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in s["sources"].items())
            lines.append(f"  sources (share of the {total} rows drawn): {text}")
    return "\n".join(lines)


def plot_histograms(result: dict, out_dir: Path) -> list[Path]:
    """One PNG per split: a length histogram per series, with max_length marked on the whole example's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for role, series in result["lengths"].items():
        names = list(series)
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            values = series[name]
            low, high = (min(values), max(values)) if values else (0, 1)
            # One bin per token count when the range is small: wider bins alias integer counts into spikes.
            bins = np.arange(low, high + 2) - 0.5 if high - low < 60 else 50
            ax.hist(values, bins=bins, color="#4878a8")
            ax.set_title(_display_for(result, name) if name == "example" else name, fontsize=10)
            ax.set_xlabel("tokens")
            if name == "example":
                ax.axvline(result["max_length"], color="#c03030", linestyle="--",
                           label=f"max_length {result['max_length']}")
                ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(f"{result['recipe']}: {role} ({result['splits'][role]['rows']} rows)")
        fig.tight_layout()
        path = out_dir / f"lengths_{role}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write(result: dict, out_dir: Path) -> Path:
    """``inspect.json`` (statistics; the raw lengths are left to the cache) and the histograms in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {k: v for k, v in result.items() if k not in ("lengths", "cached")}
    path = out_dir / "inspect.json"
    safeio.write_json(path, stats)
    plot_histograms(result, out_dir)
    return path


def check_out(out_dir: Path) -> Path:
    """``--out``: a folder that exists or can be made. A file there, or in the way of making it, is the user's
    mistake, told before the data is tokenized (mkdir would fail after it, as if the machine were at fault)."""
    found = safeio.nearest_existing(out_dir)
    if not found.is_dir():
        raise RecipeError("--out", f"{found} is a file", "give a folder")
    return out_dir


def default_out_dir(recipe: dict) -> Path:
    return Path(recipe["output_dir"]) / recipe["name"] / "inspect"
