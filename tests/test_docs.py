"""The user docs hold together: the recipe reference is what the schema generates, every relative link and anchor
in README.md and docs/*.md leads somewhere, the README is a guide with a table of contents, `make help` and the
README name every make target, and timings are stated in one place. Reads files and runs `make -s help`; imports
nothing heavy."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from runner.recipe import reference
from tests.conftest import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"^#{1,6} (.+?)\s*#*$", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_slug_is_githubs():
    assert slug("The study's four tasks") == "the-studys-four-tasks"
    assert slug("`training`") == "training"
    assert slug("extends: a recipe on top of another") == "extends-a-recipe-on-top-of-another"
    assert slug("Data: files, hub datasets, held-out rows") == "data-files-hub-datasets-held-out-rows"


# ---------------------------------------------------------------- the generated reference


def test_the_recipe_reference_is_what_the_schema_generates():
    committed = (ROOT / reference.PAGE).read_text(encoding="utf-8")
    assert committed == reference.page(), "docs/recipe-reference.md is stale: run `make docs`"


def _key_paths(node: dict, path: str = ""):
    """Every key path of a schema node, as the reference writes it (list items as `key[]`)."""
    for key, child in node.get("properties", {}).items():
        here = f"{path}.{key}" if path else key
        yield here
        yield from _key_paths(child, here)
        items = child.get("items", {})
        if "properties" in items:
            yield from _key_paths(items, f"{here}[]")


def test_the_reference_has_a_row_for_every_key_with_its_default_and_description():
    schema = json.loads(reference.SCHEMA_PATH.read_text(encoding="utf-8"))
    page = reference.page(schema)
    rows = {line.split(" | ")[0].strip("| `"): line for line in page.splitlines() if line.startswith("| `")}
    for path in _key_paths(schema):
        section = "properties" in schema["properties"].get(path, {})  # model, data, ...: a heading of its own
        assert (f"\n## `{path}`\n" in page) if section else (path in rows), path
    lr = rows["training.learning_rate"]
    assert "`0.0002`" in lr and "(&gt; 0, ≤ 1)" in lr and "Peak learning rate" in lr
    assert "| required |" in rows["model.name_or_path"]
    # A changed default shows in the page: it is generated, not copied.
    schema["properties"]["training"]["properties"]["learning_rate"]["default"] = 0.125
    assert "`0.125`" in reference.page(schema)


def test_the_reference_escapes_what_markdown_would_swallow():
    page = reference.page()
    assert "<output_dir>" not in page and "&lt;output_dir&gt;" in page  # not an HTML tag
    assert "\\*_8bit" in page  # not emphasis
    for line in page.splitlines():
        if line.startswith("| `"):
            assert len(re.split(r"(?<!\\)\|", line)) == 6, line  # four cells, no stray cell breaks


# ---------------------------------------------------------------- links


def _links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, broken


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nope) [gone](missing.md) `[code](nowhere.md)`\n")
    assert _links(page) == ["#title", "#nope", "missing.md"]
    assert "title" in anchors(page) and "nope" not in anchors(page)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    assert not [p.name for p in DOCS if p.resolve() not in linked]


# ---------------------------------------------------------------- the README


def test_the_readme_is_a_guide_with_a_table_of_contents():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    sections = [m for m in re.findall(r"^## (.+)$", FENCE.sub("", text), flags=re.M) if m != "Contents"]
    contents = text[text.index("## Contents"):]
    contents = contents[:contents.index("\n## ", 1)]
    assert [f"#{slug(s)}" for s in sections] == re.findall(r"\]\((#[^)]+)\)", contents)
    assert "## Your own task" in text


def test_the_readme_activates_the_virtualenv_before_its_first_bare_runner_command():
    """After `make train`, `runner` is in .venv/bin, not on PATH: the README says how before it first uses it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"^runner ", text, flags=re.M)
    assert first, "no runner command at the start of a line"
    assert "source .venv/bin/activate" in text[:first.start()]


def _make_targets() -> list[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return re.search(r"^\.PHONY: (.*)$", makefile, flags=re.M).group(1).split()


def test_make_help_and_the_readme_name_every_target():
    shown = subprocess.run(["make", "-s", "-C", str(ROOT), "help"], capture_output=True, text=True, check=True).stdout
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in _make_targets():
        if target == "help":
            continue
        assert re.search(rf"^make {re.escape(target)}\b", shown, flags=re.M), f"make help lacks {target}"
        assert f"make {target}" in readme, f"the README lacks make {target}"


# ---------------------------------------------------------------- timings in one place

DURATION = re.compile(r"\b\d+(\.\d+)?\s*(s|sec|seconds?|min|minutes?)\b|under a minute|~\s*\d", re.I)


def test_test_and_train_timings_are_stated_only_on_the_timings_page():
    """`make test`, `make test-fast` and `make train` durations live in docs/timings.md; every other place that
    talks about those commands links there instead of quoting a number that drifts."""
    shown = subprocess.run(["make", "-s", "-C", str(ROOT), "help"], capture_output=True, text=True, check=True).stdout
    conftest_doc = (ROOT / "tests" / "conftest.py").read_text(encoding="utf-8").split('"""')[1]
    places = {"make help": shown, "tests/conftest.py": conftest_doc}
    places.update({str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in PAGES if p.name != "timings.md"})
    wrong = [f"{where}: {line.strip()}" for where, text in places.items() for line in text.splitlines()
             if re.search(r"make (test|test-fast|train)\b", line) and DURATION.search(line)]
    assert not wrong, wrong
    assert "docs/timings.md" in shown and "docs/timings.md" in conftest_doc
