"""The evaluators a recipe names: which class each name stands for (a built-in of evaluators.BUILTINS, or a user's
``package.module:ClassName``, imported), and each one's keys checked against its class's ``params_schema``."""

from __future__ import annotations

import difflib
import importlib
import re
import sys
from pathlib import Path

from evaluators import BUILTINS, builtin
from evaluators.base import Evaluator, declaration_problem
from runner.common.errors import RecipeError, short
from runner.recipe.loader import _show
from runner.recipe.validation import error_rank, fill_defaults, validator_class
from runner.recipe.wording import to_recipe_error


def evaluator_class(name: str, key_path: str) -> type[Evaluator]:
    """The class a recipe's evaluator name stands for: a built-in's (evaluators.BUILTINS), or a user's
    ``package.module:ClassName``."""
    if ":" in name:
        return import_evaluator(name, key_path)
    if name not in BUILTINS:
        close = difflib.get_close_matches(name, list(BUILTINS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? Or" if close else f"one of: {', '.join(BUILTINS)}; or"
        raise RecipeError(key_path, f"{_show(name)} is not allowed", f"{hint} give your own as package.module:ClassName")
    return builtin(name)


def evaluator_classes(recipe: dict) -> list[tuple[dict, type[Evaluator]]]:
    """(spec, class) of each of the recipe's evaluators, in order."""
    return [(spec, evaluator_class(spec["name"], f"evaluation.evaluators[{i}].name"))
            for i, spec in enumerate(recipe["evaluation"]["evaluators"])]


_EVALUATOR_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def import_evaluator(spec_name: str, key_path: str):
    """The class a recipe names as ``package.module:ClassName``. Importing it runs that module: a recipe naming
    one is trusted like a script. The working directory is searched after the installed packages, so a stray
    file there (a ``trl.py``) cannot take a library's place."""
    if not _EVALUATOR_REF.fullmatch(spec_name):
        raise RecipeError(key_path, f"{_show(spec_name)} is not a package.module:ClassName reference",
                          "e.g. myevals.length:LengthRatio, or a built-in name")
    module_name, _, class_name = spec_name.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # a user's evaluator lives beside their recipes
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RecipeError(key_path, f"cannot import {module_name!r}: {short(exc, 150)}",
                          "the module must be importable from the working directory") from None
    except (Exception, SystemExit) as exc:  # the user's module failed while it ran
        raise RecipeError(key_path, f"importing {module_name!r} failed: {type(exc).__name__}: {short(exc, 150)}",
                          "fix that module; it runs when the recipe is loaded") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise RecipeError(key_path, f"{module_name!r} has no {class_name!r}", "check the class name after ':'")
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
        what = "a class but not an Evaluator" if isinstance(cls, type) else f"a {type(cls).__name__}, not a class"
        raise RecipeError(key_path, f"{spec_name} is {what}",
                          "name a class that subclasses evaluators.base.Evaluator")
    return cls


def check_declaration(evaluator, i: int, name: str) -> None:
    """A one-line error at ``evaluation.evaluators[i]`` when the evaluator (or its class) declares its metrics,
    headline or baselines malformed (evaluators.base: the class at load, the built evaluator again)."""
    problem = declaration_problem(evaluator)
    if problem:
        raise RecipeError(f"evaluation.evaluators[{i}]", f"{name}'s metric declaration is malformed: {problem}",
                          "declare metrics = (Metric(name, better='higher' or 'lower', scale=...), ...) as "
                          "evaluators.base.Evaluator describes")


def settle_params(resolved: dict) -> None:
    """Each evaluator's keys against its class's ``params_schema`` (built-ins and a user's own alike), its defaults
    then filled into ``resolved`` (validate's own copy of the recipe)."""
    for i, (spec, cls) in enumerate(evaluator_classes(resolved)):
        check_declaration(cls, i, spec["name"])
        params_schema = getattr(cls, "params_schema", None)
        if params_schema is None:
            continue
        where = f"evaluation.evaluators[{i}].name"
        if not isinstance(params_schema, dict) or not isinstance(params_schema.get("properties", {}), dict):
            raise RecipeError(where, f"{spec['name']}.params_schema is not a JSON Schema mapping",
                              "give {'properties': {...}} or None")
        full = {"type": "object", "additionalProperties": False, **params_schema}
        full["properties"] = {**full.get("properties", {}), "name": {"type": "string"}}
        validator = validator_class()(full)
        try:
            validator.check_schema(full)
            errors = sorted(validator.iter_errors(spec), key=error_rank)
        except Exception as exc:  # jsonschema's SchemaError, or worse, from the user's schema
            raise RecipeError(where, f"{spec['name']}.params_schema is not a valid JSON Schema: {short(exc, 120)}",
                              "fix the class's params_schema") from None
        if errors:
            err = to_recipe_error(errors[0], spec, of_recipe=False)
            raise RecipeError(f"evaluation.evaluators[{i}].{err.key_path}".rstrip("."), err.problem, err.hint)
        fill_defaults(spec, full, validator)
