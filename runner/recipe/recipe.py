"""Recipes: a YAML file in, the resolved recipe (a plain dict) out.

load: the file read safely (loader), what it ``extends:`` merged in and the ``key.path=value`` overrides applied
(compose), then validate: the schema (validation, its errors worded by wording), the defaults and each evaluator's
own keys (evaluator_refs) filled into a copy, then the checks the caller gives, in order. The recipe's own checks
are in runner.recipe.checks; runner.cli.recipes lists them with every stage's and loads recipes with all of them.

Nothing here imports torch or transformers: ``runner validate`` must answer in well under a second.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runner.recipe import checks as recipe_checks
from runner.recipe.compose import compose
from runner.recipe.evaluator_refs import settle_params
from runner.recipe.loader import check_values, dump
from runner.recipe.validation import error_rank, fill_defaults, schema, settle_exponents, validator_class
from runner.recipe.wording import to_recipe_error

__all__ = ["Check", "load", "validate", "dump", "get"]

# A check reads a resolved recipe and raises the first RecipeError it finds; it never writes into the recipe.
Check = Callable[[dict], None]


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, checks: Sequence[Check]) -> dict:
    """The resolved recipe: inherited, overridden, validated, defaults filled, then ``checks`` run in order."""
    path = Path(path)
    raw = compose(path, overrides)
    check_values(raw)
    if not raw.get("name"):
        raw["name"] = path.name.split(".")[0]
    return validate(raw, checks=checks)


def validate(raw: dict, *, checks: Sequence[Check]) -> dict:
    """``raw`` checked against the schema, resolved (a copy: ``raw`` is left as it was) with the schema's defaults,
    the splits in use and each evaluator's own defaults, then ``checks`` run on it in order; returns it."""
    validator = validator_class()(schema())
    raw = settle_exponents(raw, validator)
    errors = sorted(validator.iter_errors(raw), key=error_rank)
    if errors:
        raise to_recipe_error(errors[0], raw)
    resolved = copy.deepcopy(raw)
    fill_defaults(resolved, schema(), validator)
    resolved["data"]["splits"] = recipe_checks.used_splits(resolved)
    settle_params(resolved)
    for check in checks:
        check(resolved)
    return resolved


def get(recipe: dict, key_path: str) -> Any:
    node = recipe
    for part in key_path.split("."):
        node = node[part]
    return node
