"""Shared fixtures: the tiny offline model and data, the tiny twins trained once per session, the real rows in
../shared/data, and a CLI runner.

Tiers: `make test` runs everything (what CI runs); `make test-fast` runs `pytest -m "not slow"`, under a minute.
Mark a test `@pytest.mark.slow` when it trains a model or starts a runner process that loads torch (a few seconds
of imports each). Tests that use the `trained` fixture, directly or through another fixture, are marked `slow`
automatically; a test that needs a trained tiny twin should take it from there rather than train its own.

Runner commands run as processes of their own (`run_cli`, `run_python`). In a session with slow tests, those that
load torch are forked from one process that imported torch and the other libraries once (tests/warm.py), which
halves the suite's CPU time; `TEST_COLD_CLI=1` starts every command fresh instead.

Time limits only catch hangs: a command is stopped when it has printed nothing for HANG_SECONDS (training prints
a progress bar every step), never because the machine is slow or busy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import warm

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
THREADS = str(min(2, len(os.sched_getaffinity(0))))
HANG_SECONDS = float(os.environ.get("TEST_HANG_SECONDS", 900))
TWINS = ("xsum_tiny", "agnews_tiny", "goemotions_tiny", "mnli_tiny", "chat_tiny")

# Waiting OpenMP threads sleep instead of spinning: on a shared or busy CPU, spinning threads steal the cores the
# working ones need (measured on 2 busy cores: ~10x slower training steps). Read when torch loads, so set it here,
# before any test imports torch; the runner's CLI sets the same default for its own processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    # Warm starts pay off only where slow tests run many commands that load torch; a fast session runs none.
    warm.wanted = any(item.get_closest_marker("slow") for item in session.items)


def pytest_sessionfinish(session):
    warm.stop()


@pytest.fixture(scope="session")
def tiny() -> Path:
    """.cache/tiny: data/<task>/{train,validation,test}.jsonl and phi/ (built once, reused)."""
    from runner import tiny as tiny_mod

    return tiny_mod.build()


@pytest.fixture(scope="module")
def tokenizer(tiny):
    """The tiny twins' tokenizer as stored (padding with EOS), without a recipe's settings; one per test module,
    which may change it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "phi")
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def _drain(stream, chunks: list[bytes], last: list[float]) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        chunks.append(chunk)
        last[0] = time.monotonic()


def run_watched(command: list[str], cwd: Path, env: dict, input: str | None = None,
                hang_seconds: float = HANG_SECONDS) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` with a hang guard instead of a time limit: the
    process is stopped (and the test fails) only when it prints nothing on stdout or stderr for ``hang_seconds``."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err, last = [], [], [time.monotonic()]
    readers = [threading.Thread(target=_drain, args=(s, c, last), daemon=True)
               for s, c in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    if input is not None:
        proc.stdin.write(input.encode())
    proc.stdin.close()
    while proc.poll() is None:
        if time.monotonic() - last[0] > hang_seconds:
            proc.kill()
            proc.wait()
            pytest.fail(f"`{' '.join(map(str, command[1:]))}` printed nothing for {hang_seconds:g} s and was stopped "
                        f"as hung; its last output:\n{b''.join(err)[-2000:].decode(errors='replace')}")
        time.sleep(min(0.2, hang_seconds / 4))
    for reader in readers:
        reader.join()
    decode = lambda chunks: b"".join(chunks).decode("utf-8", errors="replace")  # noqa: E731
    return subprocess.CompletedProcess(command, proc.returncode, decode(out), decode(err))


# The commands that load torch: these start warm (tests/warm.py); `validate` and the rest start fresh.
WARM_COMMANDS = {"train", "eval", "compare", "generate", "inspect", "sweep", "plan", "export"}


def run_python(argv: list[str], cwd: Path, env: dict, input: str | None = None) -> subprocess.CompletedProcess:
    """``python *argv`` in a process of its own, under the hang guard, forked from a process that imported torch
    and the other libraries already (tests/warm.py says what that changes and what not; TEST_COLD_CLI=1 starts
    every command fresh)."""
    result = warm.run(argv, cwd, env, input, HANG_SECONDS)
    return result if result is not None else run_watched([sys.executable, *argv], cwd, env, input)


def run_cli(*args, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it, in a process of its own (one torch process at a time: tests run
    serially). A command that loads torch starts warm (run_python); the others start fresh."""
    argv = ["-m", "runner", *map(str, args)]
    if args and str(args[0]) in WARM_COMMANDS:
        return run_python(argv, cwd or ROOT, cli_env(), input)
    return run_watched([sys.executable, *argv], cwd or ROOT, cli_env(), input)


@pytest.fixture
def cli():
    return run_cli


def run_folder(stdout: str) -> Path:
    """The run folder a command reports on its last line, `done: <folder>`."""
    return Path(next(line for line in stdout.splitlines() if line.startswith("done: "))[6:])


@dataclass(frozen=True)
class Trained:
    recipe: Path      # the twin's recipe file, trained as written (no overrides)
    run_dir: Path     # the finished run: adapter/, metrics.json, predictions.jsonl, env.json, report.md, ...
    output_dir: Path  # its output_dir (other commands of the same recipe can write there too)
    stdout: str       # what `runner train` printed


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory):
    """``trained(task)``: the tiny twin ``task`` (one of TWINS) trained and evaluated through `runner train` with
    its recipe exactly as written, once per test session; every test that needs a trained twin shares the run."""
    runs: dict[str, Trained] = {}

    def get(task: str) -> Trained:
        if task not in runs:
            recipe = ROOT / "recipes" / "tiny" / f"{task}.yaml"
            out = tmp_path_factory.mktemp(f"trained-{task}")
            result = run_cli("train", recipe, f"output_dir={out}")
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
            runs[task] = Trained(recipe, run_folder(result.stdout), out, result.stdout)
        return runs[task]

    return get
