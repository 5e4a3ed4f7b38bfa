"""Divergence stops training, loudly: a loss or gradient norm that is NaN or infinite ends the run with one line
naming the step, before a checkpoint or an adapter of broken weights can be saved. The last good checkpoint
stays; the run folder is marked diverged (``env.json``), so ``resume: auto`` does not pick it up again.

The trainer's own ``logging_nan_inf_filter`` would hide a NaN loss behind the average of the earlier ones; the
runner turns it off. Each step's loss is checked on the device (no host sync per step) and read at each log,
which runner.store.checkpoints forces at every checkpoint and at the last step.
"""

from __future__ import annotations

import math
from pathlib import Path

from runner.common import dist
from runner.common.errors import RecipeError
from runner.store import checkpoints, runs


class Diverged(RecipeError):
    """Training produced a non-finite loss or gradient norm (the recipe's settings, so exit status 2)."""


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number: nothing to judge


def diverged(recipe: dict, run_dir: Path, step: int, what: str, value) -> Diverged:
    """Record the divergence in the run folder and return the error to raise."""
    ckpts = checkpoints.complete_checkpoints(run_dir)
    kept = f"the last good checkpoint {ckpts[-1]} is kept" if ckpts else "no checkpoint was saved before it"
    if dist.world().main:  # every rank sees the same averaged loss and all-reduced gradients; one writes
        runs.update_env(run_dir, diverged={"step": step, "what": what, "value": str(value)})
    lr = recipe["training"]["learning_rate"]
    return Diverged("training.learning_rate", f"training diverged at step {step}: the {what} is {value}",
                    f"lower training.learning_rate (now {lr:g}) and train again; {kept}")


def guard(recipe: dict, run_dir: Path):
    """A trainer callback that raises Diverged at the first log after a non-finite loss or gradient norm.
    ``attach(trainer)`` makes it see every step's loss, not only the logged window's mean."""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        def __init__(self):
            # (step, what, value on the device) per micro-batch loss and per optimizer step's gradient norm,
            # read (one host sync) at the next log
            self.pending: list[tuple[int, str, object]] = []

        def attach(self, trainer) -> None:
            original = trainer.training_step

            def training_step(model, inputs, *args, **kwargs):
                loss = original(model, inputs, *args, **kwargs)

                self.pending.append((trainer.state.global_step + 1, "loss", loss.detach().float().sum()))
                return loss

            trainer.training_step = training_step

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            # fp16 loss scaling skips steps whose gradients overflow: an infinite gradient is expected there.
            if model is None or args.fp16:
                return
            import torch

            groups: dict = {}  # foreach kernels take one device and dtype at a time
            for p in model.parameters():
                if p.requires_grad and p.grad is not None:
                    groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
            if groups:
                norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
                         for grads in groups.values()]
                first = norms[0].device
                norm = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]))
                self.pending.append((state.global_step + 1, "gradient norm", norm))

        def _first_bad(self):
            if not self.pending:
                return None
            import torch

            values = torch.stack([value.to(self.pending[0][2].device) for _, _, value in self.pending]).cpu().tolist()
            found = next(((step, what, value) for (step, what, _), value in zip(self.pending, values, strict=True)
                          if not math.isfinite(value)), None)
            self.pending = []
            return found

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            found = self._first_bad()
            if found is not None:
                raise diverged(recipe, run_dir, *found)
            for key, what in (("loss", "loss"), ("grad_norm", "gradient norm"), ("eval_loss", "eval loss")):
                if key in logs and not _finite(logs[key]) and not (key == "grad_norm" and args.fp16):
                    raise diverged(recipe, run_dir, state.global_step, what, logs[key])

    return DivergenceGuard()


def check_weights(model, recipe: dict, run_dir: Path, step: int) -> None:
    """No adapter of NaN weights is ever saved as a finished run: the trainable weights must all be finite."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
            raise diverged(recipe, run_dir, step, f"weight {name}", "not finite")
