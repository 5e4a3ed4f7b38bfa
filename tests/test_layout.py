"""The code's shape, checked: packages that import only the packages below them (each __init__'s 'May import:'
line), no import cycles (none hidden by imports inside functions), no module over 450 lines, evaluators that use
only the evaluator contract and the runner's leaf helpers, built-ins registered once, an architecture page that
names every module, and make targets that build the tiny model before they read it. Reads source files; imports
nothing heavy."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest

from evaluators import BUILTINS, builtin
from tests.conftest import ROOT, cli_env

TOP = ("runner", "evaluators")
# What an evaluator module may import from the runner: leaf helpers that import nothing of the runner themselves.
# labels: the label matching the labelled evaluators score with is the one the runner checks recipes and builds
# baselines with (one definition of "the same label").
EVALUATOR_MAY_USE = {"runner.common.stats", "runner.common.safeio", "runner.common.markdown", "runner.common.labels"}


def modules() -> dict[str, ast.Module]:
    """Every module of the project, by dotted name (a package by its own name)."""
    out = {}
    for top in TOP:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def package_of(module: str) -> str:
    """The stage package a module belongs to: runner.data.chat -> data, evaluators.rouge -> evaluators."""
    parts = module.split(".")
    if parts[0] == "evaluators":
        return "evaluators"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / "runner" / parts[1]).is_dir()) else "runner"


def packages() -> dict[str, ast.Module]:
    """The stage packages: runner/<package>/ and evaluators/, each with its __init__."""
    out = {p.name: p / "__init__.py" for p in sorted((ROOT / "runner").iterdir()) if (p / "__init__.py").is_file()}
    out["evaluators"] = ROOT / "evaluators" / "__init__.py"
    return out


def may_import(init_path) -> set[str]:
    """The packages a package's __init__ docstring allows it to import (its 'May import:' line)."""
    doc = ast.get_docstring(ast.parse(init_path.read_text(encoding="utf-8"))) or ""
    line = re.search(r"^May import: (.*?)\.?$", doc, flags=re.M)
    assert line, f"{init_path}: the docstring has no 'May import:' line"
    if line.group(1).startswith("nothing"):
        return set()
    names = re.sub(r"\s*\(.*?\)", "", line.group(1))  # a remark in brackets narrows; the tests below check it
    return {name.strip() for name in names.split(",")}


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


def test_every_package_imports_only_the_packages_its_docstring_allows():
    known = modules()
    allowed = {name: may_import(path) for name, path in packages().items()}
    wrong = sorted(f"{src} -> {dst}" for src, targets in graph(known).items() for dst in targets
                   if package_of(src) in allowed and package_of(dst) != package_of(src)
                   and package_of(dst) not in allowed[package_of(src)])
    assert not wrong, wrong


# What loading and validating a recipe must never bring in: the stages above the recipe layer and the heavy libraries.
ABOVE_THE_RECIPE = ("runner.model", "runner.speed", "runner.evaluate", "runner.data", "torch", "transformers")


