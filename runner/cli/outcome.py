"""How a command ends when it does not succeed: the one error line as each rank says it, what this process began
and cannot be resumed from removed, and after Ctrl-C an account of what was kept and removed."""

from __future__ import annotations

import os
import signal
import threading

from runner.common import dist
from runner.common.errors import RecipeError

# How gloo and NCCL report that a peer process died: not this rank's failure.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited", "ProcessGroupNCCL")


def for_rank(error: RecipeError, world: dist.World) -> str:
    """The error line as this rank says it. Until the ranks first meet, each runs the same checks on the same recipe
    and data, so rank 0 alone reports the user's mistakes; anything else, or anything after that, names the rank
    it happened on (the launcher stops the others)."""
    if world.size == 1 or (world.main and error.exit_code == 2):
        return error.line() + "\n"
    if error.exit_code == 2 and not dist.diverged_yet():
        return ""
    if any(sign in error.line() for sign in _PEER_GONE):
        return f"error: rank {world.rank}: another rank stopped first (its error line above says why)\n"
    return error.line().replace("error: ", f"error: rank {world.rank}: ", 1) + "\n"


def background_failure(failure: tuple[str, BaseException]) -> str:
    """A background thread failed while the command itself succeeded (what the thread did is missing: a
    TensorBoard log's last events, say): one warning line, the failure as classify names it."""
    from runner.common.errors import classify

    name, exc = failure
    line = classify(exc).line().removeprefix("error: ")
    return f"warning: a background thread ({name}) failed; the command's own results are complete: {line}"


def discard_unfinished() -> list | None:
    """Remove what this process began and cannot be resumed from (runner.store.runs keeps the list); what was
    kept and removed, None if cleaning up failed."""
    from runner.store import runs

    try:
        return runs.discard_unfinished()
    except Exception:  # cleaning up must never replace the error the user needs to see
        return None


def interrupted(left: list | None, how: str = "interrupted") -> str:
    """After Ctrl-C or SIGTERM (``how``: "interrupted", "terminated (SIGTERM)"): what was kept, what was removed,
    how to go on (runner.store.leftovers)."""
    if left is None:
        return how
    from runner.store import leftovers

    try:
        lines = leftovers.describe(left)
    except Exception:  # saying it must never hide that the command was interrupted
        return how
    if lines and lines[0].startswith("interrupted"):
        lines[0] = how + lines[0].removeprefix("interrupted")
    return "\n".join(lines)


def terminated_rank(world: dist.World) -> str:
    """A rank other than 0 ended by SIGTERM: true whoever sent it (the job's scheduler stopping every rank, or the
    launcher stopping the others after one failed, whose own line says why); rank 0 says what was kept."""
    return (f"error: rank {world.rank}: terminated (SIGTERM): the job was stopped, or another rank failed first "
            "(its line says why)")


# ---------------------------------------------------------------- signals and background threads


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `docker stop`, `timeout`, a launcher stopping its ranks): handled as Ctrl-C is, since
    every part of the runner that cleans up after Ctrl-C catches KeyboardInterrupt; exit status 143 (128 + 15)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def ending() -> None:
    """The command is ending (an error, an interruption): a SIGTERM now (a launcher stopping every rank once one
    failed) must not cut the cleanup and the one line short with a traceback of its own."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: None)


def sigterm_as_interrupt():
    """Install the SIGTERM handler for the life of main(); the previous handler back after (main() also runs
    in-process, in tests). Only the main thread may set a handler; elsewhere SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def thread_failed(failed: list, original, args) -> None:
    """A background thread's exception (the TensorBoard writer on a full disk or a too-long path, a data loader's
    worker): kept, not printed as a traceback beside the command's one error line; the library raises it again in
    the main thread (the writer's next write), where it becomes that line. RUNNER_DEBUG=1 prints it too."""
    if args.exc_type is SystemExit:
        return
    failed.append((getattr(args.thread, "name", "a thread"), args.exc_value))
    if os.environ.get("RUNNER_DEBUG"):
        original(args)
