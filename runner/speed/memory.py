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

Per family, every term reads what the config and the meta-device model declare, never the model type's name
(``model_shape``): q and k/v widths from num_attention_heads, num_key_value_heads (GQA) and head_dim where the
config sets it apart (Qwen 3, Gemma 3); a gated MLP from its projections' widths (gate + up, or Phi-3's fused
gate_up); the norms a decoder layer holds (Gemma 3's four, Qwen 3's q/k norms; Python RMSNorms keep an fp32 copy);
tied embeddings as one tensor; per-layer sliding windows (the KV cache keeps a window, training builds one mask);
a final-logit softcap's temporaries in evaluation; experts as stacked 3-D weights bitsandbytes leaves unquantized,
with the router, the routed tokens' activations, the load-balancing loss's router logits, and LoRA on the stacks
(peft materialises W + B A per layer) where the recipe's targets reach them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.model import attention, counting
from runner.model import lora as lora_mod
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


@dataclass
class Estimate:
    parts: dict = field(default_factory=dict)  # name -> bytes, in the order printed
    allocated: float = 0.0
    reserved: float = 0.0

    @property
    def reserved_gb(self) -> float:
        return self.reserved / GIB


# ---------------------------------------------------------------- the model's shape


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _decoder_layers(modules, n_layers: int):
    """The model's decoder layers: its first ModuleList with one entry per hidden layer."""
    import torch

    return next((m for _, m in modules.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers),
                None)


def _norm_widths(layer) -> list[int]:
    """Widths of the normalisation layers inside a decoder layer: modules holding a 1-D ``weight`` of their own."""
    widths = []
    for module in layer.modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() == 1:
            widths.append(weight.shape[0])
    return widths


def _python_norms(layer) -> bool:
    """Whether the layer's norms are written in Python (RMSNorm classes upcast to fp32 and keep that copy for
    backward) rather than torch's fused LayerNorm, which keeps its input only."""
    import torch

    return not any(isinstance(m, torch.nn.LayerNorm) for m in layer.modules())


def model_shape(config, modules=None) -> dict:
    """What the memory model needs of an architecture, from its config and its module tree (``modules``: a model
    of this config, e.g. the loaded one; built on the meta device when not given). Nothing keys on a family's
    name: a gated MLP is two input projections of the MLP's width (or one of twice it), GQA is
    num_key_value_heads, the head width is head_dim where the config sets it apart from hidden/heads, the norms are
    counted in a decoder layer, experts are a layer's 3-D weights, and tied embeddings share one tensor."""
    import torch

    cfg = _text_config(config)
    if modules is None:
        from runner.model import model as model_mod

        modules = model_mod.meta_model(config)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    hidden = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    layers = _decoder_layers(modules, cfg.num_hidden_layers)
    layer0 = layers[0] if layers is not None else modules
    # A loaded model may carry peft's LoRA: its base layers count under the name of the module they wrap.
    linears = {name.replace(".base_layer", "").rsplit(".", 1)[-1]: (m.in_features, m.out_features)
               for name, m in layer0.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in f".{name}"}
    # The dense MLP's input projections: width inter (gate, up) or 2 x inter (a fused gate_up).
    mlp_in = sum(o for i, o in linears.values() if i == hidden and o in (inter, 2 * inter)) // inter
    experts = [p for p in layer0.parameters() if p.dim() == 3]
    shape = dict(layers=cfg.num_hidden_layers, hidden=hidden, heads=heads, head_dim=head_dim,
                 q_dim=heads * head_dim, kv_dim=kv_heads * head_dim, inter=inter, vocab=cfg.vocab_size,
                 act=getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None),
                 gated=mlp_in >= 2, dense_mlp=mlp_in > 0, layer0=linears,
                 widest=max((i * o for i, o in linears.values()), default=hidden * inter),
                 softcap=getattr(cfg, "final_logit_softcapping", None),
                 windows=attention.sliding_windows(cfg), tied=_tied(modules))
    norms = _norm_widths(layer0)
    shape["norms"] = sum(1 for w in norms if w == hidden)  # on the residual stream
    shape["qk_norm_width"] = sum(w for w in norms if w != hidden) and (shape["q_dim"] + shape["kv_dim"])
    shape["python_norms"] = _python_norms(layer0)
    shape["parallel"] = shape["norms"] == 1  # attention and MLP read one norm's output (Phi-2, GPT-J)
    shape.update(_experts(cfg, experts))
    return shape


