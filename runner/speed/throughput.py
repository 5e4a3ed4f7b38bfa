"""Training time per speed profile, predicted from measured throughput (``bench/RESULTS.md``) for a named card.

The measurements: a Phi-2-shaped model (2,779,683,840 parameters), NF4 + LoRA r16 on q,k,v,dense, 512-token rows,
16 examples per optimizer step, 1,000 real XSum rows (mean 389.9 tokens an example), trained through the runner
itself; real (unpadded) tokens per second per profile. Divided by the mean example length they give examples per
second at that shape. A recipe's time is scaled from there linearly in the model's parameters and in
``prompt.max_length`` (the profiles train fixed [micro-batch, max_length] rows; the notebook baseline padded to
512 too), which holds while the matmuls dominate: a model far smaller than Phi-2 is bound by the host instead and
trains slower than predicted. ``tests/test_throughput.py`` keeps these numbers equal to the tables in
``bench/RESULTS.md``.
"""

from __future__ import annotations

import math

from runner.common.errors import RecipeError
from runner.speed import memory

MEASURED_PARAMS = 2_779_683_840
MEASURED_TOKENS = 512
MEASURED_EXAMPLE_TOKENS = 389.9
# card -> its full name, memory (GiB, as torch reports it), where the numbers are, and real tokens per second per
# profile. "none" is the study's notebook path (row A: eager attention, padded to 512, 4 x 4, checkpointing).
CARDS = {
    "H100": {"name": "NVIDIA H100 80GB HBM3", "memory_gb": 79.65, "source": "bench/RESULTS.md, call 4",
             "tokens_per_s": {"none": 3518, "low_memory": 8628, "balanced": 12385, "fast": 20474}},
    "H200": {"name": "NVIDIA H200", "memory_gb": 140.4, "source": "bench/RESULTS.md, call 2",
             "tokens_per_s": {"none": 2730, "low_memory": 6315, "balanced": 13670, "fast": 19423}},
}
DEFAULT_CARD = "H100"  # the study's target card


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def find_card(name: str | None, detected: str | None = None) -> tuple[str, str] | None:
    """(table key, why this card): the named card, else this machine's GPU when measured, else the default card for
    an unmeasured GPU; None without a GPU (the measurements are a GPU's: they predict nothing for a CPU)."""
    if name is not None:
        key = _match(name)
        if key is None:
            raise RecipeError("--card", f"no measured throughput for {name!r}",
                              f"measured: {', '.join(CARDS)} (bench/RESULTS.md); `make bench` measures another card")
        return key, "named"
    if detected is not None:
        key = _match(detected)
        if key is not None:
            return key, "this machine's GPU"
        return DEFAULT_CARD, f"assumed: this machine's {detected} was not measured; --card names a measured one"
    return None


# What the plan says instead of a time on a machine without a GPU.
NOT_PREDICTED = ("training time: not predicted: no GPU here, and the throughput measured (bench/RESULTS.md) is a "
                 f"GPU's, not this CPU's; --card {' or '.join(CARDS)} predicts it for that card")


def _match(text: str) -> str | None:
    return next((key for key in CARDS if key in text.upper()), None)


def examples_to_train(recipe: dict) -> int | None:
    """Examples the run trains on: max_steps x examples per step, else train_samples x epochs; None when only the
    data knows (train_samples null)."""
    t = recipe["training"]
    per_step = t["micro_batch_size"] * t["gradient_accumulation_steps"]
    if t["max_steps"]:
        return t["max_steps"] * per_step
    n = recipe["data"]["train_samples"]
    return None if n is None else math.ceil(n / per_step) * per_step * t["epochs"]


def examples_per_second(card: str, profile: str, total_params: int, max_length: int) -> float:
    """Predicted training examples per second of ``profile`` on ``card`` for a model of this size and row length."""
    measured = CARDS[card]["tokens_per_s"][profile] / MEASURED_EXAMPLE_TOKENS
    return measured * (MEASURED_PARAMS / total_params) * (MEASURED_TOKENS / max_length)


def predict_seconds(recipe: dict, card: str, profile: str, total_params: int) -> float | None:
    examples = examples_to_train(recipe)
    if examples is None:
        return None
    return examples / examples_per_second(card, profile, total_params, recipe["prompt"]["max_length"])


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def report_lines(recipe: dict, card: str, why: str, total_params: int) -> list[str]:
    """The plan's time block: per profile, examples/s and the predicted training time of this recipe."""
    examples = examples_to_train(recipe)
    info = CARDS[card]
    what = (f"{examples:,} examples" if examples is not None
            else "data.train_samples is null: time per 1,000 examples")
    lines = [f"training time on {info['name']} ({why}), from {info['source']} scaled to "
             f"{total_params:,} parameters x {recipe['prompt']['max_length']} tokens a row:",
             f"{'profile':<11} {'examples/s':>10} {'time (predicted)':>18}   {what}"]
    for profile in info["tokens_per_s"]:
        rate = examples_per_second(card, profile, total_params, recipe["prompt"]["max_length"])
        seconds = examples / rate if examples is not None else 1000 / rate
        lines.append(f"{profile:<11} {rate:>10.1f} {duration(seconds):>18}")
    if recipe["training"]["compile"] is not False:
        lines.append("(rates measured uncompiled; on a GPU, fast and balanced compile their decoder layers "
                     f"(training.compile: {str(recipe['training']['compile']).lower()}): 1.22-1.40x faster steps "
                     "on one H200, and replay them as CUDA graphs: a further 1.06-1.48x; bench/RESULTS.md "
                     "\"Compiled layers\", \"CUDA graphs\")")
    if recipe["training"]["optimizer"] in memory.BITSANDBYTES_OPTIMIZERS:
        lines.append("(and measured with bitsandbytes' optimizer syncing the GPU after every parameter, which the "
                     "runner now skips: the fast step 1.13x faster on one H200, bench/RESULTS.md)")
    if total_params < MEASURED_PARAMS / 10:
        lines.append("(a model this much smaller than the measured one is bound by the host, not the matmuls: "
                     "expect it to take longer)")
    return lines
