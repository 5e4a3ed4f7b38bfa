"""Parameters counted, trainable and total: on a loaded model (4-bit packed weights at their real element count) or
the recipe's LoRA on a meta-device model (no weights: ``runner plan``, the memory model), and the line that shows
them."""

from __future__ import annotations

from runner.model.lora import lora_on_meta


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights at their real element count."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n = int(param.quant_state.shape.numel()) if getattr(param, "quant_state", None) else n * 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def parameter_line(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def meta_lora_counts(recipe: dict, model) -> tuple[int, int]:
    """Trainable/total parameters of the recipe's LoRA on a meta-device model (no weights)."""
    if recipe["lora"] is None:
        n = sum(p.numel() for p in model.parameters())
        return n, n
    return count_parameters(lora_on_meta(recipe, model))
