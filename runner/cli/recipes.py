"""A recipe as every command loads it: the recipe layer's load and validate with every recipe check, the recipe's
own and the stages', in CHECKS.

The recipe layer (runner.recipe) knows the schema and the rules between its keys. A rule that needs a stage's
knowledge (which chat templates exist, how a mixture maps its sources, what an evaluation backend can do) lives in
that stage, as a function of the resolved recipe that raises a RecipeError and writes nothing. CHECKS is the one
list of them all, in the order they run: the first that fails is the error a user sees, and a check may rely on
the ones before it having passed.
"""

from __future__ import annotations

import re
from pathlib import Path

from runner.common.errors import RecipeError
from runner.data import chat, mixture
from runner.evaluate import backend, benchmark
from runner.recipe import checks, compose, methods, recipe

CHECKS: tuple[recipe.Check, ...] = (
    checks.check_prompt,    # prompt.messages (chat data) or template + completion; the template's fields
    chat.check_recipe,      # the chat template: a built-in, the tokenizer's own, or Jinja with generation markers
    mixture.check_recipe,   # data.source or data.sources; each source's fields mapping
    checks.check_settings,  # splits each setting needs, early stopping, LoRA init, data.max_tokens, rank mode
    methods.check_recipe,   # training.method's prompt, splits and keys; model.adapter needs LoRA
    backend.check_recipe,   # what generation.backend needs: weights it can merge, no beams to compile
    benchmark.check_recipe,  # evaluation.retention: each benchmark's source file or lm-eval task, its template
)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved recipe of ``path`` with ``overrides``, through every check."""
    return recipe.load(path, overrides, checks=CHECKS)


def validate(raw: dict) -> dict:
    """A recipe given as values (not a file) resolved through every check; ``raw`` is left as it was."""
    return recipe.validate(raw, checks=CHECKS)


def overridden_key(overrides: list[str], extra: str) -> list[str]:
    """``overrides`` with ``extra`` in place of any that sets the same key."""
    name = extra.partition("=")[0]
    return [o for o in overrides if o.partition("=")[0].strip() != name] + [extra]


def for_command(args) -> dict:
    """The resolved recipe of RECIPE plus the key.path=value overrides (torch-free). Without RECIPE, a command given
    a run (--run) uses the recipe that run trained with: its recipe.yaml (overrides included), these overrides on top."""
    # argparse puts "key=value" words that come before options into overrides; anything else is a mistake.
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise RecipeError(bad[0], "an override must look like key.path=value", "e.g. training.max_steps=5")
    compose.check_repeated(args.overrides)
    overrides = list(args.overrides)
    if getattr(args, "no_cache", False) and args.command != "inspect":  # inspect's --no-cache is its own cache's
        overrides = overridden_key(overrides, "data.cache=false")
    if args.recipe:
        return load(args.recipe, overrides)
    path = _run_recipe(args)
    try:
        return load(path, overrides)
    except RecipeError as exc:  # the run's own record, not a recipe the user wrote: say whose it is
        given = {o.partition("=")[0].strip() for o in args.overrides}
        if exc.exit_code != 2 or str(path) in exc.line() or exc.key_path in given:
            raise
        raise RecipeError(exc.key_path, f"{exc.problem}, in the run's record {path}",
                          f"{exc.hint + '; or ' if exc.hint else ''}name the recipe it was trained with: runner "
                          f"{args.command} RECIPE --run {path.parent}") from None


# The commands that take a run (--run): their RECIPE may be left out, the run's own is used.
RUN_COMMANDS = ("eval", "compare", "generate", "export", "push")
_KEY_PATH = re.compile(r"\s*[A-Za-z_]\w*(\[\d+\])*(\.[A-Za-z_]\w*(\[\d+\])*)*\s*=")


def settle_recipe(args) -> None:
    """A run command's first word is RECIPE or, when RECIPE is left out, the first override: ``key.path=value`` (a
    dotted key before the first ``=``, no ``/``) is an override unless a file of that name exists."""
    word = getattr(args, "recipe", None)
    if args.command in RUN_COMMANDS and word and _KEY_PATH.match(word) and not Path(word).is_file():
        args.overrides = [word, *args.overrides]
        args.recipe = None


def _run_recipe(args) -> Path:
    """The recipe.yaml of the run given with --run (the first of two), for a command given no RECIPE."""
    from runner.store import runs

    run = getattr(args, "run", None)
    run = run[0] if isinstance(run, list) else run
    if not run:
        raise RecipeError("RECIPE", "missing", f"give the recipe file: runner {args.command} RECIPE ...; with --run DIR "
                          "it may be left out to use that run's own recipe")
    path = runs.find_run(run) / "recipe.yaml"
    if runs.saved_recipe(path.parent) is None:
        raise RecipeError("--run", f"{run} has no readable recipe.yaml to take the recipe from",
                          f"name the recipe it was trained with: runner {args.command} RECIPE --run {run}")
    return path
