"""Warm starts for the suite's runner commands: one process imports torch, transformers, trl, peft, bitsandbytes,
datasets and matplotlib once, then forks a child for each `runner ...` command a test runs.

Why: a fresh `python -m runner train ...` spends 5-6 s of CPU importing those libraries before it does anything
(measured on a 2-vCPU AMD EPYC; machines: docs/timings.md), and the suite runs dozens of such commands; most of them
train a few steps or fail on purpose, so the imports were about half of the suite's CPU time.

What a child is: a process of its own, forked from the preloaded one, with the test's working directory,
environment, stdin, stdout and stderr, running ``runner/__main__.py`` as ``python -m runner`` would (or a script, as
``python script.py`` would); its exit status, its output and a kill -9 are those of a fresh process. What differs:
the libraries are already imported. Whatever importing them printed (warnings, notices) is put at the start of each
child's stderr, where a fresh process would have printed it; the preload runs the CLI's own start (its warning
filters, runner.common.cpu's settings) before importing, as a command does. The child gets the test's environment, but the
imports saw the preload's: a command whose environment differs in a variable the imports read (recorded while
they run) or a native library reads when it loads (NATIVE_ENV) starts fresh, with a warning. TEST_COLD_CLI=1
(or TEST_PLAIN=1) starts every command fresh, to check that warm starts hide nothing: conftest then never calls
`run` (docs/testing.md).

Several commands can run at once (the session trains the tiny twins in the background while other tests run):
each is a child of its own. One run in a background lane (conftest) is pinned to the lane's cores (a runner
command then uses that many torch threads) and runs at a lower priority (nice), so the tests in the foreground
keep the CPU they need and the lane takes what they leave.

Run as ``python -m tests.warm FD``: FD is a socket on which requests arrive, one JSON line each:
``{"argv": [...], "cwd": ..., "env": {...}, "stdin": path, "stdout": path, "stderr": path, "status": path,
"cpus": [...] or null, "nice": n}``; the answer goes to the status file: the child's pid, then, when it has ended, its exit
code (negative: the signal that ended it), a line each. When the socket closes, children still running are killed.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Variables native libraries read when they load (libgomp, OpenBLAS, MKL, the loader, the interpreter), where the
# preload cannot see the reads; the preload records the ones Python code reads.
NATIVE_ENV = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "ONEDNN_", "DNNL_", "LD_", "MALLOC_", "PYTHON", "TORCH",
              "PYTORCH_", "CUDA", "NCCL_")


class _Reads:
    """Records the environment variables Python code reads (os.environ[k], .get, in, os.getenv) while active."""

    def __init__(self):
        self.keys: set[str] = set()
        self._cls = type(os.environ)
        self._getitem = self._cls.__getitem__

    def __enter__(self):
        keys, getitem = self.keys, self._getitem

        def recording(environ, key):
            keys.add(key)
            return getitem(environ, key)

        self._cls.__getitem__ = recording
        return self

    def __exit__(self, *exc):
        self._cls.__getitem__ = self._getitem


def _preload() -> tuple[str, set[str]]:
    """Import what runner commands import, the way a command does; return what that printed and the environment
    variables the imports read."""
    from runner.cli import cli
    from runner.common import cpu

    cpu.settle()  # what cpu.start does in a command, less executing again (conftest put glibc's in the environment)
    cli._quiet_libraries()
    # Capture at the file descriptors, not by swapping sys.stderr: loggers made while importing keep the real
    # sys.stderr, which in a child writes to the child's stderr.
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as captured, _Reads() as reads:
        os.dup2(captured.fileno(), 1)
        os.dup2(captured.fileno(), 2)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import accelerate  # noqa: F401
            import bitsandbytes  # noqa: F401
            import datasets  # noqa: F401
            import matplotlib.pyplot  # noqa: F401
            import peft  # noqa: F401
            import rouge_score.rouge_scorer  # noqa: F401
            import scipy.stats  # noqa: F401
            import torch  # noqa: F401
            import transformers
            from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            from transformers.integrations import TensorBoardCallback  # noqa: F401
            from trl import SFTConfig, SFTTrainer  # noqa: F401

            for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "BitsAndBytesConfig",
                         "PhiForCausalLM", "Trainer", "TrainerCallback", "GenerationConfig", "PreTrainedTokenizerFast"):
                getattr(transformers, name)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        captured.seek(0)
        return captured.read().decode("utf-8", errors="replace"), reads.keys


def _child(request: dict, preamble: str, control: socket.socket) -> None:
    """In the forked child: become the command and exit as it would."""
    code = 1
    try:
        control.close()
        for fd, path, flags in ((0, request["stdin"], os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                                (2, request["stderr"], os.O_WRONLY)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        os.chdir(request["cwd"])
        if request.get("cpus"):
            os.sched_setaffinity(0, request["cpus"])
        if request.get("nice"):
            os.nice(request["nice"])
        os.environ.clear()
        os.environ.update(request["env"])
        if preamble:
            sys.stderr.write(preamble)
            sys.stderr.flush()
        argv = request["argv"]
        try:
            if argv[0] == "-m":  # python -m module args: the working directory first on sys.path
                sys.path[0] = os.getcwd()
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:  # python script args: the script's folder first on sys.path
                sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
                sys.argv = list(argv)
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        # What the interpreter does at exit: wait for non-daemon threads, run the atexit functions.
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _answer(path: str, line: str) -> None:
    # One write of one whole line: the test side reads the file while it grows.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def serve(fd: int) -> None:
    control = socket.socket(fileno=fd)
    before = dict(os.environ)
    preamble, read = _preload()
    sys.stdout.flush()
    sys.stderr.flush()
    # Forking copies only this thread. The libraries' native threads (OpenBLAS's pool, jemalloc's background
    # thread) hold no lock across fork (their atfork handlers see to it); a Python thread could, so none may run.
    control.sendall((json.dumps({"ready": threading.active_count() == 1, "preamble": preamble, "read": sorted(read),
                                 "before": before, "after": dict(os.environ)}) + "\n").encode())
    running: dict[int, str] = {}  # pid -> its status file
    pending, closed = b"", False
    while not closed:
        if select.select([control], [], [], 0.05)[0]:
            data = control.recv(65536)
            closed = not data
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request, preamble, control)
                running[pid] = request["status"]
                _answer(request["status"], str(pid))
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            _answer(running.pop(pid), str(os.waitstatus_to_exitcode(status)))
    for pid, path in running.items():  # the session ended (or was interrupted) while these ran
        os.kill(pid, signal.SIGKILL)
        _answer(path, str(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])))


if __name__ == "__main__":
    serve(int(sys.argv[1]))


# ---------------------------------------------------------------- the test side


@dataclass(frozen=True)
class Lane:
    """Where a background command runs: pinned to ``cpus`` (None: anywhere), at priority ``nice``."""

    cpus: tuple[int, ...] | None
    nice: int = 10


class Server:
    """The preloaded process, started on the first warm command of a session. Threads may run commands at once."""

    def __init__(self, env: dict, cwd: Path, hang_seconds: float):
        ours, theirs = socket.socketpair()
        self.log = tempfile.NamedTemporaryFile(prefix="warm-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.warm", str(theirs.fileno())], cwd=cwd, env=env,
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log)
        theirs.close()
        self.control = ours
        self.lock = threading.Lock()
        ready = self._ready_line(hang_seconds)
        state = json.loads(ready) if ready else {"ready": False}
        self.ready = state["ready"]
        if self.ready:
            self.read, self.before, self.after = set(state["read"]), state["before"], state["after"]

    def differs(self, env: dict) -> list[str]:
        """The variables in ``env`` that would have made a fresh process's imports differ from the preload's: those
        the imports read, and the native libraries' (NATIVE_ENV). A value the imports set themselves (a default,
        e.g. TORCHINDUCTOR_CACHE_DIR) counts as the same as its absence."""
        keys = self.read | {k for k in (*env, *self.before) if k.startswith(NATIVE_ENV)}
        # pytest names the current test there; libraries read it only to learn that they run under pytest
        keys.discard("PYTEST_CURRENT_TEST")
        return sorted(k for k in keys if env.get(k) != self.before.get(k)
                      and not (env.get(k) == self.after.get(k) != self.before.get(k)))

    def _ready_line(self, timeout: float) -> str | None:
        data, deadline = b"", time.monotonic() + timeout
        while not data.endswith(b"\n"):
            if not select.select([self.control], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = self.control.recv(1 << 20)
            if not chunk:
                return None
            data += chunk
        return data.decode()

    def why_not(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.control.fileno() == -1:
            return
        self.control.close()  # the server kills the commands still running, then exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)

    def run(self, argv: list[str], cwd: Path, env: dict, input: str | None, hang_seconds: float,
            lane: Lane | None = None) -> subprocess.CompletedProcess:
        """``subprocess.run([python, *argv], ...)``, forked from the preloaded process, with the same hang guard
        as conftest.run_watched: stopped only when it writes nothing on stdout or stderr for ``hang_seconds``;
        ``lane``: run in that background lane."""
        with tempfile.TemporaryDirectory(prefix="warm-") as folder:
            paths = {name: Path(folder) / name for name in ("stdin", "stdout", "stderr", "status")}
            paths["stdin"].write_bytes((input or "").encode())
            for name in ("stdout", "stderr", "status"):
                paths[name].touch()
            request = {"argv": argv, "cwd": str(cwd), "env": env, "cpus": lane and lane.cpus, "nice": lane and lane.nice,
                       **{k: str(v) for k, v in paths.items()}}
            with self.lock:
                self.control.sendall((json.dumps(request) + "\n").encode())
            answers = lambda: [int(x) for x in paths["status"].read_text().split("\n")[:-1]]  # noqa: E731
            sizes, last = (0, 0), time.monotonic()
            while len(status := answers()) < 2:
                time.sleep(0.05 if status else 0.01)
                now = (paths["stdout"].stat().st_size, paths["stderr"].stat().st_size)
                if now != sizes:
                    sizes, last = now, time.monotonic()
                elif time.monotonic() - last > hang_seconds and status:
                    import pytest

                    os.kill(status[0], signal.SIGKILL)
                    while len(answers()) < 2:
                        time.sleep(0.05)
                    err = paths["stderr"].read_bytes()[-2000:].decode(errors="replace")
                    pytest.fail(f"`{' '.join(map(str, argv))}` printed nothing for {hang_seconds:g} s and was "
                                f"stopped as hung; its last output:\n{err}")
            read = lambda name: paths[name].read_bytes().decode("utf-8", errors="replace")  # noqa: E731
            return subprocess.CompletedProcess([sys.executable, *argv], status[1], read("stdout"), read("stderr"))


_server: Server | None = None
_starting = threading.Lock()
_warned: set[tuple] = set()
wanted = True  # conftest turns it off for sessions without slow tests: there a preload costs more than it saves


def run(argv: list[str], cwd: Path, env: dict, input: str | None, hang_seconds: float,
        lane: Lane | None = None) -> subprocess.CompletedProcess | None:
    """The command's result from a warm start, or None where it must start fresh (then the caller does)."""
    global _server, wanted
    with _starting:
        if not wanted:
            return None
        if _server is None:
            _server = Server(env, ROOT, hang_seconds)
            if not _server.ready:
                warnings.warn(f"warm starts unavailable, every command starts fresh: {_server.why_not()}",
                              stacklevel=2)
                _server.stop()
                _server, wanted = None, False
                return None
        server = _server
    differs = server.differs(env)
    if differs:
        if tuple(differs) not in _warned:
            _warned.add(tuple(differs))
            warnings.warn(f"a command starts fresh: its {', '.join(differs)} differ from the warm process's",
                          stacklevel=2)
        return None
    return server.run(argv, cwd, env, input, hang_seconds, lane)


def stop() -> None:
    global _server
    with _starting:
        if _server is not None:
            _server.stop()
            _server = None
