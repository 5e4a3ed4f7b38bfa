"""Speed profiles: how a recipe trains on the card at hand, never what it trains.

A profile keeps the recipe's examples per optimizer step (micro_batch_size x gradient_accumulation_steps), data,
LoRA, optimizer and schedule. It changes only the layout of the work:

- fixed [micro_batch, max_length] rows with per-row position_ids and no attention mask, so every step has one
  shape (cuDNN attention and the allocator rebuild nothing) and SDPA runs its causal kernel;
- bf16 weights and activations end to end: without the fp32 upcast peft's prepare_model_for_kbit_training adds,
  and without autocast (which runs LayerNorm in fp32, making the residual stream fp32 again behind 4-bit layers);
- a fused GELU where the model's activation is the same formula written as Python ops;
- the cuDNN SDPA backend off (it builds an execution graph per new shape; flash attention is as fast here);
- the micro-batch / accumulation split and gradient checkpointing chosen from runner.speed.memory's estimate to fit
  the profile's budget, preferring large micro-batches without recompute.

``none`` is the recipe exactly as written; ``auto`` picks ``none`` on a CPU (the tiny recipes keep their speed)
and a profile by card memory on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from runner.common import dist
from runner.common.errors import RecipeError
from runner.speed import memory

# The memory each profile fits (GiB of torch's peak reserved memory); fast takes the card's.
BUDGET_GB = {"balanced": 20.0, "low_memory": 3.8}
FAST_SHARE = 0.9  # of the card's memory for fast: the CUDA context and other processes need the rest
# Card memory (GiB) from which auto picks fast, then balanced; below that, low_memory.
AUTO_FAST_GB, AUTO_BALANCED_GB = 40.0, 16.0
# Tokens per micro-batch at which host overhead (kernel launches, Python) is about half the step time: larger
# micro-batches amortize it. Recompute (gradient checkpointing) costs about a third more compute.
HALF_SATURATION_TOKENS = 2048
RECOMPUTE_COST = 4 / 3


@dataclass(frozen=True)
class Speed:
    profile: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    fixed_shapes: bool = False
    keep_dtype: bool = False
    fused_activation: bool = False
    cudnn_sdpa: bool = True
    compiled: bool = False  # each decoder layer under torch.compile while training (training.compile)
    cuda_graphs: bool = False  # the compiled layers replayed as CUDA graphs (fixed rows on a GPU)
    compile_note: str | None = None  # why this architecture trains uncompiled where the profile would compile
    budget_gb: float | None = None
    predicted_gb: float | None = None
    world_size: int = 1
    distributed: str = "none"  # none (one process) | ddp | fsdp

    def describe(self) -> str:
        ckpt = "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing"
        text = f"profile {self.profile}: micro-batch {self.micro_batch_size} x {self.gradient_accumulation_steps}"
        if self.world_size > 1:
            text += f" per process x {self.world_size} processes ({self.distributed})"
        text += f", {ckpt}"
        extras = [name for on, name in ((self.fixed_shapes, "fixed rows"), (self.keep_dtype, "bf16"),
                                        (self.fused_activation, "fused activation"),
                                        (not self.cudnn_sdpa, "no cuDNN attention"),
                                        (self.compiled, "compiled layers"),
                                        (self.cuda_graphs, "as CUDA graphs")) if on]
        text += "".join(f", {name}" for name in extras)
        if self.compile_note:
            text += f", not compiled: {self.compile_note}"
        if self.predicted_gb is not None:
            text += f"; predicted peak {self.predicted_gb:.1f} GiB" + (" per GPU" if self.world_size > 1 else "")
        if self.budget_gb is not None:
            text += f" (budget {self.budget_gb:.1f} GiB)"
        return text

    def as_dict(self) -> dict:
        return asdict(self)


def gpu_memory_gb() -> float | None:
    """Total memory of the current CUDA device in GiB, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def pick_profile(name: str, card_gb: float | None) -> str:
    if name != "auto":
        return name
    if card_gb is None:
        return "none"
    if card_gb >= AUTO_FAST_GB:
        return "fast"
    return "balanced" if card_gb >= AUTO_BALANCED_GB else "low_memory"


def budget_for(recipe: dict, profile: str, card_gb: float | None) -> float | None:
    if recipe["training"]["vram_budget_gb"] is not None:
        return float(recipe["training"]["vram_budget_gb"])
    if profile == "fast":
        return card_gb * FAST_SHARE if card_gb is not None else None
    return BUDGET_GB.get(profile)


