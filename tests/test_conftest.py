"""The suite's own machinery (tests/conftest.py, docs/testing.md): twins declared with `@pytest.mark.twins` and
nothing else, the jobs run ahead and the order of the tests, and TEST_PLAIN=1 switching lanes and warm starts off.
Each check runs a tiny pytest session of its own, on probe test files, with the project's conftest as a plugin."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.conftest import ROOT, Settings, run_watched, settings

# Writes the jobs the session runs ahead and the order of its tests, once the conftest has decided both.
REPORT_PLUGIN = '''
import json, os
import pytest
from tests import conftest

@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    with open(os.environ["PROBE_REPORT"], "w") as f:
        json.dump({"ahead": session.config.stash[conftest._AHEAD],
                   "order": [item.name for item in session.items]}, f)
'''


def session(folder: Path, files: dict[str, str], *args: str, **env: str):
    """``pytest *args`` on ``files`` (name -> source) in ``folder``, the project's conftest loaded as a plugin."""
    for name, source in files.items():
        (folder / name).write_text(source)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TEST_", "PYTEST_"))}
    environ.update(PYTHONPATH=f"{ROOT}{os.pathsep}{folder}", **env)
    # Without the plugins the probes need not (hypothesis alone takes 1-2 s to import); the project's markers are
    # registered in pyproject.toml, which a session in ``folder`` does not read.
    options = ["-p", "tests.conftest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
               "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    return run_watched([sys.executable, "-m", "pytest", *options, *args], folder, environ)


def test_plain_switches_off_lanes_and_warm_starts_whatever_else_is_set():
    assert settings({}) == Settings(lanes=2, warm=True, hang_seconds=900)
    assert settings({"TEST_PLAIN": "1", "TEST_LANES": "2"}) == Settings(lanes=0, warm=False, hang_seconds=900)
    assert settings({"TEST_COLD_CLI": "1"}) == Settings(lanes=2, warm=False, hang_seconds=900)
    assert settings({"TEST_LANES": "0", "TEST_HANG_SECONDS": "5"}) == Settings(lanes=0, warm=True, hang_seconds=5)


def test_the_declared_twins_run_ahead_and_the_tests_that_need_them_run_last(tmp_path):
    module = ('import pytest\npytestmark = pytest.mark.twins("xsum_tiny")\n'
              "def test_module_twin(trained): pass\n"
              "def test_no_trained(): pass  # the module's mark counts only where a test takes `trained`\n")
    params = ("import pytest\n"
              "@pytest.mark.parametrize('task', [pytest.param(t, marks=pytest.mark.twins(t))\n"
              "                                  for t in ('agnews_tiny', 'chat_tiny')])\n"
              "def test_param_twin(task, trained): pass\n"
              "@pytest.mark.twins('chat_tiny')\n"
              "def test_own_twin(trained): pass\n"
              "def test_nothing(): pass\n")
    result = session(tmp_path, {"test_a.py": module, "test_b.py": params, "report.py": REPORT_PLUGIN},
                     "-p", "report", "--collect-only", "-q", "test_a.py", "test_b.py",
                     PROBE_REPORT=str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ahead"] == ["chat_tiny", "xsum_tiny", "agnews_tiny"]  # the longest first; none undeclared
    assert report["order"] == ["test_no_trained", "test_nothing",  # no twin: first, while the lanes train
                               "test_param_twin[chat_tiny]", "test_own_twin", "test_module_twin",
                               "test_param_twin[agnews_tiny]"]  # then in the order their twins end


def test_a_test_that_takes_trained_without_declaring_its_twin_fails_collection(tmp_path):
    probe = ("import pytest\n"
             "def test_undeclared(trained): pass\n"
             "@pytest.mark.twins('xsum')\n"
             "def test_misspelled(trained): pass\n")
    result = session(tmp_path, {"test_probe.py": probe}, "--collect-only", "-q")
    assert result.returncode == 4  # pytest's usage error: nothing ran
    assert "test_probe.py::test_undeclared: takes `trained` but declares no twin (add @pytest.mark.twins(" \
           in result.stderr
    assert "test_probe.py::test_misspelled: @pytest.mark.twins names xsum, not a tiny twin (one of xsum_tiny, " \
           in result.stderr


def test_a_twin_the_test_did_not_declare_is_refused_before_it_trains(tmp_path):
    probe = ("import pytest\n"
             "@pytest.mark.twins('agnews_tiny')\n"
             "def test_asks_for_another(trained): trained('xsum_tiny')\n")
    result = session(tmp_path, {"test_probe.py": probe}, "-q", f"--basetemp={tmp_path / 'temp'}", TEST_PLAIN="1")
    assert result.returncode == 1
    assert ("test_probe.py::test_asks_for_another asks for the twin 'xsum_tiny' but declares only agnews_tiny: "
            "add 'xsum_tiny' to its @pytest.mark.twins") in result.stdout
    assert not list((tmp_path / "temp").glob("xsum_tiny*"))  # the twin's output folder was never made


def test_a_plain_session_runs_nothing_ahead_and_starts_every_command_fresh(tmp_path):
    """Under TEST_PLAIN=1, a slow test that declares a twin finds no lane at work, and a command it runs through
    run_python is a fresh interpreter (a warm fork would have imported torch already)."""
    probe = ("import threading\n"
             "import pytest\n"
             "from tests import conftest\n"
             "@pytest.mark.twins('xsum_tiny')\n"
             "def test_probe(trained, request, tmp_path):\n"
             "    assert request.node.get_closest_marker('slow')  # a session that would want warm starts\n"
             "    assert not [t.name for t in threading.enumerate() if t.name.startswith('ahead')]\n"
             "    result = conftest.run_python(['-c', 'import sys; print(\"torch\" in sys.modules)'], tmp_path,\n"
             "                                 conftest.cli_env())\n"
             "    assert result.stdout == 'False\\n', result.stdout + result.stderr\n")
    result = session(tmp_path, {"test_probe.py": probe}, "-q", TEST_PLAIN="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
