"""Evaluation backends (``generation.backend``) and batch sizes (``generation.batch_size: auto``).

- plain: the model as loaded (4-bit + LoRA), a growing KV cache: what the runner always did.
- batched: the model as loaded, a static KV cache (allocated once per batch instead of re-concatenated every step).
- merged: LoRA merged into a dequantized copy of the base in the compute dtype (runner.model.merge), static KV cache: no
  dequantization per step and one matmul per projection instead of three.
- compiled: merged + transformers' torch.compile of the decoding step (mode reduce-overhead: CUDA graphs); the
  compile costs once per evaluation, so auto uses it only for long ones.

``auto`` is plain without a GPU (the tiny recipes keep their path and speed). On a GPU it is merged (or compiled)
when the copy fits beside a batch of at least MIN_BATCH prompts, else batched. The budget is the training profile's
(training.vram_budget_gb, or the profile's: low_memory's 3.8 GiB holds during evaluation too), capped by what the
card has free now. Batch sizes come from runner.speed.memory's model: the fixed part (what torch holds now, plus the
copy) and per row the KV cache of prompt + new tokens, the prefill's activations and decoding's logits.
Rank mode and the loss evaluator score rows (no KV cache) in batches sized the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from runner.common.errors import RecipeError
from runner.model import merge
from runner.speed import memory, profiles
from runner.speed.memory import GIB

BACKENDS = ("plain", "batched", "merged", "compiled")
MERGING = ("merged", "compiled")
# generation.batch_size auto where there is no GPU memory to size against: the batch the runner always used.
DEFAULT_BATCH = 16
# auto merges only when the copy leaves room for at least this many prompts a batch (else batched is faster).
MIN_BATCH = 16
# auto compiles the decoding step only when an evaluation runs at least this many decoding steps (batches x
# max_new_tokens): on one H200 (bench/RESULTS.md) compiling cost 27 s and saved ~4.7 ms a step at batch 256
# (84 -> 80 ms), so it pays after about 5,800 steps.
COMPILE_MIN_STEPS = 6000
# Scoring forward passes (rank mode, the loss evaluator) are compute-bound: past this many tokens a pass, a larger
# batch adds memory, not speed (the plain path reached 100 AG News examples/s with 12,800-token passes on an H200).
SCORING_TOKENS = 32768
# Device memory kept out of the budget: cuBLAS workspaces, the CUDA graphs' pool, kernels loaded on first use.
HEADROOM_GIB = 0.5


@dataclass(frozen=True)
class Choice:
    backend: str
    batch_size: int
    why: str = ""
    predicted_gb: float | None = None
    budget_gb: float | None = None

    @property
    def merges(self) -> bool:
        return self.backend in MERGING

    def record(self) -> dict:
        """What metrics.json keeps of the choice: the backend and batch size the predictions ran with."""
        return {"backend": self.backend, "batch_size": self.batch_size}

    def describe(self) -> str:
        text = f"backend {self.backend}, batch {self.batch_size}"
        if self.predicted_gb is not None:
            text += f", predicted peak {self.predicted_gb:.1f} GiB"
            if self.budget_gb is not None:
                text += f" of {self.budget_gb:.1f} GiB"
        return text + (f" ({self.why})" if self.why else "")


def check_recipe(recipe: dict) -> None:
    """What the backends need from a recipe (no torch here: `runner validate` calls it)."""
    g = recipe["generation"]
    if g["backend"] in MERGING and recipe["quantization"]["method"] == "bnb_8bit":
        raise RecipeError("generation.backend", f"{g['backend']} merges into dequantized 4-bit or unquantized "
                          "weights, not 8-bit ones", "use batched or plain, or quantization.method: bnb_4bit")
    if g["backend"] == "compiled" and g["num_beams"] > 1:
        raise RecipeError("generation.backend", "compiled decodes with a static KV cache, which beam search does "
                          "not reorder", "use merged, or generation.num_beams: 1")


# ---------------------------------------------------------------- memory


def budget_bytes(recipe: dict) -> float | None:
    """What evaluation may hold on the GPU (torch's reserved bytes): the training profile's budget, capped by the
    memory torch holds now plus what the card has free. None without a GPU."""
    import torch


    if not torch.cuda.is_available():
        return None
    card = profiles.gpu_memory_gb()
    profile = profiles.pick_profile(recipe["training"]["profile"], card)
    budget = profiles.budget_for(recipe, profile, card) or card * profiles.FAST_SHARE
    free, _ = torch.cuda.mem_get_info()
    return min(budget * GIB, torch.cuda.memory_reserved() + free - HEADROOM_GIB * GIB)


def _allocated() -> float:
    import torch

    return float(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0.0


def _dtype_bytes(model, backend: str = "merged") -> int:
    """Bytes per activation and KV cache element: the compute dtype's on the merged copy; the model as loaded may
    keep unquantized weights, and so its residual stream and cache, in fp32 (peft's upcast for 4-bit training)."""
    c = merge.compute_dtype(model).itemsize
    return c if backend in MERGING else max(c, model.get_input_embeddings().weight.dtype.itemsize)


def _round(batch: int, n: int) -> int:
    """At most ``n`` (every prompt in one batch), else a multiple of 8 (tensor-core friendly) when above 16."""
    if batch >= n:
        return n
    return batch - batch % 8 if batch > 16 else batch


def batch_for_budget(budget: float, fixed: float, per_row: float, rows_per_prompt: int, n: int) -> int:
    """The most prompts a batch (each ``rows_per_prompt`` rows of ``per_row`` bytes) whose predicted reserved
    memory with ``fixed`` bytes stays within ``budget``; 0 when not even one fits."""
    return _round(memory.rows_within(budget, fixed, per_row) // rows_per_prompt, n)


# ---------------------------------------------------------------- the choice


def _option(backend: str, per_row: float, rows_per_prompt: int, fixed_batch: int | None, n: int, budget: float,
            fixed: float) -> Choice:
    """``backend`` with ``fixed_batch`` prompts a batch, or as many as fit ``budget`` beside ``fixed`` bytes (rows of
    ``per_row`` bytes, ``rows_per_prompt`` a prompt, at most ``n`` prompts), and the peak that predicts."""
    if fixed_batch or backend == "plain":
        size = fixed_batch or DEFAULT_BATCH
    else:
        size = batch_for_budget(budget, fixed, per_row, rows_per_prompt, n)
    predicted = memory.reserved_for(fixed + max(size, 1) * rows_per_prompt * per_row)
    return Choice(backend, size, predicted_gb=predicted / GIB, budget_gb=budget / GIB)


def _pick(recipe: dict, model, n: int, row_bytes: dict[str, float], rows_per_prompt: int, steps_per_batch: int,
          batch: int | str, most: int | None = None) -> Choice:
    """The backend and batch size for ``n`` prompts; ``row_bytes[backend]`` is one row's predicted peak bytes on each
    backend; ``most``: at most this many prompts a batch when sized from memory."""
    requested = recipe["generation"]["backend"]
    fixed_batch = None if batch == "auto" else int(batch)
    budget = budget_bytes(recipe)
    if budget is None:  # no GPU: nothing to size against
        backend = "plain" if requested == "auto" else requested
        return Choice(backend, fixed_batch or DEFAULT_BATCH, "no GPU" if requested == "auto" else "")
    allocated = _allocated()
    copy = merge.copy_bytes(model, _dtype_bytes(model)) if merge.needs_copy(model) else 0.0
    # Every backend sized (arithmetic only); the rules below pick one.
    options = {b: _option(b, row_bytes[b], rows_per_prompt, fixed_batch, min(n, most or n), budget,
                          allocated + (copy if b in MERGING else 0.0)) for b in BACKENDS}
    if requested == "auto":
        merged = options["merged"]
        fits = merged.predicted_gb <= merged.budget_gb if fixed_batch else merged.batch_size >= min(MIN_BATCH, n)
        if not fits:
            chosen = replace(options["batched"], why="the merged copy does not fit the memory budget")
        else:
            steps = -(-n // merged.batch_size) * steps_per_batch
            compile_it = steps >= COMPILE_MIN_STEPS and recipe["generation"]["num_beams"] == 1
            chosen = replace(options["compiled"], why=f"{steps} decoding steps") if compile_it else merged
    else:
        chosen = options[requested]
        if requested in MERGING and chosen.batch_size < 1:
            raise RecipeError("generation.backend", f"{requested} needs {copy / GIB:.1f} GiB for the merged copy "
                              f"beside {allocated / GIB:.1f} GiB in use, and the memory budget is "
                              f"{budget / GIB:.1f} GiB", "use batched or auto, or raise training.vram_budget_gb")
    if chosen.batch_size < 1:
        chosen = replace(chosen, batch_size=1, why="even one prompt is predicted over the memory budget")
    return chosen


def for_generation(recipe: dict, model, lengths: list[int]) -> Choice:
    """Backend and prompts per generate() call for prompts of ``lengths`` tokens."""
    g = recipe["generation"]
    if g["backend"] != "auto" and g["batch_size"] != "auto":
        return Choice(g["backend"], int(g["batch_size"]))
    shape = memory.model_shape(model.config, model)
    attn = model.config._attn_implementation
    row_bytes = {b: memory.generation_row_bytes(shape, _dtype_bytes(model, b), max(lengths), g["max_new_tokens"],
                                                b != "plain" and g["num_beams"] == 1, attn) for b in BACKENDS}
    return _pick(recipe, model, len(lengths), row_bytes, g["num_beams"], g["max_new_tokens"], g["batch_size"])


def _scoring_bytes(model, backend: str, longest: int, scored_tokens: int, rows_per_prompt: int,
                   shared_prefix: bool) -> float:
    """One prompt's predicted peak bytes when scored on ``backend`` (see ``for_scoring``)."""
    shape, c = memory.model_shape(model.config, model), _dtype_bytes(model, backend)
    if shared_prefix and backend != "plain":
        return memory.packed_scoring_bytes(shape, c, longest - scored_tokens, rows_per_prompt * scored_tokens)
    return rows_per_prompt * memory.scoring_row_bytes(shape, c, longest, scored_tokens, model.config._attn_implementation)


def for_scoring(recipe: dict, model, lengths: list[int], scored_tokens: int, rows_per_prompt: int = 1,
                batch_size: int | None = None, shared_prefix: bool = False) -> Choice:
    """Backend and prompts per forward pass for scoring rows of ``lengths`` tokens whose last ``scored_tokens``
    are scored; each prompt is ``rows_per_prompt`` rows (rank mode: one per label), which the backends other than
    plain score as one packed row, the prompt run once, when ``shared_prefix`` (runner.evaluate.rank.score_groups). ``batch_size``
    overrides generation.batch_size (the loss evaluator's own). There is no decoding step to compile: compiled
    scores as merged."""
    g = recipe["generation"]
    batch = batch_size or g["batch_size"]
    backend = "merged" if g["backend"] == "compiled" else g["backend"]
    if backend != "auto" and batch != "auto":
        return Choice(backend, int(batch))
    longest = max(lengths)
    row_bytes = {b: _scoring_bytes(model, b, longest, scored_tokens, rows_per_prompt, shared_prefix) for b in BACKENDS}
    scoring = {**recipe, "generation": {**g, "backend": backend, "num_beams": 1}}
    # Tokens a forward pass runs per prompt: with a shared prompt, the prompt once and each label's own tokens.
    per_prompt = longest + (rows_per_prompt - 1) * scored_tokens if shared_prefix else longest * rows_per_prompt
    return _pick(scoring, model, len(lengths), row_bytes, 1, 0, batch, most=max(1, SCORING_TOKENS // per_prompt))


# ---------------------------------------------------------------- the model to run


class model_for:
    """``with model_for(choice, model) as net``: the model itself, or its merged copy (freed on exit)."""

    def __init__(self, choice: Choice, model):
        self.choice, self.model, self.copy = choice, model, None

    def __enter__(self):

        if not self.choice.merges or not merge.needs_copy(self.model):
            return self.model
        self.copy = merge.merged_copy(self.model)
        return self.copy

    def __exit__(self, *exc):
        if self.copy is not None:
            import torch

            # The copy's weights are released now, whoever still names the copy (the caller's `as` variable does):
            # no full garbage collection (~0.4 s in a loaded process) to find them.
            self.copy.to("meta")
            self.copy = None
            if self.choice.backend == "compiled":  # compiled code and CUDA graphs hold the copy in reference cycles
                import gc

                gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the copy's memory back to the card (training, the next evaluation)
        return False