def test_the_recipe_layer_loads_nothing_above_it():
    """Every module of runner.recipe imported in a fresh interpreter, and a recipe loaded and validated with the
    recipe's own checks: none of the stages above it, nor torch or transformers, is in sys.modules."""
    names = ["runner.recipe", *sorted(f"runner.recipe.{p.stem}" for p in (ROOT / "runner" / "recipe").glob("*.py")
                                      if p.stem != "__init__")]
    code = ("import importlib, json, sys\n"
            f"for name in {names!r}: importlib.import_module(name)\n"
            "from runner.recipe import checks, recipe\n"
            "r = recipe.load('recipes/tiny/chat_tiny.yaml', checks=(checks.check_prompt, checks.check_settings))\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert "runner.recipe.recipe" in loaded and "jsonschema" in loaded  # it did import and validate
    assert not [m for m in loaded if any(m == top or m.startswith(f"{top}.") for top in ABOVE_THE_RECIPE)]


def test_the_allowed_imports_are_an_order_without_cycles():
    """Each package's allowed imports lie below it: the packages form a stack, not a web."""
    allowed = {name: may_import(path) for name, path in packages().items()}
    for name, deps in allowed.items():
        assert deps <= allowed.keys(), (name, deps - allowed.keys())

    def below(name, seen=()):
        return set().union(*({d} | below(d, (*seen, d)) for d in allowed[name] if d not in seen))

    assert not [name for name in allowed if name in below(name)]


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for top in TOP for p in (ROOT / top).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, long



def test_the_cli_finds_what_to_clean_up_without_reading_sys_modules():
    """What a failed command leaves is cleaned up by what opened it (the trainer's progress bars by training, the
    folders through runner.store.runs, which records them as a command opens them), never found by looking through
    sys.modules for what may have been imported."""
    for path in sorted((ROOT / "runner" / "cli").glob("*.py")):
        assert "sys.modules" not in path.read_text(encoding="utf-8"), path.name


def _runner_names(tree: ast.Module) -> set[str]:
    """The names a module binds to the runner's modules and their contents (import runner.x, from runner.x import y)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("runner")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("runner"):
            names |= {a.asname or a.name for a in node.names}
    return names


def test_the_benchmarks_drive_the_runner_through_parameters_not_by_overwriting_its_globals():
    """bench/*.py sets no attribute of a runner module (or of what it imported from one) and no setattr on one: a
    benchmark that needs another setting passes it (train's speed and instrument, generate's and rank's choice and
    cudnn_attention), so what it measures is the code as it runs."""
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        ours = _runner_names(tree)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                while isinstance(target, ast.Attribute):
                    target = target.value
                    if isinstance(target, ast.Name) and target.id in ours:
                        found.append(f"{path.name}:{node.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in ours):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, found

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

    clashes = {path.stem for path in (ROOT / "runner").rglob("*.py")} & set(sys.stdlib_module_names)
    assert not clashes, clashes


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtins_declare_their_keys_like_user_evaluators(name):
    cls = builtin(name)
    assert cls.name == name and isinstance(cls.params_schema, dict)
    schema_text = json.dumps(json.loads((ROOT / "runner" / "recipe" / "schema" / "recipe.schema.json").read_text()))
    assert f'"const": "{name}"' not in schema_text  # the schema has no per-evaluator branch


def test_the_architecture_page_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = text[text.index("## Packages"):]
    listed, package = set(), None
    for line in layout.splitlines():
        if m := re.match(r"^runner/(\w+)/", line):
            package = m.group(1)
        elif (m := re.match(r"^  (\w+)\.py\b", line)) and package:
            listed.add(f"{package}/{m.group(1)}")
    files = {f"{p.parent.name}/{p.stem}" for p in (ROOT / "runner").glob("*/*.py") if p.stem != "__init__"}
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
    assert "-m runner.model.tiny" in dry.stdout, dry.stdout  # the tiny data and the Phi twin


@pytest.mark.parametrize("target", ["train", "inspect", "plan", "sweep"])
def test_make_targets_build_the_family_twin_their_recipe_names_and_no_other(target, tmp_path):
    dry = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"TINY={tmp_path / 'BUILT'}", "AXES=lora.r=4,8",
                          "RECIPE=recipes/tiny/llama_tiny.yaml", "ARGS=training.max_steps=3"],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "-m runner.model.twins --recipe recipes/tiny/llama_tiny.yaml training.max_steps=3" in dry.stdout
    from runner.model import twins

    out = ROOT / ".cache" / "tiny"
    assert twins.named_by(ROOT / "recipes/tiny/llama_tiny.yaml", [], out) == ["llama"]
    assert twins.named_by(ROOT / "recipes/tiny/xsum_tiny.yaml", [], out) == []  # make train's default: Phi only
    assert twins.named_by(ROOT / "recipes/tiny/xsum_tiny.yaml", [f"model.name_or_path={out / 'gemma3'}"],
                          out) == ["gemma3"]
    assert twins.named_by(tmp_path / "missing.yaml", [], out) == []  # the runner reports that one
