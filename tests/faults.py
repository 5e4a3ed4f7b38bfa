"""`python tests/faults.py <runner arguments>`: the runner CLI with a fault injected at a chosen moment, so the
fault tests can kill a run exactly there (SIGKILL: no cleanup, no exception handler runs). FAULT= picks it:

- ``step:N``: when optimizer step N begins;
- ``sigint:N``: Ctrl-C (SIGINT to the process) when optimizer step N begins;
- ``sigterm:N``: SIGTERM to the process (a scheduler, `docker stop`, `timeout`) when optimizer step N begins;
- ``save:N``: while checkpoint-N is being written (its weights are on disk; optimizer, trainer state and the
  runner's manifest are not);
- ``eval:K``: after K batches of predictions have been written;
- ``nangrad:N``: a gradient of optimizer step N becomes NaN (what a too-high learning rate does), no kill;
- ``enospc:N``: the disk is full while checkpoint-N is written (an OSError, where no small tmpfs can be mounted);
- ``erofs:0``: the output folder is read-only (an OSError when the run folder is made).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(kind: str, n: int) -> None:
    if kind == "step":
        from transformers import Trainer

        original = Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step + 1 == n:
                _kill()
            return original(self, *args, **kwargs)

        Trainer.training_step = training_step
    elif kind in ("sigint", "sigterm"):
        from transformers import Trainer

        original = Trainer.training_step
        sent = signal.SIGINT if kind == "sigint" else signal.SIGTERM

        def training_step(self, *args, **kwargs):
            if self.state.global_step + 1 == n:
                os.kill(os.getpid(), sent)  # Python runs the handler (raising) at the next instruction
            return original(self, *args, **kwargs)

        Trainer.training_step = training_step
    elif kind == "save":
        from transformers import Trainer

        original = Trainer._save_optimizer_and_scheduler

        def save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == n:
                _kill()
            return original(self, output_dir)

        Trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    elif kind == "eval":
        from runner.evaluate import evaluate

        original = evaluate.predict

        def predict(model, tokenizer, prompts, recipe, choice, skip=frozenset(), on_batch=None):
            written = []

            def each(batch):
                on_batch(batch)
                written.append(len(batch))
                if len(written) == n:
                    _kill()

            return original(model, tokenizer, prompts, recipe, choice, skip=skip, on_batch=each)

        evaluate.predict = predict
    elif kind == "nangrad":
        from transformers import Trainer

        original = Trainer.training_step

        def training_step(self, model, *args, **kwargs):
            loss = original(self, model, *args, **kwargs)
            if self.state.global_step + 1 == n:
                next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
            return loss

        Trainer.training_step = training_step
    elif kind == "enospc":
        from transformers import Trainer

        original = Trainer._save_optimizer_and_scheduler

        def save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == n:
                raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "optimizer.pt"))
            return original(self, output_dir)

        Trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    elif kind == "erofs":
        from runner.store import runs

        def fresh_dir(parent, prefix=""):
            raise OSError(errno.EROFS, "Read-only file system", str(parent))

        runs._fresh_dir = fresh_dir
    else:
        raise SystemExit(f"unknown FAULT kind {kind!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    fault = os.environ.get("FAULT")
    if fault:
        kind, _, n = fault.partition(":")
        _install(kind, int(n))
    from runner.cli.cli import main

    raise SystemExit(main(sys.argv[1:]))
