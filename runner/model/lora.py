"""LoRA as the recipe declares it: peft's config, its variants in words, and the target checks against a model's
modules (on the meta device: no weights)."""

from __future__ import annotations

import difflib

from runner.common.errors import RecipeError


def linear_module_names(model) -> list[str]:
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    output = model.get_output_embeddings()
    out_name = next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is output), None)
    return sorted(names - {out_name})


def check_targets(recipe: dict, model) -> None:
    """Every LoRA target must be a Linear of this architecture (checked before any weight loads)."""
    lora = recipe["lora"]
    if lora is None or lora["target_modules"] == "all-linear":
        return
    available = linear_module_names(model)
    for i, name in enumerate(lora["target_modules"]):
        if name not in available:
            close = difflib.get_close_matches(name, available, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"lora.target_modules[{i}]",
                              f"{model.config.model_type} has no linear module {name!r}",
                              f"{hint}available: {', '.join(available)}")


def leaf_module_names(model) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and not any(True for _ in module.children())})


def has_experts(model) -> bool:
    """Mixture of experts as transformers 5 stores it: each layer's experts stacked in 3-D weights."""
    return any(p.dim() == 3 for p in model.parameters())


def lora_on_meta(recipe: dict, meta):
    """The recipe's LoRA applied to a meta-device model (the default init: nothing to compute). peft puts LoRA on
    a mixture of experts' stacked weights (its ParamWrapper) where the targets reach them, e.g. all-linear; that
    wrapper takes no dropout, which is the recipe's to change."""
    from peft import get_peft_model

    try:
        return get_peft_model(meta, lora_config(recipe, counting=True, model=meta))
    except ValueError as exc:
        if "lora_dropout" not in str(exc):
            raise
        raise RecipeError("lora.dropout", f"{recipe['lora']['dropout']}: peft's LoRA on the experts' stacked weights "
                          f"of {meta.config.model_type} (reached by lora.target_modules) takes no dropout",
                          "set lora.dropout: 0, or list attention modules only in lora.target_modules") from None


def lora_variants(lora: dict) -> list[str]:
    """The variants in use, one short phrase each (for `runner validate`, `runner plan` and report.md)."""
    parts = [name for name, on in (("DoRA", lora.get("dora")), ("rsLoRA", lora.get("rslora"))) if on]
    if lora.get("init", "default") != "default":
        parts.append(f"init {lora['init']}")
    if lora.get("layers_to_transform"):
        parts.append(f"layers {', '.join(map(str, lora['layers_to_transform']))}")
    if lora.get("modules_to_save"):
        parts.append(f"training in full {', '.join(lora['modules_to_save'])}")
    return parts


def lora_text(lora: dict | None) -> str:
    """The adapter in one line: rank, targets and the variants in use."""
    if lora is None:
        return "full fine-tuning"
    targets = lora["target_modules"] if isinstance(lora["target_modules"], str) else ", ".join(lora["target_modules"])
    extras = lora_variants(lora)
    return f"LoRA r={lora['r']} on {targets}" + (f" ({'; '.join(extras)})" if extras else "")


# lora.init -> peft's init_lora_weights. loftq starts from the default and is computed after the adapter exists
# (peft's replace_lora_weights_loftq, the way peft documents LoftQ for a model already loaded in 4-bit).
PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": True}


def lora_config(recipe: dict, counting: bool = False, model=None):
    """peft's LoraConfig for the recipe. ``counting``: the default init whatever the recipe says (parameter counts
    on a meta-device model, where PiSSA's SVD cannot run). ``model``: the model it is for; with
    layers_to_transform, "all-linear" is spelled out as its linear layers' names (peft takes a layer subset only
    with a list of targets)."""
    from peft import LoraConfig

    lora = recipe["lora"]
    targets = lora["target_modules"]
    if targets == "all-linear" and lora["layers_to_transform"] and model is not None:
        targets = linear_module_names(model)
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=targets, bias=lora["bias"], task_type="CAUSAL_LM",
                      use_dora=lora["dora"], use_rslora=lora["rslora"],
                      modules_to_save=list(lora["modules_to_save"]) or None,
                      layers_to_transform=lora["layers_to_transform"],
                      init_lora_weights=True if counting else PEFT_INIT[lora["init"]])
