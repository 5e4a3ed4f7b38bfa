"""What an interrupted command kept and removed, in words: the lines ``runner`` prints after Ctrl-C.

runner.store.runs.discard_unfinished does the removing (half-written checkpoints and adapters; folders made by this
command that hold nothing to continue from) and hands back each folder with what it removed; here each becomes a
sentence, with how to go on: the same command again where it picks the folder up (``training.resume: auto`` for a
run; always for an evaluation), else the command that does.
"""

from __future__ import annotations

from pathlib import Path

from runner.store import checkpoints, runs


def describe(left: list[runs.Left]) -> list[str]:
    """One or a few lines: what was kept (a run with its last complete checkpoint, a trained adapter, predictions),
    what was removed, and how to go on from it."""
    if not left:
        return ["interrupted: nothing was written"]
    # Runs that finished before the interruption (a sweep's earlier cells) need no word, unless they are all there is.
    unfinished = [item for item in left if not _finished(item)]
    lines = []
    for item in unfinished or left:
        lines += _evaluation(item) if item.kind == "evaluation" else _run(item)
    lines[0] = f"interrupted: {lines[0]}"
    return lines


def _finished(item: runs.Left) -> bool:
    return (item.kind == "run" and not item.discarded and not item.removed
            and runs.run_state(item.folder) == "finished")


def _removed(item: runs.Left) -> str:
    if not item.removed:
        return ""
    names = ", ".join(str(p.relative_to(item.folder)) for p in item.removed)
    return f"; removed the half-written {names}"


def _run(item: runs.Left) -> list[str]:
    if item.discarded:
        return [f"removed the run folder {item.folder}: no complete checkpoint yet, nothing to resume from"]
    state = runs.run_state(item.folder)
    if state == "train":
        ckpt = checkpoints.complete_checkpoints(item.folder)[-1]
        step = checkpoints.manifest(ckpt)["step"]
        again = ("run the same command again to resume from there (training.resume: auto)" if item.resume_auto
                 else f"resume it with the same command and training.resume={ckpt}")
        return [f"kept the run folder {item.folder} with its last complete checkpoint, at step {step}"
                f"{_removed(item)}", again]
    if state == "evaluate":
        again = ("run the same command again to evaluate it (training.resume: auto)" if item.resume_auto
                 else f"evaluate it with runner eval --run {item.folder}")
        return [f"kept the run folder {item.folder}: trained, its adapter saved, not yet evaluated{_removed(item)}",
                again]
    return [f"kept the {state} run folder {item.folder}{_removed(item)}"]


def _evaluation(item: runs.Left) -> list[str]:
    if item.discarded:
        return [f"removed the evaluation folder {item.folder}: no prediction written yet"]
    written = sum(_lines(p) for p in item.folder.rglob("predictions.jsonl"))
    return [f"kept the evaluation folder {item.folder} ({written} predictions written){_removed(item)}",
            "run the same command again to go on from there"]


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0
