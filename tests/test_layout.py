"""The code's shape, checked: no import cycles (none hidden by imports inside functions), evaluators that use only
the evaluator contract and the runner's leaf helpers, built-ins registered once, and a README layout that names
every module, and make targets that build the tiny model before they read it. Reads source files; imports
nothing heavy."""

from __future__ import annotations

import ast
import json
import re
import subprocess

import pytest

from evaluators import BUILTINS, builtin
from tests.conftest import ROOT

PACKAGES = ("runner", "evaluators")
# What an evaluator module may import from the runner: leaf helpers that import nothing of the runner themselves.
EVALUATOR_MAY_USE = {"runner.stats", "runner.safeio", "runner.markdown"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def imported(node, known) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if isinstance(node, ast.ImportFrom) and node.module:
        names = {f"{node.module}.{a.name}" for a in node.names}
        return {n for n in names if n in known} | ({node.module} if node.module in known and not names & known.keys()
                                                   else set())
    return set()


def graph(known: dict) -> dict[str, set[str]]:
    """Every project import of every module, at the top or inside a function."""
    return {name: set().union(*(imported(n, known) for n in ast.walk(tree))) - {name} for name, tree in known.items()}


def test_no_import_cycle_even_through_imports_inside_functions():
    edges = graph(modules())

    def reaches(start, goal, seen=()):
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, (*seen, nxt))) for nxt in edges[start])

    cycles = sorted(f"{a} -> {b}" for a in edges for b in edges[a] if reaches(b, a))
    assert not cycles, cycles


def test_evaluators_use_the_contract_and_leaf_helpers_only():
    known = modules()
    for name, targets in graph(known).items():
        if name.startswith("evaluators"):
            runner_imports = {t for t in targets if t.startswith("runner")}
            assert runner_imports <= EVALUATOR_MAY_USE, (name, runner_imports)
    for helper in EVALUATOR_MAY_USE:  # leaves: they import nothing of the project
        assert not graph(known)[helper], helper


def test_runner_modules_do_not_shadow_the_standard_library():
    import sys

    clashes = {path.stem for path in (ROOT / "runner").glob("*.py")} & set(sys.stdlib_module_names)
    assert not clashes, clashes


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtins_declare_their_keys_like_user_evaluators(name):
    cls = builtin(name)
    assert cls.name == name and isinstance(cls.params_schema, dict)
    schema_text = json.dumps(json.loads((ROOT / "runner" / "schema" / "recipe.schema.json").read_text()))
    assert f'"const": "{name}"' not in schema_text  # the schema has no per-evaluator branch


def test_the_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 5)]
    listed = set(re.findall(r"^  (\w+)\.py\b", layout, flags=re.M))  # runner/'s entries, two spaces in
    files = {p.stem for p in (ROOT / "runner").glob("*.py")} - {"__init__", "__main__"}
    assert listed == files, (sorted(files - listed), sorted(listed - files))


# The make targets whose default recipe (the tiny twin) reads the tiny model or data; validate checks the recipe
# alone (no file of the model or the data is read), so it needs no build.
NEEDS_TINY = ("inspect", "train", "eval", "compare", "generate", "export", "sweep", "plan", "smoke", "test",
              "test-fast")


@pytest.mark.parametrize("target", NEEDS_TINY)
def test_make_targets_that_read_the_tiny_model_build_it_first(target, tmp_path):
    """On a fresh checkout (no tiny model yet) each of these builds it before running the runner."""
    dry = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"TINY={tmp_path / 'BUILT'}", "RUN=r", "OUT=o",
                          "AXES=lora.r=4,8"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "-m runner.tiny" in dry.stdout, dry.stdout
