"""The memory model: predicted peak GPU memory of training (and of evaluation's batches) from the model's config
alone (no weights). ``runner plan`` prints it, the speed profiles fit their budgets with it, the evaluation
backends size their batches with it.

Training's estimate counts what the training path actually holds, term by term:

- static: 4-bit weights (packed nibbles + block scales), the unquantized rest (embeddings, head, norms, biases:
  fp32 when peft's prepare_model_for_kbit_training upcasts them, i.e. profile none, else bf16), LoRA weights,
  their gradients and optimizer state (paged optimizers keep theirs outside torch's allocator);
- activations autograd saves per token and decoder layer, from the forward code (bench/activations.py lists them
  on a real-width layer): the norm's input, per LoRA target its dropout output and bool mask, the attention
  kernel's q, k, v and output (eager attention: also its softmax), the MLP activation's input (one tensor fused, four for gelu_new written in Python,
  in fp32 when upcast); with gradient checkpointing, one layer input per layer plus one recomputed layer;
- the backward pass's widest transient gradients, or the fused LM head's logit tiles, whichever is larger;
- the caching allocator's slack over the allocated peak; the CUDA context (outside torch's reserved memory) is
  shown apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.model import counting
from runner.model import model as model_mod
from runner.speed import method_memory

GIB = 2**30
# Block size of bitsandbytes' 4-bit scales, and of the second-level scales with double quantization.
BNB_BLOCK, BNB_BLOCK2 = 64, 256
# trl's fused LM head projects at most this many positions x vocabulary entries at a time (trl/kernels).
HEAD_TOKENS, HEAD_VOCAB = 4096, 32768
# Reserved over the allocated peak: a share plus a constant (fitted to the H200 runs in bench/RESULTS.md, which
# ranged from +3.5% without checkpointing to +12% with checkpointing and padded batches).
ALLOCATOR_SLACK, ALLOCATOR_SLACK_GIB = 0.035, 0.15
# Under FSDP the gathered layers come and go in blocks of many sizes, on two streams: 2x H200, Llama-shaped 13.2B,
# micro-batch 2 with checkpointing, reserved 7.28 GiB over an allocated peak of 5.71 (bench/RESULTS.md).
FSDP_ALLOCATOR_SLACK = 0.27
# CUDA context, cuBLAS and cuDNN workspaces: device memory outside torch's allocator (H100, bench/RESULTS.md).
CUDA_CONTEXT_GB = 0.75
PAGED = ("paged_adamw_8bit", "paged_adamw_32bit")
BITSANDBYTES_OPTIMIZERS = (*PAGED, "adamw_8bit")  # training.optimizer names that transformers takes from bitsandbytes
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"}


@dataclass
class Estimate:
    parts: dict = field(default_factory=dict)  # name -> bytes, in the order printed
    allocated: float = 0.0
    reserved: float = 0.0

    @property
    def reserved_gb(self) -> float:
        return self.reserved / GIB


# ---------------------------------------------------------------- the model's shape


def model_shape(config) -> dict:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return dict(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=heads, inter=getattr(cfg, "intermediate_size", None)
                or 4 * cfg.hidden_size, vocab=cfg.vocab_size, kv_dim=cfg.hidden_size * kv // heads,
                act=getattr(cfg, "hidden_act", None), gated=cfg.model_type in GATED,
                parallel=cfg.model_type in ("phi", "gptj", "gpt_neox"))


def _linears(meta) -> tuple[int, int, dict]:
    """(quantizable linear elements, all parameter elements, {module name: (in_features, out_features)} in layer
    0)."""
    import torch

    out = meta.get_output_embeddings()
    quantizable = 0
    layer0: dict = {}
    for name, module in meta.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not out:
            quantizable += module.weight.numel()
            parts = name.split(".")
            if "0" in parts:
                layer0[parts[-1]] = (module.in_features, module.out_features)
    total = sum(p.numel() for p in meta.parameters())
    return quantizable, total, layer0


# ---------------------------------------------------------------- terms


def quantized_bytes(n: int, quant: dict) -> float:
    if quant["method"] == "bnb_8bit":
        return n * 1.0 + n / 4096 * 4  # int8 weights + per-row scales (rows are >= 4096 wide in practice)
    blocks = n / BNB_BLOCK
    scales = blocks * 1 + blocks / BNB_BLOCK2 * 4 if quant["double_quant"] else blocks * 4
    return n / 2 + scales


def _dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2  # auto is bf16 (or fp16) on a GPU


def layer_activation_bytes(shape: dict, recipe: dict, upcast: bool, fused_act: bool) -> float:
    """Bytes autograd saves per token for one decoder layer (see the module docstring)."""
    h, i, kv = shape["hidden"], shape["inter"], shape["kv_dim"]
    c = _dtype_bytes(recipe["model"]["dtype"])  # compute dtype of matmuls and attention
    r = 4 if upcast else c  # residual stream, norms, and what 4-bit layers return (their input's dtype)
    norms = 1 if shape["parallel"] else 2
    total = norms * r * h
    total += c * (2 * h + 2 * kv)  # attention kernel's q, k, v, output (after rotary, in the compute dtype)
    if recipe["model"]["attn_implementation"] == "eager":  # fp32 softmax output and its copy in the compute dtype
        total += shape["heads"] * recipe["prompt"]["max_length"] * (4 + c)
    mlp_tensors = 3 if shape["gated"] else (1 if fused_act or shape["act"] not in ("gelu_new", "gelu_fast") else 4)
    total += mlp_tensors * (c if fused_act and not upcast else r) * i
    total += _lora_bytes(recipe, shape, c)
    return total


def _lora_bytes(recipe: dict, shape: dict, c: int) -> float:
    """Each LoRA target keeps its own copy of its input for lora_A's gradient (its dropout output; measured as a
    separate copy even without dropout), and with dropout on a one-byte mask. DoRA also keeps the base and LoRA
    outputs of each target (its magnitude's gradient multiplies them). With layers_to_transform, only those layers'
    share (the per-layer figure is an average over the layers)."""
    lora = recipe["lora"]
    if lora is None:
        return 0.0
    width = (shape["hidden"], shape["hidden"])
    targets = shape["layer0"] if lora["target_modules"] == "all-linear" else {
        t: shape["layer0"].get(t, width) for t in lora["target_modules"]}
    per_element = c + (1 if lora["dropout"] > 0 else 0)
    total = sum(per_element * d_in + (2 * c * d_out if lora.get("dora") else 0) for d_in, d_out in targets.values())
    if lora.get("layers_to_transform"):
        total *= len(lora["layers_to_transform"]) / shape["layers"]
    return total


def model_info(recipe: dict, config) -> dict:
    """What the estimate needs from the architecture: its shape, linear and total elements, LoRA parameters."""
    meta = model_mod.meta_model(config)
    info = model_shape(config)
    info["quantizable"], info["total"], info["layer0"] = _linears(meta)
    if recipe["lora"] is None:
        info["trainable"] = info["total"]
    else:
        info["trainable"] = counting.meta_lora_counts(recipe, meta)[0]
    return info


def estimate(recipe: dict, config, speed, info: dict | None = None) -> Estimate:
    """Predicted peak memory of training ``recipe`` with ``speed`` (runner.speed.profiles.Speed)."""
    shape = info if info is not None else model_info(recipe, config)
    quantizable, total, trainable = shape["quantizable"], shape["total"], shape["trainable"]
    quant = recipe["quantization"]
    quantized = quant["method"] != "none"
    upcast = quantized and not speed.keep_dtype
    w = _dtype_bytes(recipe["model"]["dtype"])
    c = w
    r = 4 if upcast else c

    est = Estimate()
    if quantized:
        est.parts["4-bit weights" if quant["method"] == "bnb_4bit" else "8-bit weights"] = quantized_bytes(
            quantizable, quant)
        est.parts[f"unquantized weights ({'fp32, upcast' if upcast else 'bf16'})"] = (total - quantizable) * (
            4 if upcast else w)
    else:
        est.parts["weights"] = total * w
    est.parts["LoRA weights + grads + optimizer"] = trainable * _train_state_bytes(recipe, quantized, w)
    est.parts.update(method_memory.reference_bytes(recipe, trainable, 2 if quantized else w))
    if speed.distributed == "fsdp" and speed.world_size > 1:
        _shard(est, shape, recipe, speed.world_size)

    rows = speed.micro_batch_size * method_memory.sequences(recipe)  # a preference pair: two sequences
    tokens = rows * recipe["prompt"]["max_length"]
    layer = layer_activation_bytes(shape, recipe, upcast, speed.fused_activation)
    if speed.gradient_checkpointing:
        saved = tokens * (shape["layers"] * r * shape["hidden"] + layer)
        label = "activations (checkpoints + one recomputed layer)"
    else:
        saved = tokens * shape["layers"] * layer
        label = "activations (all layers)"
    est.parts[f"{label}, {rows} x {recipe['prompt']['max_length']} tokens"] = saved
    transient = tokens * (2 * shape["inter"] + 3 * shape["hidden"]) * r + shape["inter"] * shape["hidden"] * c
    labelled = min(tokens, HEAD_TOKENS)
    head = labelled * min(shape["vocab"], HEAD_VOCAB) * c + tokens * shape["hidden"] * (4 + c)
    if head > transient:
        est.parts["logits/loss (fused LM head tiles)"] = head
    else:
        est.parts["backward transients (widest layer gradients)"] = transient
    est.allocated = sum(est.parts.values())
    share = FSDP_ALLOCATOR_SLACK if speed.distributed == "fsdp" and speed.world_size > 1 else ALLOCATOR_SLACK
    est.parts["allocator slack"] = est.allocated * share + ALLOCATOR_SLACK_GIB * GIB
    est.reserved = est.allocated + est.parts["allocator slack"]
    return est


def _shard(est: Estimate, shape: dict, recipe: dict, world_size: int) -> None:
    """FSDP keeps 1/N of every weight, gradient and optimizer state on each GPU, and gathers one decoder layer's
    full weights at a time (plus the next one, prefetched during backward)."""
    static = list(est.parts)
    layer = sum(est.parts[name] for name in static) / max(1, shape["layers"])  # one layer's share, roughly
    # The root unit (embeddings, head, final norm) stays gathered from the end of forward into backward.
    root = sum(v for name, v in est.parts.items() if name.startswith("unquantized")) * (world_size - 1) / world_size
    for name in static:
        est.parts[f"{name} / {world_size} (FSDP shard)"] = est.parts.pop(name) / world_size
    est.parts["FSDP gathered layers (current + prefetched)"] = 2 * layer
    est.parts["FSDP gathered root (embeddings, head, norms)"] = root


def _train_state_bytes(recipe: dict, quantized: bool, w: int) -> float:
    """Per trainable parameter: weight + gradient (bf16: TRL keeps LoRA weights of a quantized model in bf16) and
    the optimizer's state held by torch's allocator."""
    p = 2 if quantized else w
    opt = recipe["training"]["optimizer"]
    if opt in PAGED:
        state = 0.0  # paged: cudaMallocManaged, outside torch's reserved memory
    elif opt == "adamw_8bit":
        state = 2.0 + 2 * 4 / 256
    elif opt in ("adamw_torch", "adamw_torch_fused"):
        state = 2 * p
    elif opt == "adafactor":
        state = 0.1 * p
    else:
        state = 0.0
    return 2 * p + state


# ---------------------------------------------------------------- evaluation (runner.evaluate.backend sizes its batches here)

# Bytes per vocabulary entry and row that decoding keeps beside the model's own logits: fp32 logits, the processed
# scores (repetition penalty, temperature), probabilities, and top-p's sorted values and int64 indices.
DECODE_LOGIT_BYTES = 4 * 4 + 8
# A growing (dynamic) KV cache is concatenated anew at every step: the old and the new tensors coexist, and the
# freed ones rarely fit the next, larger request.
DYNAMIC_CACHE_COPIES = 2


def kv_bytes_per_token(shape: dict, c: int) -> float:
    """Keys and values of every layer for one token, in ``c``-byte elements."""
    return 2 * shape["layers"] * shape["kv_dim"] * c


def forward_token_bytes(shape: dict, c: int, attn: str, width: int) -> float:
    """Transient bytes per token of one decoder layer in an inference forward (nothing is saved for backward):
    the residual stream, norm and branch outputs, q/k/v with their rotated copies and the attention output, the
    MLP's inner activation with its activation function's temporaries (gelu_new: about four), and with eager
    attention the softmax over ``width`` keys."""
    h, i, kv = shape["hidden"], shape["inter"], shape["kv_dim"]
    mlp = (3 if shape["gated"] else 4) * i
    total = c * (4 * h + 3 * h + 3 * kv + mlp)
    if attn == "eager":
        total += shape["heads"] * width * (4 + c)
    return total


def generation_row_bytes(shape: dict, c: int, prompt_tokens: int, new_tokens: int, static_cache: bool,
                         attn: str = "sdpa") -> float:
    """Peak bytes one generated row adds: its KV cache over prompt + new tokens, its prefill transients, and the
    last position's logits with decoding's copies of them."""
    width = prompt_tokens + new_tokens
    kv = kv_bytes_per_token(shape, c) * width * (1 if static_cache else DYNAMIC_CACHE_COPIES)
    prefill = prompt_tokens * forward_token_bytes(shape, c, attn, width) + prompt_tokens * width  # + the mask
    return kv + prefill + shape["vocab"] * (c + DECODE_LOGIT_BYTES)


def scoring_row_bytes(shape: dict, c: int, tokens: int, scored: int, attn: str = "sdpa") -> float:
    """Peak bytes one scored row (prompt + completion, no KV cache) adds: its forward transients and the logits of
    its last ``scored + 1`` positions with their fp32 log-softmax."""
    return tokens * forward_token_bytes(shape, c, attn, tokens) + (scored + 1) * shape["vocab"] * (c + 3 * 4)


def packed_scoring_bytes(shape: dict, c: int, prompt_tokens: int, own_tokens: int) -> float:
    """Peak bytes of one prompt scored for several completions packed into one row after it, ``own_tokens`` in all
    (runner.evaluate.rank.score_groups): the row's forward transients with the softmax over the row (a custom mask can take
    SDPA off its fused kernels), its 4-D mask, and the completions' logits with their fp32 log-softmax."""
    width = prompt_tokens + own_tokens
    return (width * forward_token_bytes(shape, c, "eager", width) + width * width * c
            + (own_tokens + 1) * shape["vocab"] * (c + 3 * 4))


# Reserved over allocated during evaluation: 11-19% on one H200 (bench/results/eval_table_h200.md: the plain path
# 5.54 / 5.01 GiB, batched 3.72 / 3.30, merged 75.6 / 63.6, compiled 81.8 / 68.8): a new static cache and prefill
# transients per batch fragment more than training's fixed shapes.
EVAL_ALLOCATOR_SLACK = 0.15


def rows_within(budget: float, fixed: float, per_row: float) -> int:
    """The most rows whose predicted reserved memory, ``fixed + rows x per_row`` plus evaluation's allocator slack,
    stays within ``budget`` bytes; 0 when not even one fits."""
    room = (budget - ALLOCATOR_SLACK_GIB * GIB) / (1 + EVAL_ALLOCATOR_SLACK) - fixed
    return max(int(room // per_row), 0) if per_row > 0 else 0


def reserved_for(allocated: float) -> float:
    """Predicted reserved bytes during evaluation for ``allocated`` bytes (the inverse of rows_within's slack)."""
    return allocated * (1 + EVAL_ALLOCATOR_SLACK) + ALLOCATOR_SLACK_GIB * GIB
