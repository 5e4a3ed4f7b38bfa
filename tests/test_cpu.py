"""The CPU settings (runner.common.cpu) are set in one place: the runner sets them when it starts, wherever it is
started (glibc's MALLOC_* by executing the command again), and leaves a value someone set alone; the Makefile
and the tests rely on it instead of repeating the values."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from runner.common import cpu
from tests.conftest import ROOT

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
linux_glibc = pytest.mark.skipif(not (sys.platform.startswith("linux") and cpu._glibc()),
                                 reason="glibc's MALLOC_* and /proc/self/environ are Linux with glibc")


def test_settle_sets_only_what_is_missing_and_names_what_glibc_needs_from_the_start():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice
    assert sorted(cpu.settle(env)) == sorted(cpu.AT_EXEC)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["MALLOC_TOP_PAD_"] == str(256 * 2**20) and int(env["OMP_NUM_THREADS"]) >= 1
    assert cpu.settle(env) == []  # a second start finds everything in place: no loop


def _without_cpu_settings() -> dict:
    return {k: v for k, v in os.environ.items() if k not in cpu.environment()} | {"PYTHONPATH": str(ROOT)}


@linux_glibc
def test_the_command_runs_with_glibcs_settings_from_its_start(tmp_path):
    """`runner` started without them (outside make) executes itself again with them in its environment, so glibc
    reads them when the process starts (/proc/self/environ is the environment a process started with); the user's
    own value is kept."""
    log = tmp_path / "starts.txt"
    # Each Python start, before the runner runs, notes the environment the process started with.
    (tmp_path / "sitecustomize.py").write_text(
        "import pathlib\n"
        "start = dict(x.split(b'=', 1) for x in pathlib.Path('/proc/self/environ').read_bytes().split(b'\\0') if b'=' in x)\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(' '.join(f'{k}={start.get(k.encode(), b\"-\").decode()}' for k in "
        "('MALLOC_TOP_PAD_', 'MALLOC_TRIM_THRESHOLD_', 'OMP_WAIT_POLICY')) + '\\n')\n")
    env = _without_cpu_settings() | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "MALLOC_TRIM_THRESHOLD_": "12345"}
    done = subprocess.run([sys.executable, "-m", "runner", "validate", str(TINY)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok: "), done.stderr
    assert log.read_text().splitlines() == [
        "MALLOC_TOP_PAD_=- MALLOC_TRIM_THRESHOLD_=12345 OMP_WAIT_POLICY=-",  # as started
        f"MALLOC_TOP_PAD_={256 * 2**20} MALLOC_TRIM_THRESHOLD_=12345 OMP_WAIT_POLICY=PASSIVE"]  # once again, set


@linux_glibc
def test_a_command_whose_environment_has_them_starts_once(tmp_path):
    """The tests (conftest) and a user who set them: no second start."""
    code = ("import os; from runner.common import cpu; cpu.start(); "
            "print(os.getpid(), os.environ['OMP_WAIT_POLICY'], flush=True)")
    env = _without_cpu_settings() | cpu.AT_EXEC
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1:] == ["PASSIVE"] and len(done.stdout.splitlines()) == 1


def test_the_makefile_and_the_tests_repeat_none_of_the_values():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    conftest = (ROOT / "tests" / "conftest.py").read_text(encoding="utf-8")
    for key in cpu.environment():
        assert not re.search(rf"\b{key}\s*[?:]?=", makefile), key  # no value set there
    for key, value in {**cpu.AT_IMPORT, **cpu.AT_EXEC}.items():
        assert f'"{value}"' not in conftest, key
