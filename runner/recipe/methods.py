"""training.method's rules between keys: which roles hold preference pairs, what each method needs of the prompt,
the splits and the other training keys, and what starting from an adapter (model.adapter) needs."""

from __future__ import annotations

from runner.common.errors import RecipeError
from runner.recipe.templates import template_fields

PREFERENCE = ("dpo", "orpo", "kto")


def method(recipe: dict) -> str:
    return recipe["training"]["method"]


def is_preference(recipe: dict) -> bool:
    return method(recipe) in PREFERENCE


def pair_roles(recipe: dict) -> tuple[str, ...]:
    """The roles whose rows are preference pairs: train and eval (the trainer's pairs, eval's held out), under a
    preference method; the evaluation split is rendered with prompt.completion, as for sft."""
    return ("train", "eval") if is_preference(recipe) else ()


def check_recipe(recipe: dict) -> None:
    """What training.method and model.adapter need of the rest of the recipe. Needs check_prompt passed."""
    name, training, prompt = method(recipe), recipe["training"], recipe["prompt"]
    if recipe["model"]["adapter"] is not None and recipe["lora"] is None:
        raise RecipeError("model.adapter", "starting from an adapter trains that adapter further, which needs LoRA",
                          "add a lora section (its settings give way to the adapter's own), or remove model.adapter")
    if name == "pretrain":
        if prompt.get("messages") is not None:
            raise RecipeError("training.method", "pretrain trains on raw text, and prompt.messages is chat data",
                              "use prompt.template: '{text}' naming the text column")
        return
    if name not in PREFERENCE:
        return
    if recipe["evaluation"]["split"] in pair_roles(recipe):
        raise RecipeError("evaluation.split", f"is {recipe['evaluation']['split']!r}, whose rows are {name}'s "
                          "preference pairs", "evaluate the test split (data.splits.test), scored as for sft")
    if training["packing"]:
        raise RecipeError("training.packing", f"{name} compares each pair's two sides as whole sequences",
                          "set training.packing: false")
    if training["early_stopping"] is not None:
        raise RecipeError("training.early_stopping", f"is not supported with training.method {name}",
                          "remove it; the report shows the eval pairs' reward accuracy at every evaluation")
    if training.get("task_metrics"):  # the eval split holds pairs, which the task's evaluators cannot score
        raise RecipeError("training.task_metrics", f"is not supported with training.method {name}: the eval split "
                          "holds preference pairs", "remove it; the report shows the eval pairs' reward accuracy")
    for side in ("chosen", "rejected"):
        fields = template_fields(prompt[side], f"prompt.{side}")
        if not fields:
            raise RecipeError(f"prompt.{side}", "uses no dataset field", f"reference the column, e.g. '{{{side}}}'")
        if prompt.get("messages") is not None and prompt[side] != f"{{{fields[0]}}}":
            raise RecipeError(f"prompt.{side}", "with chat data names the column holding the final assistant turn",
                              f"write it as '{{{fields[0]}}}'")
