"""What training.method changes in the training memory model (runner.speed.memory): the sequences each example
puts through the policy's forward and backward, and the frozen reference.

TRL's DPOTrainer and ORPOTrainer run each pair's chosen and rejected sequences together, as one batch of twice the
rows (activations, logits and transients of two sequences per example); KTOTrainer's rows are single, unpaired
sequences. DPOTrainer and KTOTrainer given a LoRA model keep the reference as a frozen copy of the starting
adapter (named "ref"), and run the reference pass without gradients before the policy's: it saves nothing for
backward, so its transients come and go before the policy's activations are held; the copy's weights stay for
the whole run. ORPO has no reference.
"""

from __future__ import annotations

PAIRED = ("dpo", "orpo")
WITH_REFERENCE = ("dpo", "kto")


def sequences(recipe: dict) -> int:
    """Sequences per example in the policy's forward and backward."""
    return 2 if recipe["training"]["method"] in PAIRED else 1


def reference_bytes(recipe: dict, trainable: int, param_bytes: int) -> dict:
    """{part name: bytes} the reference adds: the frozen copy of the LoRA weights (none under full fine-tuning,
    which TRL would give a whole second model: not a path the runner takes, since a quantized base needs LoRA)."""
    if recipe["training"]["method"] not in WITH_REFERENCE or recipe["lora"] is None:
        return {}
    return {"reference adapter (frozen LoRA copy)": trainable * param_bytes}
