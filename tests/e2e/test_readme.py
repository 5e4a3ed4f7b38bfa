"""Issue 24's acceptance test: a newcomer copies the README's "Quick start" and "Your own task" commands into a
fresh shell, one after the other, and sees what the README says they will see.

Each section's first ```bash block runs as written, with `bash -e`, in a copy of the repository (its tracked and
untracked files, none that git ignores: no .git, .venv, .cache, runs), in an environment like a fresh shell's:
PATH without any virtualenv's bin (the README activates the venv itself where it needs to), no VIRTUAL_ENV, and
the offline variables of conftest's cli_env (no hub here). What is set up, and why:

- `.venv` is a link to the virtualenv this session runs in. Where that venv's install of the runner matches the
  copy's pyproject.toml (the same console scripts and requirements), the copy's pyproject.toml gets the venv's
  install time, so make's install rule (`.venv/bin/runner: pyproject.toml`) is up to date and `make train` and
  `make tiny` install nothing, as on a machine where `make install` has run. Where it does not match (a venv
  installed from an older checkout), the walks are skipped with the reason: make would reinstall the shared venv,
  which a test must never do. The test checks with `make -q` that make has nothing to install before anything
  runs, and afterwards that the venv's `runner` script was not rewritten.
- PYTHONPATH is the copy: the venv's editable install may point at another checkout, and the copy's code is the
  one under test.
- `.cache/tiny` is a link to the session's tiny model and data: built by the same runner.model.tiny (its BUILT
  stamp names that source's hash), so the README's `make tiny` finds it built, as after the quick start.
- The quick start's `make test` and `make test-fast` lines are skipped: they run this suite, which would run itself.
  So would be a line that installs packages (pip install, python -m venv), should a section gain one: the shared
  venv must not change. `make install` runs: it installs nothing where the venv is up to date (checked).

The result check: the section states the score the user will see (the quick start ROUGE-L, the own task accuracy);
the test reads that number from the README and compares it with the one the commands printed.

Both walks run in the background lanes from the session's start (`@ahead`): each trains a tiny model once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import HANG_SECONDS, ROOT, ahead, cli_env, run_watched

QUICK_START = "Quick start"
OWN_TASK = "Your own task"
# Lines of the README's blocks the test does not run, and why.
SKIPPED = {r"make\s+test(-fast)?(\s|$)": "it runs this test suite, which would run itself",
           # The walks use the session's installed venv and must never change it (nor reach a package index).
           r"\S*(pip3?|uv\s+pip)\s+install\b|\S*python3?(\.\d+)?\s+-m\s+(pip|venv)\b":
               "it installs packages; the test runs in the installed venv and must not change it"}
# What ignoring .gitignore means where git is not there to ask.
IGNORED = (".git", ".venv", ".cache", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "build")


def section(text: str, title: str) -> str:
    """The README section whose `## ` heading starts with ``title``, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}.*$", text, flags=re.M)
    assert match, f"README.md has no '## {title}' section"
    end = text.find("\n## ", match.end())
    return text[match.start():end if end != -1 else None]


def first_bash_block(text: str) -> str:
    match = re.search(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)
    assert match, f"no ```bash block in {text.splitlines()[0]!r}"
    return match.group(1)


def script(block: str) -> tuple[str, list[str]]:
    """The block as a script, with the SKIPPED lines turned into comments; and those lines."""
    lines, skipped = [], []
    for line in block.splitlines():
        reason = next((why for pattern, why in SKIPPED.items() if re.match(rf"\s*{pattern}", line)), None)
        if reason:
            skipped.append(line)
            line = f"# skipped by tests/e2e/test_readme.py ({reason}): {line}"
        lines.append(line)
    return "\n".join(lines) + "\n", skipped


def claimed(text: str, name: str) -> float:
    """The first number the section's prose or sample output gives after ``name`` (its bash block left out)."""
    prose = text.replace(first_bash_block(text), "")
    match = re.search(rf"{name}\D{{0,30}}?(\d+(?:\.\d+)?)", prose)
    assert match, f"the section {text.splitlines()[0]!r} does not say what {name} the user will see"
    return float(match.group(1))


def printed(stdout: str, metric: str) -> float:
    """``metric`` on the last `test (N examples): ...` line a command printed."""
    lines = [line for line in stdout.splitlines() if line.startswith("test (")]
    assert lines, "no `test (N examples): ...` line in the output:\n" + stdout[-3000:]
    match = re.search(rf"\b{re.escape(metric)} (-?\d+(?:\.\d+)?)", lines[-1])
    assert match, f"no {metric} in {lines[-1]!r}"
    return float(match.group(1))


