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
from runner.data import chat
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


def _probe_prompt(recipe: dict, tokenizer) -> str:
    """A prompt in the recipe's own shape (its template, each field filled with one plain sentence; chat data: one
    user turn of that sentence, rendered by the recipe's chat template as evaluation renders it)."""
    text = "The council approved the new budget on Tuesday after a long debate about schools and roads."
    if chat.is_chat(recipe):
        return chat.render_prompt(tokenizer, [{"role": "user", "content": text}])
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


FORMATS = ("hf", "gguf")


def check_format(fmt: str, quant: str | None, llama_cpp: str | None, config) -> str | None:
    """``--format``/``--quant``/``--llama-cpp`` against the model's config, before any weight loads; returns the path
    of llama-quantize when the quantization needs it."""
    if fmt == "hf":
        if quant is not None or llama_cpp is not None:
            given = "--quant" if quant is not None else "--llama-cpp"
            raise RecipeError(given, "applies to --format gguf only", "add --format gguf, or leave it out")
        return None
    from runner.export import gguf_file

    return gguf_file.check(config, quant or "f16", llama_cpp)


def export(recipe: dict, run_dir: Path, out: Path, fmt: str = "hf", quant: str | None = None,
           quantize_tool: str | None = None) -> dict:
    """Merge ``run_dir``'s adapter into the dequantized base and save it to ``out`` (a transformers folder, or a
    GGUF file with its Ollama Modelfile); returns the export record."""
    from runner.evaluate import generate
    from runner.export import card
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
    check = logit_gap(net, merged, tokenizer, _probe_prompt(recipe, tokenizer))
    record = {"run": str(run_dir), "recipe": recipe["name"], "base": recipe["model"]["name_or_path"],
              "quantization": recipe["quantization"]["method"], "dtype": str(merged.dtype).removeprefix("torch."),
              "merged": "base weights dequantized to the compute dtype, LoRA added there (peft merge_and_unload)",
              "prompt_template": recipe["prompt"].get("template"), "stop_strings": stops,
              "check_vs_adapter": check, "format": fmt}
    try:
        with safeio.folder(out, replace=False) as partial:  # appears whole or not at all, and never over another
            if fmt == "gguf":
                record["gguf"] = _write_gguf(recipe, run_dir, merged, tokenizer, partial, quant or "f16",
                                             quantize_tool, stops)
            else:
                merged.save_pretrained(partial)
                tokenizer.save_pretrained(partial)
                card.write(partial / card.CARD, recipe, run_dir, "merged")
            safeio.write_text(partial / RECORD, json.dumps(record, indent=2, ensure_ascii=False))
    except FileExistsError:
        raise RecipeError("--out", f"{out} appeared while this export was writing (another export to the same "
                          "folder finished first); it is left as it is", "give a new folder") from None
    return record


def _write_gguf(recipe: dict, run_dir: Path, merged, tokenizer, folder: Path, quant: str, quantize_tool, stops):
    """The GGUF file, read back and checked, its Modelfile and card; returns export.json's "gguf" entry."""
    import tempfile

    from runner.export import card, gguf_file, modelfile

    name = f"{recipe['name']}-{quant}.gguf"
    with tempfile.TemporaryDirectory() as scratch:  # the tokenizer's files, as gguf's vocabulary readers read them
        tokenizer.save_pretrained(scratch)
        written = gguf_file.write(merged, tokenizer, Path(scratch), folder / name, quant, name=recipe["name"],
                                  base=recipe["model"]["name_or_path"],
                                  chat_template=modelfile.jinja_template(recipe, tokenizer),
                                  quantize_tool=quantize_tool)
    read_back = gguf_file.verify(folder / name, written)
    gap = gguf_file.llama_cpp_gap(folder / name, merged, tokenizer, _probe_prompt(recipe, tokenizer))
    safeio.write_text(folder / "Modelfile", modelfile.modelfile(recipe, name, stops))
    card.write(folder / card.CARD, recipe, run_dir, "gguf", gguf_name=name)
    types: dict[str, int] = {}
    for kind in written["types"].values():
        types[kind] = types.get(kind, 0) + 1
    return {"file": name, "quant": quant, "architecture": written["architecture"], "tensor_types": types,
            "tokenizer": written["vocab"], "chat_template": written["chat_template"], "read_back": read_back,
            "check_vs_llama_cpp": gap if gap is not None else "not run: llama-cpp-python is not installed"}


def summary(record: dict, out: Path) -> str:
    c = record["check_vs_adapter"]
    line = (f"exported {record['dtype']} model to {out}: logits vs the {record['quantization']} base + adapter differ "
            f"by at most {c['max_abs_logit_diff']:.3g} (logits up to {c['max_abs_logit']:.3g}, {c['tokens']} tokens; "
            f"same next token everywhere: {'yes' if c['same_next_token'] else 'no'})")
    g = record.get("gguf")
    if not g:
        return line
    back, cpp = g["read_back"], g["check_vs_llama_cpp"]
    line += (f"\nGGUF {g['file']} ({g['architecture']}, {g['quant']}): read back {back['tensors']} tensors, "
             f"{back['tokens']} tokens and the metadata; weights within {back['max_weight_error_relative']:.2g} "
             "(relative) of the merged ones; ")
    if isinstance(cpp, dict):
        line += (f"logits under llama.cpp differ by at most {cpp['max_abs_logit_diff']:.3g} (same next token "
                 f"everywhere: {'yes' if cpp['same_next_token'] else 'no'})")
    else:
        line += f"logits under llama.cpp {cpp}"
    return line + f"\nOllama: cd {out} && ollama create {record['recipe']} -f Modelfile"


def refuse_launcher() -> None:
    if dist.world().size > 1:
        raise RecipeError("runner export", "writes one model from one process, not under a launcher",
                          "run it without torchrun / accelerate launch")
