"""Shared fixtures: the tiny offline model and data, the tiny twins trained once per session, the real rows in
../shared/data, and a CLI runner. How the suite runs, and why it is built this way: docs/testing.md.

In short: `make test` runs everything, `make test-fast` leaves out the tests marked `slow` (how long each takes:
docs/timings.md; they train a model or start a runner process that loads torch; a test that takes `trained` or
`background` is marked slow automatically). A test that needs a trained tiny twin takes it from `trained(name)` and
declares it with `@pytest.mark.twins(name)` (on the test, its parameter, or the module's `pytestmark`); the twins
declared by the session's tests train once, ahead, in background lanes while the other tests run, and runner
commands that load torch are forked from one warm process (tests/warm.py). `TEST_PLAIN=1` switches that machinery
off: every command starts fresh and each twin or job runs when a test first needs it.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner.common import cpu
from tests import warm
from tests.warm import Lane

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
THREADS = str(min(2, len(os.sched_getaffinity(0))))
TWINS = ("xsum_tiny", "agnews_tiny", "goemotions_tiny", "mnli_tiny", "chat_tiny")
# The order the twins train in ahead of the tests (then the modules' jobs): the longest first, so that the two
# lanes end about together.
TWINS_AHEAD = ("chat_tiny", "xsum_tiny", "goemotions_tiny", "mnli_tiny", "agnews_tiny")
_AHEAD = pytest.StashKey[list]()  # the jobs this session runs ahead, in order
_RUNNING = pytest.StashKey[pytest.Item]()  # the test being set up or run (whose twins `trained` may hand out)
_TIMES = pytest.StashKey[dict]()  # job -> seconds it ran in its lane (the session's summary lists them)


@dataclass(frozen=True)
class Settings:
    """How the session runs its long commands, from the environment (docs/testing.md: Switches)."""

    lanes: int             # background lanes for the twins and jobs run ahead; 0: each runs when first needed
    warm: bool             # runner commands that load torch are forked from the warm process (tests/warm.py)
    hang_seconds: float    # a command that prints nothing for this long is stopped as hung


def settings(environ) -> Settings:
    """TEST_PLAIN=1: no lanes and no warm starts, whatever TEST_LANES and TEST_COLD_CLI say."""
    plain = environ.get("TEST_PLAIN") == "1"
    return Settings(lanes=0 if plain else int(environ.get("TEST_LANES", 2)),
                    warm=not plain and environ.get("TEST_COLD_CLI") != "1",
                    hang_seconds=float(environ.get("TEST_HANG_SECONDS", 900)))


SETTINGS = settings(os.environ)  # read once: the session's commands all run the same way
HANG_SECONDS = SETTINGS.hang_seconds

# The runner's CPU settings (runner.common.cpu), here before any test imports torch: the tests that run models in
# this process get what a command gets, and the commands the tests start inherit them. glibc's MALLOC_* reach only
# those commands (read when a process starts); with them in place, a command forked from the preloaded process
# (tests/warm.py) needs no second start to get them.
cpu.settle()


# A job run ahead: (its own empty output folder, the lane it runs in or None) -> what the test takes.
Job = Callable[[Path, "Lane | None"], Any]
_JOBS: dict[str, tuple[Job, str]] = {}  # name -> (the job, the file of the test module that declared it)


def ahead(name: str):
    """Declares a test module's long job ``name``, run in the background from the session's start; the module's
    tests that use the `background` fixture take its result from ``background(name)``. The job runs its commands
    in the lane it is given (``lane=`` of run_cli, run_python)."""

    def declare(job: Job) -> Job:
        _JOBS[name] = (job, sys.modules[job.__module__].__file__)
        return job

    return declare


def twins_declared(item) -> frozenset[str]:
    """The twins a test declares with `@pytest.mark.twins(...)`: on itself, its parameter set, its class or its
    module (`pytestmark`), all together."""
    return frozenset(name for mark in item.iter_markers("twins") for name in mark.args)


def jobs_needed(item) -> frozenset[str]:
    """The twins a test declares, if it takes `trained`, and the jobs its module declared with `@ahead`, if it
    takes results from `background`."""
    names = getattr(item, "fixturenames", ())
    needed = set(twins_declared(item)) if "trained" in names else set()
    if "background" in names:
        needed |= {name for name, (_, file) in _JOBS.items() if Path(file) == Path(str(item.fspath))}
    return frozenset(needed)


def _undeclared(items) -> list[str]:
    """What is wrong with the session's twin declarations, a line per test."""
    problems = []
    for item in items:
        declared = twins_declared(item)
        if unknown := sorted(declared - set(TWINS)):
            problems.append(f"{item.nodeid}: @pytest.mark.twins names {', '.join(unknown)}, not a tiny twin "
                            f"(one of {', '.join(TWINS)})")
        elif "trained" in getattr(item, "fixturenames", ()) and not declared:
            problems.append(f"{item.nodeid}: takes `trained` but declares no twin (add @pytest.mark.twins(\"<twin>\")"
                            " to the test, or pytestmark = pytest.mark.twins(...) to its module; docs/testing.md)")
    return problems


