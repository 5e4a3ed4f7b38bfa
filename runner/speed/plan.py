"""``runner plan RECIPE``: parameters and predicted peak GPU memory per speed profile from the model's config
alone (no weights), and the predicted training time. The memory model itself is runner.speed.memory.
"""

from __future__ import annotations

from dataclasses import replace

from runner.model import counting
from runner.model import lora as lora_mod
from runner.model import model as model_mod
from runner.speed import profiles, throughput
from runner.speed.memory import CUDA_CONTEXT_GB, GIB, PAGED, estimate, model_info


def report(recipe: dict, card_gb: float | None = None, gpus: int = 1, card: tuple[str, str] | None = None) -> str:
    """The plan as text. ``card``: (runner.speed.throughput card, why it was chosen) adds the predicted training
    time; None (no GPU here, none named: runner.speed.throughput.find_card) says that no time is predicted."""
    config = model_mod.load_config(recipe)
    model_mod.check(recipe)
    trainable, total = counting.meta_lora_counts(recipe, model_mod.meta_model(config))
    info = model_info(recipe, config)
    t = recipe["training"]
    per_step = t["micro_batch_size"] * t["gradient_accumulation_steps"]
    lines = [f"{recipe['name']}: {recipe['model']['name_or_path']} ({config.model_type}), "
             f"{_quant_text(recipe)}, {_lora_text(recipe)}",
             counting.parameter_line(trainable, total),
             f"{recipe['prompt']['max_length']} tokens a row, {per_step} examples per optimizer step"
             + (f" ({profiles.per_rank_step(recipe, gpus)} on each of {gpus} GPUs)" if gpus > 1 else "")
             + f", optimizer {t['optimizer']}"
             + (f", card {card_gb:.1f} GiB" if card_gb else ", no GPU here: GPU memory predicted for a card of "
                "any size (fast assumes an unlimited one)"), ""]
    strategies = ("none",) if gpus == 1 else ("ddp", "fsdp")
    header = "peak reserved (predicted)" if gpus == 1 else "per GPU (predicted)"
    col = (lambda text: f"{text:<9} ") if gpus > 1 else (lambda text: "")  # the strategy column, with several GPUs
    lines.append(f"{'profile':<11} {col('strategy')}{'micro-batch':<12} {'checkpointing':<14} {header:>26}")
    for name in ("none", "fast", "balanced", "low_memory"):
        for strategy in strategies:
            trial = {**recipe, "training": {**t, "profile": name, "distributed": "auto" if gpus == 1 else strategy}}
            try:
                speed = profiles.resolve(trial, config, card_gb, detect=False, info=info, world_size=gpus)
            except Exception as exc:  # a budget nothing fits: say so in the table
                lines.append(f"{name:<11} {col(strategy)}{'-':<12} {'-':<14} {str(getattr(exc, 'problem', exc)):>26}")
                continue
            if speed.predicted_gb is None:  # profile none without a card: resolve() predicts nothing, the plan does
                speed = replace(speed, predicted_gb=estimate(trial, config, speed, info).reserved_gb)
            lines.append(f"{name:<11} {col(strategy)}{f'{speed.micro_batch_size} x {speed.gradient_accumulation_steps}':<12} "
                         f"{'yes' if speed.gradient_checkpointing else 'no':<14} {speed.predicted_gb:>22.2f} GiB")
    mine = profiles.pick_profile(t["profile"], card_gb)
    timing = ["", throughput.NOT_PREDICTED] if card is None else []
    if card is not None:
        timing = ["", *throughput.report_lines(recipe, card[0], card[1], info["total"])]
        if gpus > 1:
            timing.append(f"(one GPU's throughput: {gpus} GPUs divide the time by at most {gpus})")
    try:
        speed = profiles.resolve(recipe, config, card_gb, detect=False, info=info, world_size=gpus)
    except Exception as exc:
        lines += ["", f"training.profile {t['profile']}: {getattr(exc, 'problem', exc)}", *timing]
        return "\n".join(lines)
    if gpus > 1:
        lines += ["", f"training.distributed {t['distributed']} -> {speed.distributed} on {gpus} GPUs"
                  + (" (one card holds the model)" if speed.distributed == "ddp" and t["distributed"] == "auto" else "")]
    if speed.predicted_gb is not None:
        est = estimate(recipe, config, speed, info)
        lines += ["", f"breakdown for training.profile {t['profile']}"
                  + (f" -> {mine}" if mine != t["profile"] else "") + f" ({speed.describe()}):"]
        for name, value in est.parts.items():
            lines.append(f"  {name:<62} {value / GIB:7.2f} GiB")
        lines.append(f"  {'= peak reserved by torch' + (' per GPU' if gpus > 1 else ''):<62} {est.reserved / GIB:7.2f} GiB")
        lines.append(f"  {'+ CUDA context and workspaces (outside torch)':<62} {CUDA_CONTEXT_GB:7.2f} GiB")
        lines.append(f"  {'= device memory':<62} {est.reserved / GIB + CUDA_CONTEXT_GB:7.2f} GiB")
        if t["optimizer"] in PAGED:
            lines.append(f"  ({t['optimizer']} keeps its state in paged (managed) memory, not counted above)")
    return "\n".join(lines + timing)


def _quant_text(recipe: dict) -> str:
    q = recipe["quantization"]
    if q["method"] == "none":
        return "no quantization"
    if q["method"] == "bnb_8bit":
        return "8-bit weights"
    return f"{q['quant_type'].upper()}{' double-quant' if q['double_quant'] else ''}"


def _lora_text(recipe: dict) -> str:
    return lora_mod.lora_text(recipe["lora"])