def per_rank_step(recipe: dict, world_size: int) -> int:
    """Examples per optimizer step on each process: the recipe's step, split evenly across the processes."""
    t = recipe["training"]
    return dist.split_step(t["micro_batch_size"] * t["gradient_accumulation_steps"], world_size)


def as_written(recipe: dict, profile: str = "none", world_size: int = 1, strategy: str = "none") -> Speed:
    """The recipe's micro-batch and checkpointing; on several processes the micro-batch shrinks only as far as
    each process's share of the step needs."""
    t = recipe["training"]
    share = per_rank_step(recipe, world_size)
    micro = math.gcd(t["micro_batch_size"], share)
    return Speed(profile, micro, share // micro, t["gradient_checkpointing"], world_size=world_size,
                 distributed=strategy)


def candidates(recipe: dict, profile: str, world_size: int = 1, strategy: str = "none") -> list[Speed]:
    """Every split of each process's share of the step into micro-batches, with and without recompute."""
    share = per_rank_step(recipe, world_size)
    flags = {} if profile == "none" else dict(fixed_shapes=True, keep_dtype=True, fused_activation=True,
                                               cudnn_sdpa=False)
    out = []
    for micro in (m for m in range(share, 0, -1) if share % m == 0):
        for gc in (False, True):
            out.append(Speed(profile, micro, share // micro, gc, world_size=world_size, distributed=strategy, **flags))
    return out


def pick_strategy(recipe: dict, config, world_size: int, budget: float | None, info: dict | None) -> str:
    """ddp when one card holds the model with the smallest setting (micro-batch 1, checkpointing), else fsdp."""
    if world_size == 1:
        return "none"
    chosen = recipe["training"]["distributed"]
    if chosen != "auto":
        return chosen
    if budget is None:  # CPU processes (gloo): every process holds the model
        return "ddp"
    smallest = Speed("none", 1, 1, True, keep_dtype=True, fused_activation=True, world_size=world_size,
                     distributed="ddp")
    return "ddp" if memory.estimate(recipe, config, smallest, info).reserved_gb <= budget else "fsdp"


def score(speed: Speed, seq_len: int) -> float:
    """Relative throughput: bigger micro-batches amortize host overhead; recompute costs compute."""
    tokens = speed.micro_batch_size * seq_len
    return tokens / (tokens + HALF_SATURATION_TOKENS) / (RECOMPUTE_COST if speed.gradient_checkpointing else 1.0)


def resolve(recipe: dict, config, card_gb: float | None = None, *, detect: bool = True,
            info: dict | None = None, world_size: int | None = None) -> Speed:
    """The settings training will use on each of ``world_size`` processes (default: the launcher's). Raises
    RecipeError (before any weight loads) when the step cannot be split or nothing fits the budget."""
    if detect and card_gb is None:
        card_gb = gpu_memory_gb()
    speed = _resolve(recipe, config, card_gb, info, world_size or dist.world().size)
    compiled = compiles(recipe, speed, card_gb)
    note = None
    if compiled and config is not None:
        note = compile_blocker(info if info is not None else memory.model_info(recipe, config))
        compiled = note is None
    return replace(speed, compiled=compiled, cuda_graphs=compiled and graphs(speed, card_gb), compile_note=note)


def compile_blocker(info: dict) -> str | None:
    """Why an architecture's decoder layers cannot be compiled for training (None: they can), from what its meta
    model declares (runner.speed.memory.model_info). Each family's decoder layer is the class transformers names in
    ``_no_split_modules``; what stops torch.compile is how the adapter reaches the weights, not the family's name."""
    if info.get("lora_expert_elements"):
        return ("LoRA on the experts' stacked weights registers a parametrization around them on every forward "
                "(peft's ParamWrapper), which torch.compile does not trace; list attention modules only in "
                "lora.target_modules to compile")
    return None


def compiles(recipe: dict, speed: Speed, card_gb: float | None) -> bool:
    """training.compile: as written, or (auto) on a GPU under a profile whose shapes are fixed and that neither
    recomputes (checkpointing) nor shards (fsdp). Measured on one H200 (bench/RESULTS.md, "Compiled layers"): the
    study recipe's steps 1.22-1.30x faster at 16 rows and 1.30-1.40x at 8 (each process's share on 2 GPUs), the same
    memory; compiling adds 9-17 s to the first step (it pays after a few hundred steps of the study recipe). On a CPU
    compiling costs more than the tiny runs it would speed up (~1 min for the tiny twin's two layers)."""
    chosen = recipe["training"]["compile"]
    if chosen != "auto":
        return bool(chosen)
    return (card_gb is not None and speed.fixed_shapes and not speed.gradient_checkpointing
            and speed.distributed != "fsdp")


def graphs(speed: Speed, card_gb: float | None) -> bool:
    """Compiled layers replay as CUDA graphs (torch.compile's reduce-overhead mode) on a GPU when every batch has one
    shape (the profiles' fixed rows): a graph is captured once per shape. A layer's ~30 kernels then cost one launch,
    which is what bounds the small steps a DDP rank runs. Measured on one H200 (bench/RESULTS.md, "CUDA graphs"): the
    study recipe's compiled step 1.06-1.21x faster at 16 x 1, 1.15-1.39x at 8 x 1, 1.48x at 8 x 2, the same losses,
    +0.1-0.6 GiB."""
    return card_gb is not None and speed.fixed_shapes


def _resolve(recipe: dict, config, card_gb: float | None, info: dict | None, world_size: int) -> Speed:
    profile = pick_profile(recipe["training"]["profile"], card_gb)
    budget = budget_for(recipe, profile, card_gb)
    as_written_only = profile == "none" and recipe["training"]["vram_budget_gb"] is None
    if as_written_only and card_gb is None:  # on a CPU there is no GPU memory to predict
        return as_written(recipe, world_size=world_size, strategy=pick_strategy(recipe, config, world_size, None, None))
    info = info if info is not None else memory.model_info(recipe, config)  # a LoRA'd meta model: only when needed
    strategy = pick_strategy(recipe, config, world_size, budget if budget is not None else card_gb, info)
    if as_written_only:
        speed = as_written(recipe, world_size=world_size, strategy=strategy)
        return replace(speed, predicted_gb=memory.estimate(recipe, config, speed, info).reserved_gb)
    options = [replace(s, budget_gb=budget, predicted_gb=memory.estimate(recipe, config, s, info).reserved_gb)
               for s in candidates(recipe, profile, world_size, strategy)]
    seq_len = recipe["prompt"]["max_length"]
    fitting = [s for s in options if budget is None or s.predicted_gb <= budget]
    if not fitting:
        smallest = min(options, key=lambda s: s.predicted_gb)
        key = "training.vram_budget_gb" if recipe["training"]["vram_budget_gb"] is not None else "training.profile"
        raise RecipeError(key, f"nothing fits {budget:.3g} GiB: the smallest setting (micro-batch "
                          f"{smallest.micro_batch_size}, gradient checkpointing) needs {smallest.predicted_gb:.3g} GiB",
                          "raise the budget, lower prompt.max_length, or use a smaller model; `runner plan` shows the"
                          " breakdown")
    return max(fitting, key=lambda s: (score(s, seq_len), s.micro_batch_size))


REAL_TOKENS = "real_tokens"  # FixedRows' count of each row's tokens that are not padding


@dataclass(frozen=True)
class FixedRows:
    """Collates tokenized examples, or TRL's packed rows, into [batch, length] tensors of one fixed shape.

    Rows are right-padded; position_ids count from 0 at the start of every packed example, and the padding
    continues the last example's count; no attention mask is passed. Under causal attention no real token sees
    the padding after it, and transformers turns restarting position_ids into a block-diagonal mask, so packed
    examples don't see one another. A label at the first token of a packed example would be predicted from the
    previous example, so it is dropped.

    ``rows``: a batch with fewer examples (an epoch's or evaluation's last) gets rows of padding without labels up
    to this many, so compiled layers see one shape and are not compiled (and their CUDA graphs captured) again for
    one batch; the loss and its gradients are the unpadded batch's.

    ``real_tokens`` (per row) is what the log's ``num_tokens`` counts: without an attention mask the padding could
    not be told apart (runner.train.sft.Trainer takes it out before the model sees the batch).
    """

    pad_token_id: int
    length: int
    rows: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        n = max(len(examples), self.rows or 0)
        input_ids = torch.full((n, self.length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, self.length), -100, dtype=torch.long)
        position_ids = torch.empty((n, self.length), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = example["input_ids"]
            if len(ids) > self.length:
                raise ValueError(f"a row of {len(ids)} tokens is longer than the fixed length {self.length}")
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            labels[row, : len(ids)] = torch.as_tensor(example.get("labels", ids))
            lengths = list(example.get("seq_lengths") or [len(ids)])
            start = 0
            for seq_len in lengths[:-1]:
                position_ids[row, start:start + seq_len] = torch.arange(seq_len)
                start += seq_len
                labels[row, start] = -100
            position_ids[row, start:] = torch.arange(self.length - start)
        position_ids[len(examples):] = torch.arange(self.length)
        real = torch.zeros(n, dtype=torch.long)
        real[: len(examples)] = torch.as_tensor([len(example["input_ids"]) for example in examples], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, REAL_TOKENS: real}
