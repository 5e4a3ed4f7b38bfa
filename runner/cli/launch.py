"""``python -m runner.cli.launch --nproc-per-node N COMMAND ...``: ``runner COMMAND ...`` in N processes through
torchrun's own entry point (torch.distributed.run.main, the ``torchrun`` script's), what ``make train NPROC=N`` runs.

torchrun ends a failed job with its own traceback (ChildFailedError and a table of failures) after the ranks'
lines; here that becomes one line naming the rank that ended first and its exit status, and the launcher exits
with that status (2 for the user's mistake, 1 for the machine's, 130 / 143 for Ctrl-C / SIGTERM), so that the
runner's error line above it is the last word that explains."""

from __future__ import annotations

import sys


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the runner's command and its arguments): the first word that is not an option of
    torchrun's (``--flag``, ``--name value``, ``--name=value``, as its own parser declares them) starts the
    runner's part."""
    from torch.distributed.run import get_args_parser

    takes = {opt: action.nargs != 0 for opt, action in get_args_parser()._option_string_actions.items()}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if takes.get(argv[i], False) else 1
    return argv[:i], argv[i:]


def status(exitcode: int) -> int:
    """A rank's exit status as a shell tells it: a signal N (a negative exitcode from multiprocessing) is 128 + N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def main(argv: list[str] | None = None) -> int:
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    options, command = split(sys.argv[1:] if argv is None else argv)
    # the agent's own report of a failure (a table, at error level) would repeat, worse, what the ranks said
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.ERROR)  # its OMP_NUM_THREADS notice: the runner sets
    # the CPU settings of each rank itself (runner.common.cpu)
    try:
        torchrun([*options, "-m", "runner", *command])
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = status(failure.exitcode)
        print(f"error: launcher: rank {rank} ended first, with exit status {code}; the launcher stopped the others "
              "(the error line above says why)", file=sys.stderr)
        return code
    except SignalException as exc:  # the launcher itself was stopped: its ranks were stopped with it
        code = status(-int(exc.sigval))
        print(f"error: launcher: stopped by {exc.sigval.name}; every rank was stopped (the lines above say what "
              "was kept)", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