def copy_repo(dest: Path) -> None:
    """The checkout's files as a user has them (tracked, and untracked ones git does not ignore)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(*IGNORED))
        return
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is not there
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def venv_out_of_date(pyproject: Path) -> str | None:
    """Why the runner installed where this test runs does not match ``pyproject``, or None where it does: its
    console scripts and its requirements (extras included) are pyproject's."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        import tomllib
    except ImportError:  # Python 3.10
        return "comparing the install with pyproject.toml needs Python 3.11's tomllib"
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    try:
        dist = metadata.distribution(project["name"])
    except metadata.PackageNotFoundError:
        return f"{project['name']} is not installed"
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    if scripts != project.get("scripts", {}):
        return f"its console scripts are {scripts}, pyproject.toml's {project.get('scripts', {})}"
    wanted = {str(Requirement(r)) for r in project.get("dependencies", [])}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        wanted |= {str(Requirement(f'{r}; extra == "{extra}"')) for r in requirements}
    installed = {str(Requirement(r)) for r in dist.requires or []}
    if installed != wanted:
        return f"its requirements differ from pyproject.toml's: {sorted(installed ^ wanted)}"
    return None


def fresh_shell_env(copy: Path) -> dict:
    env = cli_env()
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not (Path(p).parent / "pyvenv.cfg").exists())
    env.pop("VIRTUAL_ENV", None)
    env["PYTHONPATH"] = str(copy)
    return env


@dataclass(frozen=True)
class Walk:
    copy: Path
    result: subprocess.CompletedProcess
    skipped: list[str]
    section: str


def walk(title: str, out: Path, lane) -> Walk:
    """Runs the first bash block of the README section ``title`` in a fresh copy of the repository under ``out``."""
    venv = Path(sys.prefix)
    if sys.prefix == sys.base_prefix or not (venv / "bin" / "runner").is_file():
        pytest.skip("the tests do not run in a virtualenv with the runner installed (`make install` makes one): "
                    "the README's make commands would install one")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    stale = venv_out_of_date(ROOT / "pyproject.toml")
    if stale:
        pytest.skip(f"the venv's runner was installed from another pyproject.toml ({stale}): the README's make "
                    "commands would reinstall it (run `make install`, then this test)")
    text = section((ROOT / "README.md").read_text(encoding="utf-8"), title)
    commands, skipped = script(first_bash_block(text))
    from runner.model import tiny as tiny_mod

    copy = out / "repo"
    copy_repo(copy)
    (copy / ".venv").symlink_to(venv, target_is_directory=True)
    (copy / ".cache").mkdir()
    (copy / ".cache" / "tiny").symlink_to(tiny_mod.build(), target_is_directory=True)
    runner_script = venv / "bin" / "runner"
    os.utime(copy / "pyproject.toml", ns=(runner_script.stat().st_atime_ns, runner_script.stat().st_mtime_ns))
    env = fresh_shell_env(copy)
    up_to_date = subprocess.run(["make", "-q", ".venv/bin/runner"], cwd=copy, env=env, capture_output=True)
    assert up_to_date.returncode == 0, "make would reinstall the venv; the test never lets it"
    before = (runner_script.stat().st_mtime_ns, runner_script.stat().st_size)
    (out / "walk.sh").write_text(commands, encoding="utf-8")
    result = run_watched(["bash", "-e", str(out / "walk.sh")], copy, env, hang_seconds=HANG_SECONDS, lane=lane)
    after = (runner_script.stat().st_mtime_ns, runner_script.stat().st_size)
    assert before == after, "the walk rewrote the venv's runner script: make reinstalled the venv"
    return Walk(copy, result, skipped, text)


@ahead("readme quick start")
def _quick_start(out: Path, lane) -> Walk:
    return walk(QUICK_START, out, lane)


@ahead("readme own task")
def _own_task(out: Path, lane) -> Walk:
    return walk(OWN_TASK, out, lane)


def succeeded(w: Walk) -> Walk:
    assert w.result.returncode == 0, (f"the README's commands failed (exit {w.result.returncode}):\n"
                                      f"{w.result.stdout[-3000:]}\n{w.result.stderr[-4000:]}")
    return w


def run_folder(w: Walk) -> Path:
    """The run folder of the last `done: <folder>` line, relative to the copy or to a folder the walk went into."""
    done = [line[6:] for line in w.result.stdout.splitlines() if line.startswith("done: ")]
    assert done, w.result.stdout[-3000:]
    (folder,) = [p for p in (w.copy / done[-1], *w.copy.glob(f"*/{done[-1]}")) if p.is_dir()]
    return folder