def _tied(modules) -> bool:
    out, inp = modules.get_output_embeddings(), modules.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _experts(cfg, weights: list) -> dict:
    """Mixture of experts: the experts' count, width and gating from their stacked 3-D weights ([experts, out, in]),
    the experts each token is routed to from the config."""
    if not weights:
        return dict(experts=0, top_k=0, expert_inter=0, expert_gated=False, aux_loss=False)
    count = weights[0].shape[0]
    hidden = cfg.hidden_size
    ups = [w.shape[1] for w in weights if w.shape[2] == hidden]  # [experts, (2 x) inter, hidden]
    downs = [w.shape[2] for w in weights if w.shape[1] == hidden and w.shape[2] != hidden]
    width = downs[0] if downs else (ups[0] if ups else 0)
    top_k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "num_experts_per_token", None) or 1
    return dict(experts=count, top_k=top_k, expert_inter=width, expert_gated=sum(ups) >= 2 * width > 0,
                aux_loss=bool(getattr(cfg, "router_aux_loss_coef", 0.0)) and hasattr(cfg, "output_router_logits"))


def _linears(meta) -> tuple[int, int, int]:
    """(quantizable linear elements, all parameter elements, expert elements): bitsandbytes quantizes the
    nn.Linear layers but the output head; experts stored as stacked 3-D weights stay in the compute dtype."""
    import torch

    out = meta.get_output_embeddings()
    quantizable = sum(m.weight.numel() for m in meta.modules() if isinstance(m, torch.nn.Linear) and m is not out)
    params = list(meta.parameters())
    return quantizable, sum(p.numel() for p in params), sum(p.numel() for p in params if p.dim() == 3)


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
    h, q, kv = shape["hidden"], shape["q_dim"], shape["kv_dim"]
    c = _dtype_bytes(recipe["model"]["dtype"])  # compute dtype of matmuls and attention
    r = 4 if upcast else c  # residual stream, norms, and what 4-bit layers return (their input's dtype)
    # A norm written in Python (RMSNorm) keeps its input upcast to fp32; torch's fused LayerNorm keeps its input.
    norm = 4 if shape["python_norms"] else r
    total = shape["norms"] * norm * h + (4 * shape["qk_norm_width"] if shape["python_norms"] else r * shape["qk_norm_width"])
    total += c * (2 * q + 2 * kv)  # attention kernel's q, k, v, output (after rotary, in the compute dtype)
    if recipe["model"]["attn_implementation"] == "eager":  # fp32 softmax output and its copy in the compute dtype
        total += shape["heads"] * recipe["prompt"]["max_length"] * (4 + c)
    if shape["dense_mlp"]:
        python_act = shape["act"] in ("gelu_new", "gelu_fast") and not fused_act
        mlp_tensors = 3 if shape["gated"] else (4 if python_act else 1)
        total += mlp_tensors * (c if fused_act and not upcast else r) * shape["inter"]
    total += expert_token_bytes(shape, c)
    total += _lora_bytes(recipe, shape, c)
    if shape.get("lora_expert_elements"):  # both grouped matmuls then keep their inputs for the LoRA gradients
        total += shape["top_k"] * c * (shape["hidden"] + shape["expert_inter"])
    return total


def expert_lora_layer_bytes(shape: dict, c: int) -> float:
    """LoRA on stacked expert weights (peft's ParamWrapper): each layer's forward materialises W + B A for the whole
    stack, which its grouped matmuls keep for backward: the stack's size per layer, whatever the tokens."""
    return shape.get("lora_expert_elements", 0) * c


def expert_token_bytes(shape: dict, c: int) -> float:
    """Mixture of experts, per token and layer: the router's logits with their fp32 softmax, and for each of the
    ``top_k`` experts a token goes to its gate/up outputs and activation (gated: three of the expert's width, else
    one) and the expert's output the routing weight multiplies. The frozen experts keep no copy of their inputs."""
    if not shape["experts"]:
        return 0.0
    width = (3 if shape["expert_gated"] else 1) * shape["expert_inter"]
    return shape["experts"] * (c + 4) + shape["top_k"] * c * (width + shape["hidden"])


def aux_loss_token_bytes(shape: dict, c: int) -> float:
    """Per token, what the load-balancing loss TRL adds for a mixture of experts (the config's router_aux_loss_coef)
    keeps: every layer's router logits, their fp32 softmax and its copy concatenated over layers, and the one-hot
    int64 mask of the experts each token went to."""
    if not shape.get("aux_loss"):
        return 0.0
    return shape["layers"] * shape["experts"] * (c + 4 + 4 + 8 * shape["top_k"])


