"""The trainer: TRL's SFTTrainer, with its per-batch metrics (entropy, token accuracy, tokens seen) summed on the
device and reduced once per log instead of once per micro-batch, and bitsandbytes' optimizers stepping without a
device synchronisation per parameter.

TRL gathers four tensors across the ranks and reads three of them on the host after every forward pass, before
the backward pass is queued. A host sync there stops the CPU from queueing work ahead of the GPU; at small
micro-batches the step is bound by that host time, and under DDP every gather also waits for the slowest rank.
The loss itself is TRL's (its fused LM head, token-averaged as TRL does); every other configuration goes to TRL.
"""

from __future__ import annotations

import functools
import types

import torch
from trl import SFTTrainer

from runner.speed.profiles import REAL_TOKENS


class Trainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sums = {}  # mode -> device tensor of running sums since the last log (see compute_loss)
        self.graph_steps = False  # the decoder layers replay CUDA graphs (runner.train.train._setup_compile)
        # model -> {"eval_<metric>": value}: numbers of the evaluation that the loss pass does not give (an
        # evaluator's metric that early stopping watches: runner.train.early.scorer)
        self.extra_metrics = None
        # bitsandbytes' optimizers (0.50) synchronise the device after each parameter's update: 256 times a step for
        # the study's LoRA. Skipped where stream order already does their work (stream_ordered); bench/dist_bench.py
        # keeps them (False, set before training through train's ``instrument``) to measure the difference.
        self.skip_optimizer_syncs = True

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.skip_optimizer_syncs:
            skip_needless_syncs(optimizer)
        return optimizer

    def _lean(self, return_outputs: bool) -> bool:
        """The plain causal-LM loss the runner's recipes train with; anything else is left to TRL as written."""
        sp = getattr(self.accelerator, "parallelism_config", None)
        return (not return_outputs and self.compute_loss_func is None and self.label_smoother is None
                and not self.aux_loss_enabled and self.args.loss_type == "nll"
                and not (sp is not None and getattr(sp, "sp_enabled", False)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.graph_steps:
            # Each micro-batch is a new generation of the layers' graphs: their outputs from the last one (all
            # consumed by its backward) may be overwritten, instead of torch guessing where an iteration ends.
            torch.compiler.cudagraph_mark_step_begin()
        real = inputs.pop(REAL_TOKENS, None)  # fixed rows: the tokens that are not padding, not a model input
        if not self._lean(return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages the gradients (as TRL does)
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        with torch.no_grad():
            if real is not None:
                seen = real.sum()
            elif "attention_mask" in inputs:
                seen = inputs["attention_mask"].sum()
            else:
                seen = torch.tensor(inputs["input_ids"].numel(), device=loss.device)
            # labelled tokens, summed entropy, top-1 hits, input tokens
            step = torch.stack([outputs.label_mask.sum().float(), outputs.entropy.detach().sum().float(),
                                outputs.is_top1.sum().float(), seen.float().to(loss.device)])
            self._sums[mode] = step if mode not in self._sums else self._sums[mode] + step
        return loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.extra_metrics is not None and metric_key_prefix == "eval":
            # before the trainer logs the metrics and early stopping and the best checkpoint read them
            output.metrics.update(self.extra_metrics(self.model))
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums = self._sums.pop(mode, None)
        if sums is not None:  # one reduction over the ranks and one host read per log
            valid, entropy, correct, seen = self.accelerator.reduce(sums, reduction="sum").tolist()
            self._metrics[mode]["entropy"] = [entropy / valid if valid > 0 else 0.0]
            self._metrics[mode]["mean_token_accuracy"] = [correct / valid if valid > 0 else 0.0]
            if mode == "train":
                self._total_train_tokens += int(seen) // self._tp_size
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)


def skip_needless_syncs(optimizer) -> None:
    """A bitsandbytes optimizer's ``step`` without its device synchronisation after every parameter.

    bitsandbytes (0.50, ``Optimizer8bit.step``) calls ``torch.cuda.synchronize()`` after each parameter's update
    (a pull request to drop it for non-paged state is open upstream): the host waits for the GPU 256 times a step for
    the study's LoRA, and the GPU idles between the tiny kernels. The syncs order bitsandbytes' kernels, which run on
    the legacy default stream, with paged (CUDA managed) state and with work on other streams. Where no state tensor
    is paged (bitsandbytes pages only tensors of 100,000 elements or more: LoRA matrices at r <= 39 on a 2,560-wide
    model are smaller) and torch computes on that same stream, stream order alone keeps gradients, updates and the
    next forward pass in sequence, so ``step`` runs with the syncs left out; the first step (which allocates the
    state) and any other case keep them."""
    try:
        import bitsandbytes.optim.optimizer as bnb_optimizer
    except ImportError:
        return
    real = getattr(optimizer.step, "__func__", None)  # the class's step, inside torch's profiling hook
    if not isinstance(optimizer, bnb_optimizer.Optimizer8bit) or not hasattr(bnb_optimizer, "sync_gpu") or not real:
        return

    @functools.wraps(real)
    def step(self, *args, **kwargs):
        if not stream_ordered(self):
            return real(self, *args, **kwargs)
        sync, bnb_optimizer.sync_gpu = bnb_optimizer.sync_gpu, _no_sync
        try:
            return real(self, *args, **kwargs)
        finally:
            bnb_optimizer.sync_gpu = sync

    # a bound method, as torch's LR schedulers expect to find (they wrap optimizer.step.__func__)
    optimizer.step = types.MethodType(step, optimizer)


def stream_ordered(optimizer) -> bool:
    """Whether the state of every parameter this step updates (those with a gradient) exists, none of it is paged,
    and torch computes on the legacy default stream (where bitsandbytes launches its kernels)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    states = [optimizer.state.get(p) for p in params]
    if not params or any(not state for state in states):
        return False
    if any(getattr(value, "is_paged", False) for state in states for value in state.values()):
        return False
    return all(p.device.type == "cuda" for p in params) and torch.cuda.current_stream(params[0].device).cuda_stream == 0


def _no_sync(_tensor) -> None:
    return None
