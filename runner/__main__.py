import os
import sys

# `python -m runner` puts the working directory first on sys.path, so a stray trl.py or json.py there would be
# imported instead of the library. Search it last: installed packages win, and a user's evaluator module beside
# their recipes is still found.
if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.append(sys.path.pop(0))

from runner.cli.cli import run  # noqa: E402

raise SystemExit(run())
