"""The suite's time limit catches hangs, not slowness: a command is stopped only after printing nothing for a while."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import ROOT, run_watched

SILENT = "import time; time.sleep(30)"
SLOW_BUT_TALKING = "import sys, time\nfor i in range(8):\n    print(i, file=sys.stderr, flush=True); time.sleep(0.25)\nprint('done')"


def test_a_silent_process_is_stopped_as_hung():
    with pytest.raises(pytest.fail.Exception, match="printed nothing for 1 s"):
        run_watched([sys.executable, "-c", SILENT], ROOT, dict(os.environ), hang_seconds=1)


def test_a_process_that_keeps_printing_runs_past_the_limit():
    result = run_watched([sys.executable, "-c", SLOW_BUT_TALKING], ROOT, dict(os.environ), hang_seconds=1)
    assert result.returncode == 0 and result.stdout == "done\n"  # 2 s in all, never 1 s without output
    assert result.stderr.split() == [str(i) for i in range(8)]


def test_input_reaches_the_process():
    result = run_watched([sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"], ROOT,
                         dict(os.environ), input="snow closes schools")
    assert result.stdout == "SNOW CLOSES SCHOOLS\n"