def window_mask_bytes(shape: dict, rows: int, length: int) -> float:
    """A sliding window narrower than the rows makes transformers build a [rows, 1, length, length] boolean mask
    for its layers (SDPA has no sliding-window kernel); it lives through the step."""
    narrow = [w for w in shape["windows"] if w is not None and w < length]
    return rows * length * length if narrow else 0.0


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
    """What the estimate needs from the architecture: its shape, linear, expert and total elements, LoRA
    parameters."""
    meta = model_mod.meta_model(config)
    info = model_shape(config, meta)
    info["quantizable"], info["total"], info["expert_elements"] = _linears(meta)
    info["lora_expert_elements"] = 0
    if recipe["lora"] is None:
        info["trainable"] = info["total"]
        return info
    lora = lora_mod.lora_on_meta(recipe, meta)
    info["trainable"] = counting.count_parameters(lora)[0]
    layers = _decoder_layers(lora, info["layers"])
    if layers is not None:  # peft's wrappers of stacked expert weights (ParamWrapper) in one layer
        info["lora_expert_elements"] = sum(m.get_param().numel() for m in layers[0].modules()
                                           if hasattr(m, "get_param") and m.get_param().dim() == 3)
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
        experts = shape.get("expert_elements", 0)
        if experts:  # nn.Linear layers only are quantized: stacked expert weights stay as loaded (or upcast)
            est.parts[f"unquantized experts ({'fp32, upcast' if upcast else 'bf16'})"] = experts * (4 if upcast else w)
        est.parts[f"unquantized weights ({'fp32, upcast' if upcast else 'bf16'})"] = (total - quantizable - experts) * (
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
    stack = expert_lora_layer_bytes(shape, c)
    if speed.gradient_checkpointing:
        saved = tokens * (shape["layers"] * r * shape["hidden"] + layer) + stack
        label = "activations (checkpoints + one recomputed layer)"
    else:
        saved = tokens * shape["layers"] * layer + shape["layers"] * stack
        label = "activations (all layers)"
    saved += window_mask_bytes(shape, rows, recipe["prompt"]["max_length"])
    saved += tokens * aux_loss_token_bytes(shape, c)
    est.parts[f"{label}, {rows} x {recipe['prompt']['max_length']} tokens"] = saved
    # The widest gradient flowing back through the MLP, and one 4-bit weight dequantized for its matmul.
    flow = shape["inter"] if shape["dense_mlp"] else shape["top_k"] * shape["expert_inter"]
    transient = tokens * (2 * flow + 3 * shape["hidden"]) * r + shape["widest"] * c
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


def kv_bytes(shape: dict, c: int, width: int) -> float:
    """Keys and values a row of ``width`` tokens keeps: a sliding-window layer keeps its window's only."""
    kept = sum(width if w is None else min(w, width) for w in shape["windows"])
    return 2 * kept * shape["kv_dim"] * c


def forward_token_bytes(shape: dict, c: int, attn: str, width: int) -> float:
    """Transient bytes per token of one decoder layer in an inference forward (nothing is saved for backward):
    the residual stream, norm and branch outputs, q/k/v with their rotated copies and the attention output, the
    MLP's inner activation with its activation function's temporaries (gelu_new: about four), and with eager
    attention the softmax over ``width`` keys."""
    h, q, kv = shape["hidden"], shape["q_dim"], shape["kv_dim"]
    mlp = ((3 if shape["gated"] else 4) * shape["inter"] if shape["dense_mlp"] else 0) + expert_token_bytes(shape, c) / c
    total = c * (4 * h + 3 * q + 3 * kv + mlp)
    if attn == "eager":
        total += shape["heads"] * width * (4 + c)
    return total


def generation_row_bytes(shape: dict, c: int, prompt_tokens: int, new_tokens: int, static_cache: bool,
                         attn: str = "sdpa") -> float:
    """Peak bytes one generated row adds: its KV cache over prompt + new tokens, its prefill transients, and the
    last position's logits with decoding's copies of them."""
    width = prompt_tokens + new_tokens
    kv = kv_bytes(shape, c, width) * (1 if static_cache else DYNAMIC_CACHE_COPIES)
    prefill = prompt_tokens * forward_token_bytes(shape, c, attn, width) + prompt_tokens * width  # + the mask
    return kv + prefill + shape["vocab"] * (c + DECODE_LOGIT_BYTES + softcap_bytes(shape, c))


def softcap_bytes(shape: dict, c: int) -> int:
    """Per logit, what a final-logit softcap (Gemma 2) adds in evaluation: its division's and tanh's outputs before
    the product replaces the logits (training's fused LM head applies it inside its tiles)."""
    return 2 * c if shape.get("softcap") else 0


def scoring_row_bytes(shape: dict, c: int, tokens: int, scored: int, attn: str = "sdpa") -> float:
    """Peak bytes one scored row (prompt + completion, no KV cache) adds: its forward transients and the logits of
    its last ``scored + 1`` positions with their fp32 log-softmax."""
    return tokens * forward_token_bytes(shape, c, attn, tokens) + (scored + 1) * shape["vocab"] * (
        c + 3 * 4 + softcap_bytes(shape, c))


def packed_scoring_bytes(shape: dict, c: int, prompt_tokens: int, own_tokens: int) -> float:
    """Peak bytes of one prompt scored for several completions packed into one row after it, ``own_tokens`` in all
    (runner.evaluate.rank.score_groups): the row's forward transients with the softmax over the row (a custom mask can take
    SDPA off its fused kernels), its 4-D mask, and the completions' logits with their fp32 log-softmax."""
    width = prompt_tokens + own_tokens
    return (width * forward_token_bytes(shape, c, "eager", width) + width * width * c
            + (own_tokens + 1) * shape["vocab"] * (c + 3 * 4 + softcap_bytes(shape, c)))


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
