"""The rules between a recipe's keys that a schema cannot express and that need no stage's knowledge: the prompt's
shape and fields, the splits each setting needs, early stopping, the LoRA inits, rank mode.

Each check reads the resolved recipe and raises the first RecipeError it finds; none writes into it. The stages add
their own rules (chat templates, mixtures, evaluation backends); runner.cli.recipes lists every check in the one
order they run. Also here: what the resolved recipe holds that is worked out rather than written (used_splits)
and the labels rank mode chooses from.
"""

from __future__ import annotations

from runner.common.errors import RecipeError
from runner.recipe.evaluator_refs import evaluator_classes
from runner.recipe.templates import template_fields

ROLES = ("train", "eval", "test")


def is_chat(recipe: dict) -> bool:
    """Chat data: ``prompt.messages`` names the column of conversations (no template, no completion)."""
    return recipe["prompt"].get("messages") is not None


def used_splits(recipe: dict) -> dict:
    """data.splits with each role that no file provides set to null (unused): a {train, eval, test} data.source
    without that file, or a mixture none of whose sources has it, unless data.holdout carves it out of train."""
    data = recipe["data"]
    splits, holdout, sources = dict(data["splits"]), data["holdout"], data.get("sources")
    if isinstance(data.get("source"), dict):
        for role, name in splits.items():
            if name is not None and role not in data["source"] and not holdout.get(role):
                splits[role] = None
    if sources is not None and data.get("source") is None:
        for role in ROLES:
            provided = any(not isinstance(s["source"], dict) or role in s["source"] for s in sources)
            if splits.get(role) is not None and not provided and (role == "train" or not holdout.get(role)):
                splits[role] = None
    return splits


def check_prompt(recipe: dict) -> None:
    """prompt.messages (chat data) or prompt.template + completion, never both; the template's fields."""
    prompt = recipe["prompt"]
    if is_chat(recipe):
        for key in ("template", "completion"):
            if prompt.get(key) is not None:
                raise RecipeError(f"prompt.{key}", "is set, but prompt.messages makes this a chat recipe, whose "
                                  "turns the chat template renders", f"remove prompt.{key} (or prompt.messages to "
                                  "use it)")
        if prompt.get("truncate") is not None:
            raise RecipeError("prompt.truncate", "chat data is not truncated (a conversation longer than "
                              "prompt.max_length is dropped and counted)", "remove prompt.truncate")
        return
    if prompt.get("chat_template") is not None:
        raise RecipeError("prompt.chat_template", "is set, but the recipe has no chat data",
                          "set prompt.messages to the column of conversations, or remove prompt.chat_template")
    for key in ("template", "completion"):
        if prompt.get(key) is None:
            raise RecipeError(f"prompt.{key}", "missing required key",
                              "the prompt template and its completion; or prompt.messages for chat data")
    fields = template_fields(prompt["template"], "prompt.template")
    completion_fields = template_fields(prompt["completion"], "prompt.completion")
    if not prompt["completion"].strip():
        raise RecipeError("prompt.completion", "is empty", "the completion is what the model learns to write")
    if not completion_fields:
        raise RecipeError("prompt.completion", "uses no dataset field", "reference the target column, e.g. ' {summary}'")
    if prompt["truncate"] is not None and prompt["truncate"] not in fields:
        raise RecipeError("prompt.truncate", f"{prompt['truncate']!r} is not a field of prompt.template",
                          f"template fields: {', '.join(fields) or 'none'}")


