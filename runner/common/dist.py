"""The world a launcher set up (torchrun, accelerate launch): this process's rank, the number of processes, and the
few collectives the runner needs around the trainer.

The runner never spawns or wires processes: it reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as the
launchers set them, and joins the process group through accelerate (NCCL on GPUs, gloo on CPUs), which the
trainer then reuses. Without a launcher the world is one process and everything here is a no-op.

Side effects happen once: rank 0 claims the run folder and writes the records; the other ranks learn the folder
from it (``broadcast``) and hand their results to it (``gather``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from runner.common.errors import RecipeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world() -> World:
    """This process's place, from the launcher's environment (one process without a launcher)."""
    size = _env_int("WORLD_SIZE", default=1)
    if size <= 1:
        return World()
    return World(rank=_env_int("RANK", default=0), size=size, local_rank=_env_int("LOCAL_RANK", default=0),
                 local_size=_env_int("LOCAL_WORLD_SIZE", default=size))


def init() -> World:
    """Join the launcher's process group (once). Launch mistakes are one-line errors before anything loads."""
    w = world()
    if w.size == 1:
        return w
    import torch
    import torch.distributed as td

    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if w.local_size > gpus:
            raise RecipeError("--nproc-per-node", f"{w.local_size} processes on this machine but it has {gpus} "
                              f"GPU{'s' if gpus != 1 else ''}", f"launch at most {gpus} processes per machine")
        torch.cuda.set_device(w.local_rank)
    if not td.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # env:// rendezvous; NCCL on GPUs, gloo on CPUs
    return w


def end(code: int) -> int:
    """``code`` back for ``SystemExit``, except in a process that joined a launcher's group and succeeded: that one
    ends here, its Python exit handlers run (trackers finish, logs flush) but not the interpreter's teardown.
    Tearing down with a gloo group alive aborted a rank that had finished its work ("terminate called without an
    active exception", SIGABRT) about once in ten suite runs of a sweep under torchrun, and the launcher then
    reported the whole job failed; leaving the group first did not prevent it. A failing rank exits as before: one
    that ended at once let the launcher stop rank 0 before it printed the error line it alone prints."""
    import sys

    td = sys.modules.get("torch.distributed")
    if code != 0 or td is None or not td.is_available() or not td.is_initialized():
        return code
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


_COLLECTIVES = [0]  # how many collectives this process has joined


def diverged_yet() -> bool:
    """Whether this process has joined a collective. Before the first one every rank runs the same checks on the
    same recipe and data, so a user error then is every rank's and rank 0 alone needs to say it."""
    return _COLLECTIVES[0] > 0


def _group_ready() -> bool:
    if world().size == 1:
        return False
    import torch.distributed as td

    return td.is_available() and td.is_initialized()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not _group_ready():
        return obj
    import torch.distributed as td

    box = [obj]
    _COLLECTIVES[0] += 1
    td.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _group_ready():
        return [obj]
    import torch.distributed as td

    out = [None] * td.get_world_size()
    _COLLECTIVES[0] += 1
    td.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _group_ready():
        import torch.distributed as td

        _COLLECTIVES[0] += 1
        td.barrier()


def share(items: Iterable, w: World | None = None) -> Iterator:
    """This rank's share of ``items`` (every size-th item from its rank): whole batches go to one rank, so each
    batch is the same as in a one-process run and greedy predictions do not depend on the number of processes."""
    w = w or world()
    return islice(items, w.rank, None, w.size)


def balanced(batch_size: int, n: int, w: World | None = None) -> int:
    """Under a launcher, the batch size (at most ``batch_size``) that cuts ``n`` items into a number of batches
    every rank gets the same share of: whole batches go round-robin (``share``), so three batches on two ranks
    would leave one rank twice the work. One process: ``batch_size``."""
    w = w or world()
    if w.size == 1 or n <= 0:
        return batch_size
    each = -(-n // (w.size * batch_size))  # batches per rank at the largest size allowed
    return -(-n // (w.size * each))


def sharded(model) -> bool:
    """Whether ``model`` is sharded by FSDP (1 or 2): then every forward pass needs every rank, in step."""
    return any("FullyShardedDataParallel" in type(m).__name__ or type(m).__name__.startswith("FSDP")
               for m in model.modules())


def split_step(per_step: int, size: int) -> int:
    """Examples per optimizer step on each rank; the recipe's step must split evenly."""
    if per_step % size:
        raise RecipeError("training.gradient_accumulation_steps",
                          f"micro_batch_size x gradient_accumulation_steps = {per_step} examples per optimizer step "
                          f"cannot be split evenly across {size} processes",
                          f"make it a multiple of {size}, or launch a number of processes that divides {per_step}")
    return per_step // size
