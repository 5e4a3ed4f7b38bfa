"""Dataset mixtures (``data.sources``): several datasets, each mapped onto the recipe's template fields, drawn in
proportion to their weights, reproducibly from the sample seed.

Every role (train, eval, test) of the mixture takes ``<role>_samples`` examples: each source's share is its weight
over the weights of the sources that have that role, rounded so the counts add up (largest remainders). A source
gives its count as a seeded shuffle of its rows; one too small for its share repeats its rows (shuffled again for
each pass), as peers' "interleave with oversampling" does. With ``<role>_samples: null`` the mixture is as large as
the sources allow without repeating a row: it stops where the first source runs out. The sources' rows are then
joined (``datasets.concatenate_datasets``) and shuffled from the seed.

Loading each source is runner.data.data's job (the same code as ``data.source``); here: the recipe rules, the column
mapping and the weighted draw. Rows carry their source's name in ``SOURCE_COLUMN`` so ``runner inspect`` and the data
summary can show each source's share.
"""

from __future__ import annotations

import difflib
import math
import string
from pathlib import Path

from runner.common.errors import RecipeError, short

SOURCE_COLUMN = "_source"


# ---------------------------------------------------------------- recipe rules (no data, no torch)


def needed_fields(recipe: dict) -> list[str]:
    """The columns an example needs: the template's and completion's fields, or the chat column."""
    prompt = recipe["prompt"]
    if prompt.get("messages"):
        return [prompt["messages"]]
    fields: list[str] = []
    for key in ("template", "completion"):
        for _, name, _, _ in string.Formatter().parse(prompt.get(key) or ""):
            if name and name not in fields:
                fields.append(name)
    return fields


def source_names(recipe: dict) -> list[str]:
    """Each source's name: ``name``, else its file's name (folder/file when files share a name) or hub id."""
    names = []
    for i, spec in enumerate(recipe["data"]["sources"] or []):
        name = spec.get("name")
        if not name:
            src = spec["source"]
            path = Path(src.get("train") or next(iter(src.values()))) if isinstance(src, dict) else Path(src)
            name = str(src) if not isinstance(src, dict) and "/" in str(src) and not path.suffix else path.stem
            if isinstance(src, dict) or name in ("train", "data") or name in names:
                name = f"{path.parent.name}/{path.stem}"
        if name in names:
            name = f"{name}#{i}"
        names.append(name)
    return names


def check_recipe(recipe: dict) -> None:
    """data.source xor data.sources; each source's field mapping names template fields. A recipe check
    (runner.cli.recipes); the roles no source provides are already null (runner.recipe.checks.used_splits)."""
    data = recipe["data"]
    sources = data.get("sources")
    if data.get("source") is not None and sources is not None:
        raise RecipeError("data.sources", "is set together with data.source",
                          "use one: data.source for one dataset, data.sources for a mixture of several")
    if sources is None:
        if data.get("source") is None:
            raise RecipeError("data.source", "missing required key",
                              "a hub dataset id or a local file; or data.sources for a mixture of several")
        return
    if data["config"] is not None:
        raise RecipeError("data.config", "applies to data.source; a mixture gives each source its own",
                          "set data.sources[i].config instead")
    weights = [spec["weight"] for spec in sources]
    if max(weights) / min(weights) > MAX_WEIGHT_RATIO:  # inf too: 1e308 over 1e-308 overflows
        i = weights.index(min(weights))
        raise RecipeError(f"data.sources[{i}].weight", f"{weights[i]:g} is a share of under one in "
                          f"{MAX_WEIGHT_RATIO:.0e} of the largest weight ({max(weights):g}): it would draw no rows",
                          "weights are relative shares, e.g. 1 and 3; leave out a source that should draw nothing")
    fields = needed_fields(recipe)
    for i, spec in enumerate(sources):
        for field in spec["fields"]:
            if field not in fields:
                close = difflib.get_close_matches(field, fields, n=1)
                raise RecipeError(f"data.sources[{i}].fields.{field}", "is not a field the prompt uses",
                                  f"did you mean {close[0]!r}?" if close else f"fields: {', '.join(fields)}")


def sub_recipe(recipe: dict, index: int) -> dict:
    """The recipe as if source ``index`` were its only data.source (for loading it with data.source's code)."""
    spec = recipe["data"]["sources"][index]
    return {**recipe, "data": {**recipe["data"], "source": spec["source"], "config": spec["config"], "sources": None}}


# ---------------------------------------------------------------- the columns of one source


