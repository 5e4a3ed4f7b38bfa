"""Shared fixtures: the tiny offline model and data, the real rows in ../shared/data, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
THREADS = str(min(2, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def tiny() -> Path:
    """.cache/tiny: data/<task>/{train,validation,test}.jsonl and phi/ (built once, reused)."""
    from runner import tiny as tiny_mod

    return tiny_mod.build()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def run_cli(*args, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it (one torch process at a time: tests run serially)."""
    return subprocess.run([sys.executable, "-m", "runner", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=cli_env(), timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