def check_settings(recipe: dict) -> None:
    """The rules between sections: quantization and LoRA, the splits that evaluation, eval_every, early stopping
    and scoring evaluators need, data.max_tokens, rank mode. Needs check_prompt passed (the prompt's shape)."""
    data, training = recipe["data"], recipe["training"]
    if recipe["quantization"]["method"] != "none" and recipe["lora"] is None:
        raise RecipeError("lora", "a quantized model cannot be fully fine-tuned",
                          "add a lora section or set quantization.method: none")
    splits, holdout = data["splits"], data["holdout"]
    # A null split is not used at all: data.holdout carves rows only for a split that is named (and missing from
    # the source), so holdout rows never stand in for a null split.
    for carved in ("eval", "test"):
        if holdout.get(carved) and splits.get(carved) is None:
            raise RecipeError(f"data.holdout.{carved}", f"carves {holdout[carved]} {carved} rows, but "
                              f"data.splits.{carved} is null (the {carved} split is not used)",
                              f"set data.splits.{carved} to a split name, which a source without that split gets as "
                              f"the carved rows; or remove data.holdout.{carved}")
    role = recipe["evaluation"]["split"]
    if splits.get(role) is None:
        raise RecipeError("evaluation.split", f"evaluates the {role!r} split, but data.splits.{role} is null",
                          f"set data.splits.{role} or choose another evaluation.split")
    if training["eval_every"] is not None and splits["eval"] is None:
        raise RecipeError("training.eval_every", "needs an eval split, but data.splits.eval is null",
                          "set data.splits.eval, or training.eval_every: null")
    if training["task_metrics"] is not None and splits["eval"] is None:
        raise RecipeError("training.task_metrics", "needs an eval split, but data.splits.eval is null",
                          "set data.splits.eval (or data.holdout.eval), or training.task_metrics: null")
    _check_early_stopping(training, splits["eval"] is not None)
    _check_lora_init(recipe)
    prompt = recipe["prompt"]
    if data["max_tokens"] is not None and data["max_tokens"] > prompt["max_length"]:
        raise RecipeError("data.max_tokens", f"{data['max_tokens']} is larger than prompt.max_length "
                          f"{prompt['max_length']}", "examples are truncated to prompt.max_length first")
    for i, (spec, cls) in enumerate(evaluator_classes(recipe)):
        scored = spec.get("split") if "logprobs" in cls.needs else None
        if scored and splits.get(scored) is None:
            raise RecipeError(f"evaluation.evaluators[{i}].split", f"scores the {scored!r} split, but "
                              f"data.splits.{scored} is null", f"set data.splits.{scored} or another split")
    _check_rank_mode(recipe)


def rank_labels(recipe: dict) -> list[str] | None:
    """The labels rank mode (``generation.mode: rank``) chooses from: ``generation.labels``, else the ``labels`` of
    the first evaluator whose completion is one label (``classification``)."""
    if recipe["generation"].get("labels"):
        return list(recipe["generation"]["labels"])
    for spec, cls in evaluator_classes(recipe):
        if cls.completion == "label" and spec.get("labels"):
            return list(spec["labels"])
    return None


def _check_rank_mode(recipe: dict) -> None:
    """Rank mode puts each allowed label into the completion: it needs the labels and a one-field completion (chat
    data has no completion template: its completion is the label itself)."""
    if recipe["generation"].get("mode") != "rank":
        return
    if not rank_labels(recipe):
        raise RecipeError("generation.mode", "rank needs the allowed labels",
                          "set generation.labels: [...] or give the classification evaluator its labels")
    if is_chat(recipe):
        return
    completion_fields = template_fields(recipe["prompt"]["completion"], "prompt.completion")
    if len(completion_fields) != 1:
        raise RecipeError("prompt.completion", f"rank mode puts each label into the completion, which must use "
                          f"exactly one field, found {len(completion_fields)}", "e.g. completion: \" {label}\"")


def _check_early_stopping(training: dict, has_eval: bool) -> None:
    """Early stopping decides at evaluations and restores a checkpoint: it needs both, at the same steps."""
    if training["early_stopping"] is None:
        return
    if not has_eval:
        raise RecipeError("training.early_stopping", "needs an eval split to evaluate on, but data.splits.eval is null",
                          "set data.splits.eval (or data.holdout.eval), or training.early_stopping: null")
    if training["save_every"] is not None and training["save_every"] != training["eval_every"]:
        raise RecipeError("training.save_every", f"is {training['save_every']}, but with training.early_stopping a "
                          f"checkpoint is saved at every evaluation (eval_every {training['eval_every']})",
                          "leave save_every null, or set it to eval_every")


def _check_lora_init(recipe: dict) -> None:
    """The LoRA inits that need particular weights (peft refuses the others, or computes nothing useful)."""
    lora, method = recipe["lora"], recipe["quantization"]["method"]
    if lora is None:
        return
    if lora["init"] == "pissa" and method != "none":
        raise RecipeError("lora.init", f"pissa decomposes the full-precision weights; peft refuses {method} ones",
                          "use quantization.method: none with pissa, or init: loftq for a 4-bit base")
    if lora["init"] == "pissa" and lora["dora"]:
        raise RecipeError("lora.init", "pissa with dora: peft cannot convert the trained adapter back to a plain "
                          "LoRA of the original weights", "use one of them")
    if lora["init"] == "loftq" and method != "bnb_4bit":
        raise RecipeError("lora.init", f"loftq fits the LoRA weights to the 4-bit quantization error; with {method} "
                          "there is none", "use quantization.method: bnb_4bit, or init: default / pissa")
