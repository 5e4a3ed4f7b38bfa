"""Attention per phase and per family. Which SDPA kernels a phase runs: cuDNN's attention or torch's own, set for that phase and restored after it.

cuDNN's attention plans an execution graph for every new input shape (host time), then runs fast. Measured on one
H200 (bench/RESULTS.md, "Evaluation kernels"): generation gains from it (1,000 XSum prompts at 69 prompts/s with it,
52 without: decoding reuses a batch's shapes thousands of times), while scoring passes lose (rank mode over 2,000
AG News rows whose batches are shapes not seen before: 6.0 s without it, 7.3-12.5 s with it), and so does training
with varying shapes (runner.speed.profiles turns it off there). Each phase says what it wants, so a process that trains
and then evaluates does not carry training's choice into generation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cudnn(enabled: bool) -> Iterator[None]:
    """cuDNN's SDPA on (``enabled``) or off inside the block; torch's previous setting restored after it."""
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


# Per phase: decoding reuses a batch's shapes thousands of times; a scoring pass meets each shape once. ``forced``:
# on or off whatever the phase would choose (bench/decode_probe.py measures both).
def for_generation(forced: bool | None = None):
    return cudnn(True if forced is None else forced)


def for_scoring(forced: bool | None = None):
    return cudnn(False if forced is None else forced)


def sliding_windows(config) -> list[int | None]:
    """Per decoder layer the sliding window it attends over (None: the whole sequence), as the config declares it:
    ``layer_types`` (Gemma 3, Qwen 3), else one ``sliding_window`` for every layer (Mistral, Phi-3) unless
    ``use_sliding_window`` turns it off (Qwen)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * cfg.num_hidden_layers