# ---------------------------------------------------------------- the sections and the script, without running it


def test_the_sections_are_found_and_turned_into_scripts():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = script(first_bash_block(section(text, QUICK_START)))
    own = script(first_bash_block(section(text, OWN_TASK)))
    assert "\nmake train" in "\n" + quick[0]  # the quick start trains the tiny twin, and the walk runs that line
    assert own[1] == [] and "runner train" in own[0]  # the own task runs every line
    assert section("intro\n## Your own task here\nbody\n## Next\n", OWN_TASK) == "## Your own task here\nbody"
    assert script("make test  # all\nmake test-fast\nmake train\nmake tests2\n")[1] == ["make test  # all",
                                                                                         "make test-fast"]
    installs = ["pip install -e .", ".venv/bin/pip install x", "python3 -m venv .venv", "python -m pip install y"]
    assert script("\n".join([*installs, "source .venv/bin/activate", "python - <<'EOF'"]))[1] == installs
    assert claimed("## X\n```bash\naccuracy 9\n```\nthen accuracy about 0.95 [0.9, 1]\n", "accuracy") == 0.95
    assert printed("x\ntest (100 examples): accuracy 1 [1, 1], classification.invalid 0\ndone: r\n",
                   "classification.invalid") == 0


def test_a_venv_installed_from_another_pyproject_is_told_apart(tmp_path):
    from importlib import metadata

    from packaging.requirements import Requirement

    dist = metadata.distribution("qlora-recipes")
    plain, extras = [], {}
    for r in map(Requirement, dist.requires):
        extra = re.search(r'extra == "([^"]+)"', str(r.marker)) if r.marker is not None else None
        r.marker = None
        (extras.setdefault(extra.group(1), []) if extra else plain).append(str(r))
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}

    def pyproject(scripts: dict, plain: list) -> Path:
        lines = ['[project]', 'name = "qlora-recipes"', f"dependencies = {plain!r}",
                 "[project.optional-dependencies]", *(f"{name} = {reqs!r}" for name, reqs in extras.items()),
                 "[project.scripts]", *(f'{k} = "{v}"' for k, v in scripts.items())]
        (tmp_path / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return tmp_path / "pyproject.toml"

    assert venv_out_of_date(pyproject(scripts, plain)) is None  # the install's own pyproject
    moved = venv_out_of_date(pyproject({"runner": "runner.elsewhere:run"}, plain))
    assert moved and "console scripts" in moved
    more = venv_out_of_date(pyproject(scripts, [*plain, "numpy>=1"]))
    assert more and "numpy>=1" in more


def test_a_fresh_shell_has_no_venv_on_its_path(tmp_path):
    env = fresh_shell_env(tmp_path)
    assert not [p for p in env["PATH"].split(os.pathsep) if (Path(p).parent / "pyvenv.cfg").exists()]
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONPATH"] == str(tmp_path) and "VIRTUAL_ENV" not in env


# ---------------------------------------------------------------- the walks


@pytest.mark.slow
def test_quick_start_works_as_written(background):
    w = succeeded(background("readme quick start")[1])
    rouge_l = printed(w.result.stdout, "rougeL")
    print(f"quick start: ROUGE-L {rouge_l} printed, {claimed(w.section, 'ROUGE-L')} claimed; skipped {w.skipped}")
    assert rouge_l >= 50  # learned (the untrained tiny model scores near 0)
    assert abs(rouge_l - claimed(w.section, "ROUGE-L")) <= 5, "the README's ROUGE-L is not what make train prints"
    assert (run_folder(w) / "report.md").is_file()


@pytest.mark.slow
def test_own_task_works_as_written(background):
    w = succeeded(background("readme own task")[1])
    accuracy = printed(w.result.stdout, "accuracy")
    print(f"own task: accuracy {accuracy} printed, {claimed(w.section, 'accuracy')} claimed")
    assert accuracy >= 0.8  # the test reviews are half positive, half negative: 0.5 is the majority baseline
    assert printed(w.result.stdout, "classification.invalid") == 0
    assert abs(accuracy - claimed(w.section, "accuracy")) <= 0.1, "the README's accuracy is not what train prints"
    run_dir = run_folder(w)
    assert (run_dir / "report.md").is_file() and (run_dir / "adapter").is_dir()
    assert w.result.stdout.splitlines()[-1].startswith("done: runs/my_reviews/")
