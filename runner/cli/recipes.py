"""A recipe as every command loads it: the recipe layer's load and validate with every recipe check, the recipe's
own and the stages', in CHECKS.

The recipe layer (runner.recipe) knows the schema and the rules between its keys. A rule that needs a stage's
knowledge (which chat templates exist, how a mixture maps its sources, what an evaluation backend can do) lives in
that stage, as a function of the resolved recipe that raises a RecipeError and writes nothing. CHECKS is the one
list of them all, in the order they run: the first that fails is the error a user sees, and a check may rely on
the ones before it having passed.
"""

from __future__ import annotations

from pathlib import Path

from runner.data import chat, mixture
from runner.evaluate import backend
from runner.recipe import checks, recipe

CHECKS: tuple[recipe.Check, ...] = (
    checks.check_prompt,    # prompt.messages (chat data) or template + completion; the template's fields
    chat.check_recipe,      # the chat template: a built-in, the tokenizer's own, or Jinja with generation markers
    mixture.check_recipe,   # data.source or data.sources; each source's fields mapping
    checks.check_settings,  # splits each setting needs, early stopping, LoRA init, data.max_tokens, rank mode
    backend.check_recipe,   # what generation.backend needs: weights it can merge, no beams to compile
)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved recipe of ``path`` with ``overrides``, through every check."""
    return recipe.load(path, overrides, checks=CHECKS)


def validate(raw: dict) -> dict:
    """A recipe given as values (not a file) resolved through every check; ``raw`` is left as it was."""
    return recipe.validate(raw, checks=CHECKS)
