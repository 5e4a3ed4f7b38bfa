"""CPU tuning, in one place: the environment the native libraries read (set once, when the CLI starts: ``start``)
and torch's thread count (set from training.num_threads where a model starts computing: ``torch_threads``).

Each setting, as measured on the 2-core machine of the README ("On a CPU"):

- OMP_WAIT_POLICY=PASSIVE: OpenMP threads that wait for work sleep instead of spinning. Spinning waiters take the
  cores the working threads need when a CPU is shared or busy: on 2 busy cores the tiny XSum twin's training steps
  ran ~10x slower (1.7 s of CPU per step instead of 0.3 s); on a GPU or an idle CPU sleeping costs nothing visible.
- OMP_NUM_THREADS: the OpenMP and BLAS pools start at this process's share of the cores (under a launcher the
  processes of one machine share them; torchrun sets 1 itself when it is unset).
- TOKENIZERS_PARALLELISM=false: the fast tokenizers' own thread pool off, since forking after it ran is unsafe;
  runner.evaluate.rank tokenizes on threads of its own.
- MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_: glibc hands a freed tensor's memory back to the
  system and the next step page-faults it in again (an AG News twin run: 2.9 million faults, 5.4 s of system time
  out of 29 s); with these the memory stays in the process (0.2 million faults, 0.9 s).

A variable already set (by the user, a launcher or a test) is left as it is.

When each is read decides where it can be set. libgomp, BLAS and tokenizers read theirs when they load, so setting
them in os.environ before anything imports torch is enough. glibc reads MALLOC_* once, when the process starts,
before any Python runs: set in os.environ they would reach only child processes. So ``start`` puts the missing ones
into the environment and executes the same command line again, once (the new process finds them set and goes on):
`runner` and `python -m runner` get them wherever they are started, and the Makefile and the tests rely on that
rather than repeating the values (the tests put ``environment()`` into the environment of the commands they start,
so that the commands they fork from a preloaded process, tests/warm.py, start with them and are not executed again).
"""

from __future__ import annotations

import os
import sys

from runner.common import dist

# Read when the libraries load: set in os.environ before anything imports torch.
AT_IMPORT = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
# Read by glibc when the process starts: 32 MiB (no mmap for tensors below it), 4 GiB (no trimming below it),
# 256 MiB (grow the heap in steps this large).
AT_EXEC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
           "MALLOC_TOP_PAD_": str(256 * 2**20)}


def cores() -> int:
    """This process's share of the cores it may run on: the processes a launcher started on one machine share them."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, n // dist.world().local_size)


def data_workers(rows: int, per_worker: int = 20_000) -> int | None:
    """Processes that prepare ``rows`` examples (datasets' num_proc): one per ``per_worker`` rows, up to this
    process's cores; None (this process alone) for smaller data, where starting workers costs more than it saves."""
    n = min(cores(), rows // per_worker)
    return n if n >= 2 else None


def environment() -> dict[str, str]:
    """Every variable this module sets, with the value it sets when the variable is unset."""
    return {**AT_IMPORT, "OMP_NUM_THREADS": str(cores()), **AT_EXEC}


def settle(environ=os.environ) -> list[str]:
    """Set in ``environ`` every variable of ``environment()`` it lacks; returns those of them that glibc reads only
    when a process starts (which this process therefore runs without)."""
    added = {key: value for key, value in environment().items() if key not in environ}
    environ.update(added)
    return [key for key in added if key in AT_EXEC]


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):  # not glibc (macOS, musl, Windows): its MALLOC_* mean nothing
        return False


def start() -> None:
    """Once, when the CLI starts, before anything imports torch: the environment above, and where glibc's settings
    were missing, the same command executed again with them (same process id, arguments, standard streams)."""
    if settle() and _glibc():
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        except OSError:  # cannot execute again: the command runs on without them (slower on a CPU, nothing else)
            pass


def torch_threads(recipe: dict) -> int:
    """torch's threads: training.num_threads, else one per core of this process's share; oversubscribed CPU threads
    make torch many times slower. Set where a model starts computing, since a sweep's cells may differ."""
    import torch

    n = recipe["training"]["num_threads"] or cores()
    torch.set_num_threads(n)
    return n
