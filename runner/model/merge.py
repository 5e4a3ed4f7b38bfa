"""An evaluation copy of a model with its LoRA merged: every weight dequantized to the compute dtype the 4-bit
layers compute in (bf16 on a GPU), the adapter folded in by peft's own ``merge_and_unload``.

A 4-bit layer computes ``x @ dequantize(W).T`` in its compute dtype, plus the LoRA branch; the copy computes
``x @ (dequantize(W) + scale * B @ A).T``: the same function up to rounding, with no dequantization per step and
one matmul instead of three. The weights are the dequantized 4-bit ones, not the original checkpoint's: the adapter
was trained against those. The loaded model is left as it was (training, ``runner compare``'s base pass and
``disable_adapter()`` keep working); the copy is freed after the evaluation that made it.
"""

from __future__ import annotations

import copy
import re
from itertools import chain

from runner.model.counting import count_parameters
from runner.model.model import fused_activation_for

QUANTIZED = ("Params4bit", "Int8Params")
_PEFT_WRAPPERS = re.compile(r"(\.base_layer|\.original_module)+\.")


def is_quantized(model) -> bool:
    return any(p.__class__.__name__ in QUANTIZED for p in model.parameters())


def adapter_active(model) -> bool:
    """A PeftModel whose LoRA layers are on (not inside ``disable_adapter()``, not merged already)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return False
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and not any(m.disable_adapters or m.merged for m in layers)


def needs_copy(model) -> bool:
    """Whether merging changes anything: quantized weights to dequantize or an active adapter to fold in."""
    return is_quantized(model) or adapter_active(model)


def compute_dtype(model):
    """The dtype the 4-bit layers compute in; for an unquantized model, its embeddings' dtype."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight.__class__.__name__ == "Params4bit" and getattr(module, "compute_dtype", None) is not None:
            return module.compute_dtype
    return model.get_input_embeddings().weight.dtype


def copy_bytes(model, dtype_bytes: int) -> float:
    """Bytes of the merged copy: every base parameter (4-bit ones at their real element count) in the compute dtype."""
    _, total = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return (total - lora) * dtype_bytes


def _dense(module, tensor, dtype):
    """A parameter as the layer computes with it, in ``dtype``."""
    import torch

    kind = tensor.__class__.__name__
    if kind == "Int8Params":
        raise ValueError("8-bit weights are not merged (generation.backend: batched or plain)")
    if kind != "Params4bit":
        return tensor.detach().to(dtype)
    import bitsandbytes as bnb

    state = tensor.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights on CPU for inference (AVX512-BF16 kernels, absmax in bf16): read them
        # back through its own matmul, so the copy holds what that layout computes with.
        eye = torch.eye(module.in_features, dtype=dtype, device=tensor.device)
        return bnb.matmul_4bit(eye, tensor.t(), quant_state=state).t().to(dtype)
    return bnb.functional.dequantize_4bit(tensor.data, state).to(dtype)


def dequantized_copy(base, dtype):
    """``base`` (a transformers model, possibly with peft's LoRA layers inside) as a plain model in ``dtype`` on the
    same device: the architecture built on the meta device, every weight and buffer filled from ``base``."""
    import torch

    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The same function in one kernel instead of five (gelu_new's multiplies, adds and tanh, each a pass over the
    # MLP's widest activation): a third of a scoring pass's GPU time on Phi-2 (bench/RESULTS.md).
    for key, fused in fused_activation_for(config).items():
        setattr(config, key, fused)
    device = base.get_input_embeddings().weight.device
    with torch.device("meta"):
        out = type(base)._from_config(config, dtype=dtype)  # the loaded class itself (remote code included)
    out.to_empty(device=device)
    # to_empty gives every module a tensor of its own, which unties a tied head from the embeddings (Llama 3.2,
    # Qwen3, Gemma 3): tie them again, so the head is the embeddings the base shares it with.
    out.tie_weights()
    targets = dict(chain(out.named_parameters(), out.named_buffers()))
    modules = dict(base.named_modules())
    filled = set()
    with torch.no_grad():
        for name, tensor in chain(base.named_parameters(), base.named_buffers()):
            if ".lora_" in name or ".modules_to_save." in name:  # the adapter's; merged_copy loads them
                continue
            # peft wraps each target Linear as <name>.base_layer, and each of lora.modules_to_save as
            # <name>.original_module beside its trained copy; a module with several target parameters (a mixture
            # of experts' fused experts: gate_up_proj and down_proj) is wrapped once per parameter
            key = _PEFT_WRAPPERS.sub(".", name)
            if key not in targets:
                raise ValueError(f"cannot place {name!r} in a plain {type(out).__name__}")
            target = targets[key]
            value = _dense(modules[name.rpartition(".")[0]], tensor, target.dtype if target.is_floating_point()
                           else tensor.dtype)
            target.copy_(value.reshape(target.shape))
            filled.add(key)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ValueError(f"the evaluation copy lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    out.requires_grad_(False)
    out.generation_config = copy.deepcopy(base.generation_config)
    return out.eval()


def merged_copy(model):
    """The evaluation copy of ``model``: dequantized, with its active adapter merged (peft's merge_and_unload)."""
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    peft = model if isinstance(model, PeftModel) else None
    base = peft.get_base_model() if peft is not None else model
    out = dequantized_copy(base, compute_dtype(base))
    if peft is None or not adapter_active(peft):
        return out
    name = peft.active_adapter
    config = copy.deepcopy(peft.peft_config[name])
    config.inference_mode = True
    # The adapter's layers made empty (meta) and filled by the state dict: no initialisation, no device moves
    # (a third of a second per evaluation on Phi-2 with them, bench/RESULTS.md).
    wrapped = get_peft_model(out, config, adapter_name=name, low_cpu_mem_usage=True)
    loaded = set_peft_model_state_dict(wrapped, get_peft_model_state_dict(peft, adapter_name=name), adapter_name=name,
                                       low_cpu_mem_usage=True)
    if loaded.unexpected_keys or any(".lora_" in k for k in loaded.missing_keys):
        raise ValueError(f"the adapter did not load into the evaluation copy: {loaded}")
    return wrapped.merge_and_unload().eval()
