"""``runner export RECIPE --run DIR --out DIR``: a finished run as one plain transformers model folder.

QLoRA trains the adapter against the *4-bit* weights. Merging it into weights that are then quantized again
(peft's ``merge_and_unload`` on a 4-bit model, or merging into the original full-precision checkpoint) gives a
model that computes something else than what was trained and evaluated. Here every 4-bit weight is dequantized to
the compute dtype and the LoRA update is added there (runner.model.merge, the same copy the merged evaluation backend
uses), so the exported model computes what the 4-bit model with its adapter computed, up to rounding; the check
below measures how far apart their logits are and records it in ``export.json``.

The folder holds safetensors weights, config.json (no quantization_config), the tokenizer, and
generation_config.json with the recipe's decoding settings: ``AutoModelForCausalLM.from_pretrained(out)`` loads it
with no peft, no bitsandbytes and no runner. It appears whole or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from runner.common import dist, safeio
from runner.common.errors import RecipeError
from runner.recipe.templates import render, template_fields

RECORD = "export.json"


def check_out(out: Path) -> Path:
    """``--out``: a new folder. Missing parent folders are made when the model is saved (safeio.folder); an existing
    ``out``, or a file where a parent folder should be, is the user's mistake, told before any weight loads."""
    out = Path(out)
    if out.exists():
        raise RecipeError("--out", f"{out} already exists", "give a new folder; an export never overwrites one")
    parent = safeio.nearest_existing(out.parent)  # it decides whether the rest can be made
    if not parent.is_dir():
        raise RecipeError("--out", f"{parent} is a file, not a folder", "give a path under a folder")
    return out


def _probe_prompt(recipe: dict) -> str:
    """A prompt in the recipe's own shape (its template, each field filled with one plain sentence)."""
    text = "The council approved the new budget on Tuesday after a long debate about schools and roads."
    template = recipe["prompt"]["template"]
    return render(template, {name: text for name in template_fields(template, "prompt.template")})


def logit_gap(reference, other, tokenizer, prompt: str) -> dict:
    """Max |logit difference| between two models on one prompt, with the scale of the logits for context."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        a = reference(**enc.to(next(reference.parameters()).device)).logits.float()
        b = other(**enc.to(next(other.parameters()).device)).logits.float().to(a.device)
    return {"tokens": int(enc["input_ids"].shape[1]), "max_abs_logit_diff": float((a - b).abs().max()),
            "max_abs_logit": float(a.abs().max()),
            "same_next_token": bool((a.argmax(-1) == b.argmax(-1)).all())}


def export(recipe: dict, run_dir: Path, out: Path) -> dict:
    """Merge ``run_dir``'s adapter into the dequantized base and save it to ``out``; returns the export record."""
    from runner.evaluate import generate
    from runner.model import merge
    from runner.model import model as model_mod

    tokenizer = model_mod.load_tokenizer(recipe)
    net = model_mod.load_for_inference(recipe, run_dir / "adapter")
    # Inference on CPU repacks bitsandbytes' 4-bit weights (bf16 scales); training computed with the plain layout.
    model_mod._keep_trainable_layout(net)
    try:
        merged = merge.merged_copy(net)
    except ValueError as exc:
        raise RecipeError("--run", f"cannot merge this adapter: {exc}", "export needs 4-bit or unquantized "
                          "weights (8-bit ones are not dequantized)") from None
    merged.config.use_cache = True
    # The recipe's decoding settings as a plain generate() runs them: no evaluation backend (its static KV cache
    # is sized per evaluation batch), whatever generation.backend says.
    merged.generation_config = generate.generation_config(recipe, tokenizer, backend="plain")
    stops = list(merged.generation_config.stop_strings or [])
    # Stop strings in a saved generation config make a plain generate() without tokenizer= fail; they go in
    # export.json instead, for generate(..., stop_strings=..., tokenizer=...).
    merged.generation_config.stop_strings = None
    check = logit_gap(net, merged, tokenizer, _probe_prompt(recipe))
    record = {"run": str(run_dir), "recipe": recipe["name"], "base": recipe["model"]["name_or_path"],
              "quantization": recipe["quantization"]["method"], "dtype": str(merged.dtype).removeprefix("torch."),
              "merged": "base weights dequantized to the compute dtype, LoRA added there (peft merge_and_unload)",
              "prompt_template": recipe["prompt"]["template"], "stop_strings": stops,
              "check_vs_adapter": check}
    try:
        with safeio.folder(out, replace=False) as partial:  # appears whole or not at all, and never over another
            merged.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            safeio.write_text(partial / RECORD, json.dumps(record, indent=2, ensure_ascii=False))
    except FileExistsError:
        raise RecipeError("--out", f"{out} appeared while this export was writing (another export to the same "
                          "folder finished first); it is left as it is", "give a new folder") from None
    return record


def summary(record: dict, out: Path) -> str:
    c = record["check_vs_adapter"]
    return (f"exported {record['dtype']} model to {out}: logits vs the {record['quantization']} base + adapter differ "
            f"by at most {c['max_abs_logit_diff']:.3g} (logits up to {c['max_abs_logit']:.3g}, {c['tokens']} tokens; "
            f"same next token everywhere: {'yes' if c['same_next_token'] else 'no'})")


def refuse_launcher() -> None:
    if dist.world().size > 1:
        raise RecipeError("runner export", "writes one model from one process, not under a launcher",
                          "run it without torchrun / accelerate launch")