def check_columns(columns: list[str], recipe: dict, index: int, name: str) -> None:
    """Source ``index``'s columns, once its fields mapping renames them, give every field the prompt uses."""
    mapping = recipe["data"]["sources"][index]["fields"]
    columns = set(columns)
    for field, column in mapping.items():
        if column not in columns:
            close = difflib.get_close_matches(column, sorted(columns), n=1)
            raise RecipeError(f"data.sources[{index}].fields.{field}", f"{short(column, 40)!r} is not a column of "
                              f"{name}", f"did you mean {close[0]!r}?" if close else
                              f"columns: {', '.join(sorted(columns))[:200]}")
    renamed_away = {column for field, column in mapping.items() if column != field}
    missing = [f for f in needed_fields(recipe) if f not in mapping and (f not in columns or f in renamed_away)]
    if missing:
        raise RecipeError(f"data.sources[{index}].fields", f"{name} has no column {missing[0]!r}, which the prompt "
                          "uses", f"map it to one of its columns: fields: {{{missing[0]}: <column>}} "
                          f"(columns: {', '.join(sorted(columns))[:150]})")


def conform(ds, recipe: dict, index: int, name: str):
    """Source ``index``'s rows with its columns renamed to the prompt's fields, only those kept, an id that says
    where the row came from (``<source>-<id or row>``), and its name in SOURCE_COLUMN."""
    check_columns(ds.column_names, recipe, index, name)
    mapping = recipe["data"]["sources"][index]["fields"]
    fields = needed_fields(recipe)
    rename = {column: field for field, column in mapping.items() if column != field}
    # A column already named like a field that another column is mapped to gives way to the mapped one.
    ds = ds.remove_columns([c for c in ds.column_names if c in rename.values() and c not in rename])
    ds = ds.rename_columns(rename)
    ids = ds["id"] if "id" in ds.column_names else [None] * len(ds)
    ds = ds.select_columns(fields)
    ds = ds.add_column("id", [f"{name}-{row if x is None else x}" for row, x in enumerate(ids)])
    return ds.add_column(SOURCE_COLUMN, [name] * len(ds))


# ---------------------------------------------------------------- the weighted draw


# The largest weight over the smallest: past it the small source's share is no row, and the sums overflow.
MAX_WEIGHT_RATIO = 1e9


def _relative(weights: list[float]) -> list[float]:
    """The weights over the largest: in (0, 1], so that their sum cannot overflow (1e308 + 1e308 is inf)."""
    top = max(weights)
    return [w / top for w in weights]


def allocate(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights``, in whole counts that add up (largest remainders)."""
    weights = _relative(weights)
    shares = [total * w / sum(weights) for w in weights]
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(ds, count: int, seed: int):
    """``count`` rows of ``ds`` in a seeded order; each full pass over the rows in a new shuffle."""
    from datasets import concatenate_datasets

    passes = [ds.shuffle(seed=seed + p, keep_in_memory=True) for p in range(-(-count // len(ds)))]
    return concatenate_datasets(passes).select(range(count)) if passes else ds.select([])


def mix(per_role: dict, recipe: dict, seed: int) -> dict:
    """{role: [(source index, conformed dataset)]} -> {role: one dataset, drawn by weight}."""
    from datasets import concatenate_datasets

    sources = recipe["data"]["sources"]
    out = {}
    for role, items in per_role.items():
        items = [(i, ds) for i, ds in items if len(ds)]
        if not items:
            raise RecipeError(f"data.splits.{role}", f"no source has {role} rows",
                              f"give a source a {role} file or split, or set data.splits.{role}: null")
        weights = _relative([sources[i]["weight"] for i, _ in items])
        total = recipe["data"][f"{role}_samples"]
        if total is None:  # as many as the sources give without repeating a row: until the first runs out
            total = min(math.floor(len(ds) * sum(weights) / w) for (_, ds), w in zip(items, weights, strict=True))
        drawn = [_draw(ds, n, seed) for (_, ds), n in zip(items, allocate(total, weights), strict=True)]
        try:
            joined = concatenate_datasets(drawn)
        except ValueError as exc:  # datasets' "features can't be aligned": a field is text here, a list there
            raise RecipeError("data.sources", f"the sources' {role} columns do not match: {short(exc, 150)}",
                              "map each field to columns of the same kind in every source") from None
        out[role] = joined.shuffle(seed=seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)
    return out


def shares(ds, recipe: dict) -> dict[str, int]:
    """Rows per source in a mixed split, in the order the sources are listed (empty when not a mixture)."""
    if ds is None or SOURCE_COLUMN not in ds.column_names:
        return {}
    column = list(ds[SOURCE_COLUMN])
    return {name: column.count(name) for name in source_names(recipe)}