def _job_order() -> list[str]:
    return [*TWINS_AHEAD, *_JOBS]


def pytest_collection_modifyitems(config, items):
    if problems := _undeclared(items):
        raise pytest.UsageError("\n".join(problems))
    for item in items:
        if {"trained", "background"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # The tests that need no job first (the jobs run meanwhile), then the others in the order their jobs end; the
    # sort is stable, so tests keep their order otherwise. (A module whose tests are split between the two makes a
    # module fixture again only if both kinds use it; none that is slow to make is.)
    order = _job_order()
    items.sort(key=lambda item: max((1 + order.index(j) for j in jobs_needed(item)), default=0))


def pytest_collection_finish(session):
    # Warm starts pay off only where slow tests run many commands that load torch; a fast session runs none.
    warm.wanted = any(item.get_closest_marker("slow") for item in session.items)
    needed = set().union(*(jobs_needed(item) for item in session.items))
    session.config.stash[_AHEAD] = [j for j in _job_order() if j in needed] if SETTINGS.lanes > 0 else []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.config.stash[_RUNNING] = item


def pytest_terminal_summary(terminalreporter, config):
    """How long each job ran in its lane: where the suite's background time goes (docs/testing.md)."""
    if times := config.stash.get(_TIMES, {}):
        terminalreporter.write_line("background jobs (wall seconds in their lane): " + ", ".join(
            f"{name} {seconds:.0f}" for name, seconds in sorted(times.items(), key=lambda kv: -kv[1])))


def pytest_sessionfinish(session):
    warm.stop()
    for proc in list(_live):  # commands still running when the session ended early (interrupted, -x)
        proc.kill()


@pytest.fixture(scope="session")
def tiny() -> Path:
    """.cache/tiny: data/<task>/{train,validation,test}.jsonl and phi/ (built once, reused)."""
    from runner.model import tiny as tiny_mod

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


def overridden(base: list[str], *extra: str) -> list[str]:
    """``base`` overrides with ``extra``'s on top: a key ``extra`` sets is left out of ``base`` (the command line
    refuses a key given twice)."""
    keys = {e.split("=", 1)[0] for e in extra if "=" in e}
    return [b for b in base if b.split("=", 1)[0] not in keys] + list(extra)


def cli_env() -> dict:
    # The CPU settings come from this process's environment (cpu.settle above); OMP_NUM_THREADS is the tests' own
    # cap (two lanes of commands share the cores).
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def _drain(stream, chunks: list[bytes], last: list[float]) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        chunks.append(chunk)
        last[0] = time.monotonic()


_live: set[subprocess.Popen] = set()


def run_watched(command: list[str], cwd: Path, env: dict, input: str | None = None,
                hang_seconds: float = HANG_SECONDS, lane: Lane | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` with a hang guard instead of a time limit: the
    process is stopped (and the test fails) only when it prints nothing on stdout or stderr for ``hang_seconds``.
    ``lane``: run in that background lane (set as it starts, long before a runner command counts its cores)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if lane is not None:
        if lane.cpus:
            os.sched_setaffinity(proc.pid, lane.cpus)
        os.setpriority(os.PRIO_PROCESS, proc.pid, lane.nice)
    _live.add(proc)
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
    _live.discard(proc)
    for reader in readers:
        reader.join()
    decode = lambda chunks: b"".join(chunks).decode("utf-8", errors="replace")  # noqa: E731
    return subprocess.CompletedProcess(command, proc.returncode, decode(out), decode(err))


# The commands that load torch: these start warm (tests/warm.py); `validate` and the rest start fresh.
WARM_COMMANDS = {"train", "eval", "compare", "generate", "inspect", "sweep", "plan", "export"}


def run_python(argv: list[str], cwd: Path, env: dict, input: str | None = None,
               lane: Lane | None = None) -> subprocess.CompletedProcess:
    """``python *argv`` in a process of its own, under the hang guard, forked from a process that imported torch
    and the other libraries already (tests/warm.py says what that changes and what not; TEST_COLD_CLI=1 or
    TEST_PLAIN=1 starts every command fresh); ``lane``: run in that background lane."""
    result = warm.run(argv, cwd, env, input, HANG_SECONDS, lane) if SETTINGS.warm else None
    return result if result is not None else run_watched([sys.executable, *argv], cwd, env, input, lane=lane)


def run_cli(*args, cwd: Path | None = None, input: str | None = None,
            lane: Lane | None = None) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it, in a process of its own. A command that loads torch starts warm
    (run_python); the others start fresh. ``lane``: run in that background lane."""
    argv = ["-m", "runner", *map(str, args)]
    if args and str(args[0]) in WARM_COMMANDS:
        return run_python(argv, cwd or ROOT, cli_env(), input, lane)
    return run_watched([sys.executable, *argv], cwd or ROOT, cli_env(), input, lane=lane)


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


def _lanes(n: int) -> list[Lane]:
    """``n`` background lanes, the machine's cores split between them (none pinned on one core)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return [Lane(None)] * n
    n = min(n, len(cores))
    return [Lane(tuple(cores[i * len(cores) // n:(i + 1) * len(cores) // n])) for i in range(n)]


def _twin_job(task: str) -> Job:
    recipe = ROOT / "recipes" / "tiny" / f"{task}.yaml"
    return lambda out, lane: run_cli("train", recipe, f"output_dir={out}", lane=lane)


@pytest.fixture(scope="session")
def background(tiny, tmp_path_factory, request):
    """``background(name)``: (the output folder, the result) of the tiny twin or declared job ``name``, run once
    per session; those the session's tests need start in the background lanes when it starts, the others run when
    first asked for (docs/testing.md). A job that failed fails every test that asks for it, without running again."""
    jobs: dict[str, Future] = {}

    def folder(name: str) -> Path:  # made in this thread: pytest's temporary folders are not thread-safe
        return tmp_path_factory.mktemp(name.replace(" ", "-"))

    def run(name: str, out: Path, lane: Lane | None = None):
        job = _twin_job(name) if name in TWINS else _JOBS[name][0]
        return out, job(out, lane)

    pool = None
    ahead_ = request.config.stash.get(_AHEAD, [])
    if ahead_:
        lanes: queue.Queue = queue.Queue()
        for lane in _lanes(SETTINGS.lanes):
            lanes.put(lane)

        times = request.config.stash.setdefault(_TIMES, {})

        def in_a_lane(name: str, out: Path):
            lane = lanes.get()
            start = time.monotonic()
            try:
                return run(name, out, lane)
            finally:
                times[name] = time.monotonic() - start
                lanes.put(lane)

        pool = ThreadPoolExecutor(lanes.qsize(), thread_name_prefix="ahead")
        jobs.update((name, pool.submit(in_a_lane, name, folder(name))) for name in ahead_)

    def get(name: str):
        if name not in jobs:
            jobs[name] = Future()
            try:
                jobs[name].set_result(run(name, folder(name)))
            except BaseException as exc:
                jobs[name].set_exception(exc)
        return jobs[name].result()

    yield get
    if pool is not None:  # the session ended before some jobs were needed (-x, interrupted): start no more
        pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(scope="session", autouse=True)
def _ahead(request):
    """Starts the session's jobs in the background before its first test (see `background`)."""
    if request.config.stash.get(_AHEAD, []):
        request.getfixturevalue("background")


@pytest.fixture(scope="session")
def trained(background, request):
    """``trained(task)``: the tiny twin ``task`` (one of TWINS) trained and evaluated through `runner train` with
    its recipe exactly as written, once per test session; every test that needs a trained twin shares the run.
    A test gets only the twins it declares (`@pytest.mark.twins`): those are the ones trained ahead for it."""

    def get(task: str) -> Trained:
        test = request.config.stash[_RUNNING]
        if task not in twins_declared(test):
            pytest.fail(f"{test.nodeid} asks for the twin {task!r} but declares only "
                        f"{', '.join(sorted(twins_declared(test)))}: add {task!r} to its @pytest.mark.twins "
                        f"(docs/testing.md)", pytrace=False)
        out, result = background(task)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return Trained(ROOT / "recipes" / "tiny" / f"{task}.yaml", run_folder(result.stdout), out, result.stdout)

    return get
