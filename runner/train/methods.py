"""training.method on TRL's own trainers: the config class and trainer for each method, the datasets each takes,
and what a preference trainer leaves to tidy before the adapter is saved.

sft and pretrain run on SFTTrainer (runner.train.sft.Trainer); pretrain is raw text, the loss on every token,
documents cut and packed into prompt.max_length rows (TRL's "wrapped" packing). dpo and kto run on TRL's DPOTrainer
and KTOTrainer, orpo on trl.experimental.orpo's ORPOTrainer; their losses and metrics (rewards, margins, log-probs,
reward accuracy) are TRL's. Given the LoRA model (a PeftModel) and no reference model, DPOTrainer and KTOTrainer
add a frozen copy of the starting adapter named "ref" and compute the reference pass with it: the starting adapter
(model.adapter) is the reference, or with a new LoRA (B = 0) the base itself; no second base model is loaded.
"""

from __future__ import annotations

from runner.data import preference
from runner.recipe.methods import method

# SFTConfig's own keys, which the preference configs do not take.
SFT_ONLY = ("packing", "completion_only_loss", "assistant_only_loss")
REFERENCE_ADAPTER = "ref"  # the name DPOTrainer and KTOTrainer give the frozen copy of the starting adapter


def config(recipe: dict, kwargs: dict):
    """The method's TRL config from the arguments every method shares (built by runner.train.train)."""
    from trl import SFTConfig

    name = method(recipe)
    if name == "sft":
        return SFTConfig(**kwargs)
    if name == "pretrain":
        return SFTConfig(**{**kwargs, "packing": True, "packing_strategy": "wrapped", "completion_only_loss": False,
                            "assistant_only_loss": False, "dataset_text_field": "text"})
    common = {k: v for k, v in kwargs.items() if k not in SFT_ONLY}
    if name == "dpo":
        from trl import DPOConfig

        s = recipe["training"]["dpo"]
        return DPOConfig(**common, beta=s["beta"], loss_type=[s["loss_type"]], label_smoothing=s["label_smoothing"],
                         precompute_ref_log_probs=s["precompute_reference"])
    if name == "kto":
        from trl import KTOConfig

        s = recipe["training"]["kto"]
        return KTOConfig(**common, beta=s["beta"], desirable_weight=s["desirable_weight"],
                         undesirable_weight=s["undesirable_weight"])
    ORPOConfig = _experimental().ORPOConfig
    return ORPOConfig(**common, beta=recipe["training"]["orpo"]["beta"])


def _experimental():
    """trl.experimental.orpo, where TRL 1.x keeps ORPO, without the warning its import prints: the recipe chose it."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental")
        from trl.experimental import orpo
    return orpo


def speed_for(recipe: dict, speed):
    """``speed`` as the method runs it: TRL's preference trainers run several forward passes a step (policy and
    reference), which CUDA graphs replayed per micro-batch would overwrite; compiled layers stay."""
    from dataclasses import replace

    return speed if method(recipe) in ("sft", "pretrain") else replace(speed, cuda_graphs=False)


def trainer_class(recipe: dict):
    """The trainer of training.method: runner.train.sft.Trainer, or TRL's preference trainer with the two
    attributes runner.train.train sets on every trainer."""
    name = method(recipe)
    if name in ("sft", "pretrain"):
        from runner.train.sft import Trainer

        return Trainer
    if name == "dpo":
        from trl import DPOTrainer as base
    elif name == "kto":
        from trl import KTOTrainer as base
    else:
        base = _experimental().ORPOTrainer

    return type(f"{base.__name__}Run", (base,), {"graph_steps": False, "extra_metrics": None})


def datasets(recipe: dict, prepared) -> tuple:
    """(train, eval or None) in the columns the method's trainer reads."""
    return tuple(_columns(recipe, prepared.splits[role]) if role in prepared.splits else None
                 for role in ("train", "eval"))


def _columns(recipe: dict, ds):
    name = method(recipe)
    if name == "kto":
        return preference.unpaired(ds)
    if name in ("dpo", "orpo"):
        return ds.select_columns(["prompt", *preference.SIDES])
    if name == "pretrain":  # the whole example is text: prompt and completion alike
        return ds.map(lambda p, c: {"text": p + c}, input_columns=["prompt", "completion"],
                      remove_columns=ds.column_names, keep_in_memory=True)
    return ds.select_columns(["messages"] if recipe["prompt"].get("messages") is not None else ["prompt", "completion"])


def drop_reference(model) -> None:
    """The frozen reference adapter removed before the adapter is saved and evaluated: the run's adapter is the
    policy alone (saved as "default", where every loader looks)."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)
        model.set_adapter("default")
