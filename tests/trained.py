"""A tiny XSum run trained once per test session through `runner train`, shared by the modules that need a
finished run folder (compare, generate). Not a test module: imported by them."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from tests.conftest import ROOT, run_cli

TINY_XSUM = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
STEPS = 150  # ROUGE-L ~50 on the tiny test split: plainly better than the untrained base, in half the default time


@functools.cache
def xsum_run() -> tuple[Path, Path]:
    """(run folder, output_dir) of a finished run; call after the `tiny` fixture has built .cache/tiny."""
    out = Path(tempfile.mkdtemp(prefix="trained-xsum-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    result = run_cli("train", TINY_XSUM, f"output_dir={out}", f"training.max_steps={STEPS}", "--no-eval")
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = [p for p in (out / "xsum_tiny").iterdir() if (p / "adapter").is_dir()]
    return run_dir, out
