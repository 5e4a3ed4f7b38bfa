"""The trainer: TRL's SFTTrainer, with its per-batch metrics (entropy, token accuracy, tokens seen) summed on the
device and reduced once per log instead of once per micro-batch.

TRL gathers four tensors across the ranks and reads three of them on the host after every forward pass, before
the backward pass is queued. A host sync there stops the CPU from queueing work ahead of the GPU; at small
micro-batches the step is bound by that host time, and under DDP every gather also waits for the slowest rank.
The loss itself is TRL's (its fused LM head, token-averaged as TRL does); every other configuration goes to TRL.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer


class Trainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sums = {}  # mode -> device tensor of running sums since the last log (see compute_loss)

    def _lean(self, return_outputs: bool) -> bool:
        """The plain causal-LM loss the runner's recipes train with; anything else is left to TRL as written."""
        sp = getattr(self.accelerator, "parallelism_config", None)
        return (not return_outputs and self.compute_loss_func is None and self.label_smoother is None
                and not self.aux_loss_enabled and self.args.loss_type == "nll"
                and not (sp is not None and getattr(sp, "sp_enabled", False)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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
            seen = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(
                inputs["input_ids"].numel(), device=loss.device)
            # labelled tokens, summed entropy, top-1 hits, input tokens
            step = torch.stack([outputs.label_mask.sum().float(), outputs.entropy.detach().sum().float(),
                                outputs.is_top1.sum().float(), seen.float().to(loss.device)])
            self._sums[mode] = step if mode not in self._sums else self._sums[mode] + step
        return loss

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
