"""Examples: load (hub id or local files), pick splits, sample from the seed, name class labels,
render the prompt template, and fit each example into ``prompt.max_length`` tokens."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from runner.common import cpu
from runner.common.errors import RecipeError, hub_unreachable
from runner.data import chat, mixture
from runner.data.files import local_file, peek, read_local
from runner.recipe import methods
from runner.recipe.compose import is_local_path
from runner.recipe.templates import render, template_fields, text

ROLES = ("train", "eval", "test")


@dataclass
class Prepared:
    """Rendered examples per role (columns: prompt, completion, n_tokens, truncated, id) and what was done."""

    splits: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""
    cached: str | None = None  # the .cache/prepared entry it was loaded from (runner.data.prepared_cache)


# ---------------------------------------------------------------- loading


def _quiet_datasets() -> None:
    """The runner prints its own one-line data summary; datasets' per-step bars and logs would bury it."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)


def _load_hub_split(recipe: dict, split: str, key_path: str, source_key: str = "data.source"):
    from datasets import load_dataset

    data = recipe["data"]
    try:
        return load_dataset(data["source"], name=data["config"], split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise RecipeError(key_path, f"split {split!r} not found in {data['source']}: {str(exc)[:150]}",
                              "set data.splits to the dataset's split names") from None
        raise RecipeError(source_key, f"cannot load {data['source']!r}: {str(exc)[:200]}",
                          "check the dataset id and data.config") from None
    except Exception as exc:
        unreachable = hub_unreachable(exc, source_key, data["source"], f"point {source_key} at local files")
        if unreachable is not None:
            raise unreachable from None
        raise RecipeError(source_key, f"cannot load {data['source']!r}: {type(exc).__name__}: {str(exc)[:200]}",
                          "check the id, your network or HF_HUB_OFFLINE; offline, point data.source at local files"
                          ) from None


def load_raw(recipe: dict) -> dict:
    """{role: Dataset} for every role the recipe uses, before sampling (a mixture: already drawn by weight)."""
    _quiet_datasets()
    if recipe["data"].get("sources") is not None:
        return _load_mixture(recipe)
    return _load_source(recipe)


def _load_mixture(recipe: dict) -> dict:
    """Every source loaded as data.source would be, mapped onto the prompt's fields, then drawn by weight."""
    per_role: dict = {}
    names = mixture.source_names(recipe)
    for i, name in enumerate(names):
        raw = _load_source(mixture.sub_recipe(recipe, i), f"data.sources[{i}].source")
        for role, ds in raw.items():
            if ds is not None:
                per_role.setdefault(role, []).append((i, name_labels(mixture.conform(ds, recipe, i, name), recipe)))
    return mixture.mix(per_role, recipe, sample_seed(recipe))


def _load_source(recipe: dict, key: str = "data.source") -> dict:
    data = recipe["data"]
    source, splits, holdout = data["source"], data["splits"], data["holdout"]
    raw: dict = {}
    if isinstance(source, dict):
        for role, path, where in local_files(data, key):
            raw[role] = read_local(path, where)
    elif is_local_path(source):
        ds = read_local(source, key)
        for role in ROLES:
            if splits[role] is not None:
                # data.holdout carves the role out of train here too, as it does for a hub source.
                reuse = role == "train" or (splits[role] == "train" and not holdout.get(role))
                raw[role] = ds if reuse else None
    else:
        for role in ROLES:
            if splits[role] is not None and not (holdout.get(role) and role != "train"):
                raw[role] = _load_hub_split(recipe, splits[role], f"data.splits.{role}", key)
            elif splits[role] is not None:
                raw[role] = None
    for role in ("eval", "test"):
        if role in raw and raw[role] is None and not holdout.get(role):
            raise RecipeError(f"data.splits.{role}", f"split {splits[role]!r} is not in {Path(str(source)).name}",
                              f"set data.holdout.{role}: N to carve {role} rows out of train, "
                              f"or data.splits.{role}: null")
    return _carve_holdout(raw, recipe)


def local_files(data: dict, key: str = "data.source") -> list[tuple[str, str, str]]:
    """(role, path, key path) of each local file a data.source reads: a {train, eval, test} source's files of the
    roles in use; one file is the train split (eval and test are carved out of it or reuse it)."""
    source, splits = data["source"], data["splits"]
    if isinstance(source, dict):
        return [(role, source[role], f"{key}.{role}") for role in ROLES if splits[role] is not None and role in source]
    return [("train", source, key)] if is_local_path(source) else []


def _carve_holdout(raw: dict, recipe: dict) -> dict:
    """Disjoint eval/test rows taken from train when the source has no such split."""
    want = {role: recipe["data"]["holdout"][role] for role in ("eval", "test")
            if role in raw and raw[role] is None}
    if not want:
        return raw
    if raw.get("train") is None:
        raise RecipeError("data.holdout", "carves rows out of train, but there is no train split", "set data.splits.train")
    pool = raw["train"].shuffle(seed=sample_seed(recipe))
    if sum(want.values()) >= len(pool):
        raise RecipeError("data.holdout", f"asks for {sum(want.values())} rows but train has {len(pool)}",
                          "carve fewer rows")
    start = 0
    for role, n in want.items():
        raw[role] = pool.select(range(start, start + n))
        start += n
    if recipe["data"]["splits"]["train"] is not None:
        raw["train"] = pool.select(range(start, len(pool)))
    return raw


def sample_seed(recipe: dict) -> int:
    """data.seed, else the recipe's seed: a seed sweep pins it so that only training randomness varies."""
    seed = recipe["data"].get("seed")
    return recipe["seed"] if seed is None else seed


def sample(raw: dict, recipe: dict) -> dict:
    """Draw ``<role>_samples`` rows per role, reproducibly from the sample seed."""
    out = {}
    for role, ds in raw.items():
        n = recipe["data"][f"{role}_samples"]
        if n is not None and n < len(ds):
            ds = ds.shuffle(seed=sample_seed(recipe)).select(range(n))
        out[role] = ds
    return out


def name_labels(ds, recipe: dict):
    """ClassLabel integers (and data.label_names columns) become their names."""
    from datasets import ClassLabel, Sequence

    maps = {}
    for column, feature in ds.features.items():
        if isinstance(feature, ClassLabel):
            maps[column] = feature.names
        elif isinstance(feature, Sequence) and isinstance(feature.feature, ClassLabel):
            maps[column] = feature.feature.names
        elif isinstance(feature, list) and feature and isinstance(feature[0], ClassLabel):
            maps[column] = feature[0].names
    for column, names in recipe["data"]["label_names"].items():
        if column not in ds.column_names:
            raise RecipeError(f"data.label_names.{column}", "is not a column of the dataset",
                              f"columns: {', '.join(ds.column_names)}")
        maps[column] = names
    if not maps:
        return ds

    def to_name(value, names, column):
        if isinstance(value, list):
            return [to_name(v, names, column) for v in value]
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                return None  # datasets' "no gold label" (-1, e.g. in SNLI/GLUE): an empty target, dropped and counted
            if value >= len(names):
                raise RecipeError(f"data.label_names.{column}", f"value {value} has no name ({len(names)} names)",
                                  "list one name per class id")
            return names[value]
        return value

    def convert(batch):
        return {c: [to_name(v, names, c) for v in batch[c]] for c, names in maps.items()}

    from datasets import List, Value

    features = ds.features.copy()
    for column in maps:
        is_list = isinstance(ds[0][column], list) if len(ds) else False
        features[column] = List(Value("string")) if is_list else Value("string")
    return ds.map(convert, batched=True, features=features, keep_in_memory=True, load_from_cache_file=False)


def check_columns(ds, recipe: dict, role: str) -> None:
    check_fields(ds.column_names, ds[0] if len(ds) else None, recipe, role)


def check_fields(columns: list[str], first_row: dict | None, recipe: dict, role: str) -> None:
    """The prompt's fields (or chat column) against the ``role`` data's columns; ``first_row`` (None: unknown)
    tells a column of chat conversations that a template would paste in as text."""
    import difflib

    columns = set(columns)
    if chat.is_chat(recipe):
        names = [("messages", recipe["prompt"]["messages"])]
        if role in methods.pair_roles(recipe):
            names += [(key, template_fields(recipe["prompt"][key], f"prompt.{key}")[0]) for key in ("chosen", "rejected")]
        for key, name in names:
            if name not in columns:
                close = difflib.get_close_matches(name, sorted(columns), n=1)
                raise RecipeError(f"prompt.{key}", f"{name!r} is not a column of the {role} data",
                                  f"did you mean {close[0]!r}?" if close else f"columns: {', '.join(sorted(columns))}")
        return
    # the pair roles of a preference method: the prompt and both answers (runner.data.preference)
    keys = ("template", "chosen", "rejected") if role in methods.pair_roles(recipe) else ("template", "completion")
    for key in keys:
        for name in template_fields(recipe["prompt"][key], f"prompt.{key}"):
            if name not in columns:
                close = difflib.get_close_matches(name, sorted(columns), n=1)
                hint = f"did you mean {{{close[0]}}}?" if close else f"columns: {', '.join(sorted(columns))}"
                raise RecipeError(f"prompt.{key}", f"field {{{name}}} is not a column of the {role} data", hint)
            if first_row is not None and chat.looks_like_chat(first_row.get(name)):
                raise RecipeError(f"prompt.{key}", f"field {{{name}}} holds chat conversations (role/content turns), "
                                  "which a prompt template would paste in as text",
                                  f"set prompt.messages: {name} (and prompt.chat_template) instead of "
                                  "prompt.template and prompt.completion")


def check_files(recipe: dict) -> None:
    """What `runner validate` can tell of the data without loading it (no datasets, no torch): every local file the
    recipe reads exists, and its columns give the prompt's fields. Hub datasets are left to loading."""
    data = recipe["data"]
    if data.get("sources") is None:
        for role, path, where in local_files(data):
            columns = peek(local_file(path, where), where)
            if columns is not None:
                check_fields(*columns, recipe, role)
        return
    for i, name in enumerate(mixture.source_names(recipe)):
        key = f"data.sources[{i}].source"
        for _, path, where in local_files(mixture.sub_recipe(recipe, i)["data"], key):
            columns = peek(local_file(path, where), where)
            if columns is not None:
                mixture.check_columns(columns[0], recipe, i, name)


# ---------------------------------------------------------------- rendering


_LONGEST_TOKEN: dict[int, tuple[object, int]] = {}


def longest_token(tokenizer) -> int:
    """Characters in the tokenizer's longest vocabulary entry: no token covers more of a text (byte-level entries
    are written one character per byte, so this bounds the decoded characters too)."""
    cached = _LONGEST_TOKEN.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        cached = (tokenizer, max((len(t) for t in tokenizer.get_vocab()), default=1))
        _LONGEST_TOKEN[id(tokenizer)] = cached
    return max(cached[1], 1)


def char_cap(tokenizer, max_length: int) -> int:
    """How many characters of one field can matter for an example of ``max_length`` tokens. Any longer text holds
    at least twice the tokens that fit (each token covers at most longest_token characters), so cutting it there
    before tokenizing changes nothing that is kept: a truncated field keeps at most max_length tokens, far from
    the cut, and an example that cannot fit still cannot. Tokenizing a 30 MB record whole took minutes and GBs."""
    return 2 * (max_length + 1) * longest_token(tokenizer) + 64


def cap_text(value, cap: int, separator: str):
    """``value`` as the template would render it, cut to ``cap`` characters when it is longer; else unchanged."""
    if isinstance(value, (str, list)):
        joined = text(value, separator)
        if len(joined) > cap:
            return joined[:cap]
    return value


def shorten(row: dict, prompt_cfg: dict, tokenizer, count: int, budget: int, completion: str | None = None):
    """Cut ``prompt.truncate``'s field of ``row`` from its end, in tokens, until the prompt's ``count`` fits
    ``budget``: the prompt alone, or with ``completion`` given, prompt + completion + EOS (as training counts
    it). Returns (the shortened prompt, its count), or (None, count) when there is nothing to cut."""
    return shorten_many([row], prompt_cfg, tokenizer, [count], budget, None if completion is None else [completion])[0]


def shorten_many(rows: list[dict], prompt_cfg: dict, tokenizer, counts: list[int], budget: int,
                 completions: list[str] | None = None) -> list[tuple[str | None, int]]:
    """``shorten`` for several rows at once: each step tokenizes all the rows still too long in one batch (a fast
    tokenizer's batch is several times quicker than its rows one by one), with the same results row by row."""
    sep, field_name = prompt_cfg["list_separator"], prompt_cfg["truncate"]
    ids = tokenizer([text(row.get(field_name), sep) for row in rows], add_special_tokens=False)["input_ids"]
    out: list[tuple[str | None, int]] = [(None, count) for count in counts]
    active = list(range(len(rows)))
    for _ in range(4):  # re-tokenizing the joined text can shift a token or two at the cut
        cut = []
        for i in active:
            keep = len(ids[i]) - (out[i][1] - budget)
            if keep > 0:
                ids[i] = ids[i][:keep]
                cut.append(i)
        if not cut:
            break
        prompts = [render(prompt_cfg["template"], {**rows[i], field_name: text_}, sep)
                   for i, text_ in zip(cut, tokenizer.batch_decode([ids[i] for i in cut]), strict=True)]
        if completions is None:
            lengths = [len(x) for x in tokenizer(prompts)["input_ids"]]
        else:
            joined = [p + completions[i] for p, i in zip(prompts, cut, strict=True)]
            lengths = [len(x) + 1 for x in tokenizer(joined)["input_ids"]]
        for i, prompt, count in zip(cut, prompts, lengths, strict=True):
            out[i] = (prompt, count)
        active = [i for i, count in zip(cut, lengths, strict=True) if count > budget]
        if not active:
            break
    return out


def fit_batch(rows: dict, recipe: dict, tokenizer) -> dict:
    """Render a batch; shorten ``prompt.truncate`` (in tokens) until prompt + completion + EOS fits max_length."""
    prompt_cfg = recipe["prompt"]
    sep, max_length, field_name = prompt_cfg["list_separator"], prompt_cfg["max_length"], prompt_cfg["truncate"]
    n = len(next(iter(rows.values())))
    cap = char_cap(tokenizer, max_length)
    examples = [{k: cap_text(rows[k][i], cap, sep) for k in rows} for i in range(n)]
    prompts = [render(prompt_cfg["template"], ex, sep) for ex in examples]
    completions = [render(prompt_cfg["completion"], ex, sep) for ex in examples]
    counts = [len(ids) + 1 for ids in tokenizer([p + c for p, c in zip(prompts, completions, strict=True)])["input_ids"]]
    truncated = [False] * n
    long = [i for i in range(n) if counts[i] > max_length and field_name is not None and completions[i].strip()]
    if long:
        fitted = shorten_many([examples[i] for i in long], prompt_cfg, tokenizer, [counts[i] for i in long],
                              max_length, [completions[i] for i in long])
        for i, (cut, count) in zip(long, fitted, strict=True):
            if cut is not None:
                prompts[i], counts[i], truncated[i] = cut, count, True
    ids = rows.get("id") or [None] * n
    return {"prompt": prompts, "completion": completions, "n_tokens": counts, "truncated": truncated,
            "id": [str(x) if x is not None else None for x in ids]}


def prepare(recipe: dict, tokenizer, roles=ROLES, raw: dict | None = None) -> Prepared:
    """Rendered, fitted examples for ``roles``; examples that still don't fit, or have an empty target, dropped."""
    raw = raw if raw is not None else sample(load_raw(recipe), recipe)
    limit = recipe["data"]["max_tokens"] or recipe["prompt"]["max_length"]
    if methods.method(recipe) == "pretrain":  # raw text is cut into max_length rows in training, never dropped
        limit = float("inf")
    out = Prepared()
    digest = hashlib.sha256(json.dumps(recipe["data"], sort_keys=True, default=str).encode())
    for role in roles:
        if raw.get(role) is None:
            continue
        ds = name_labels(raw[role], recipe)
        check_columns(ds, recipe, role)
        shares = mixture.shares(ds, recipe)
        rendered = ds.map(chat.render_batch if chat.is_chat(recipe) else fit_batch, batched=True, batch_size=256,
                          remove_columns=ds.column_names,
                          fn_kwargs={"recipe": recipe, "tokenizer": tokenizer},
                          keep_in_memory=True, load_from_cache_file=False, num_proc=cpu.data_workers(len(ds)))
        empty = rendered.filter(lambda c: not c.strip(), input_columns="completion", keep_in_memory=True)
        kept = rendered.filter(lambda c, n: bool(c.strip()) and n <= limit, input_columns=["completion", "n_tokens"],
                               keep_in_memory=True)
        out.splits[role] = kept
        out.stats[role] = {"rows": len(rendered), "kept": len(kept), "truncated": sum(rendered["truncated"]),
                           "dropped_too_long": len(rendered) - len(kept) - len(empty),
                           "dropped_empty_completion": len(empty), **({"sources": shares} if shares else {})}
        digest.update(role.encode())
        for prompt, completion in zip(kept["prompt"], kept["completion"], strict=True):
            digest.update(f"{prompt}\0{completion}\0".encode())
        if not len(kept):
            raise RecipeError(f"data.splits.{role}", f"no {role} example is left after filtering "
                              f"({out.stats[role]})", "raise prompt.max_length / data.max_tokens or set prompt.truncate")
    out.fingerprint = digest.hexdigest()[:16]
    return out


def describe(stats: dict) -> str:
    parts = []
    for role, s in stats.items():
        part = f"{role}: {s['kept']} examples"
        extra = [f"{s['truncated']} truncated"] if s["truncated"] else []
        if s["dropped_too_long"]:
            extra.append(f"{s['dropped_too_long']} dropped as too long")
        if s["dropped_empty_completion"]:
            extra.append(f"{s['dropped_empty_completion']} dropped for an empty target")
        if s.get("sources"):
            total = max(sum(s["sources"].values()), 1)
            extra.append("drawn from " + ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in s["sources"].items()))
        parts.append(part + (f" ({', '.join(extra)})" if extra else ""))
    return "; ".join(parts)
