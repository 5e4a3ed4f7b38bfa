"""`runner generate`: a user's own articles (JSONL records or raw text, from a file or stdin) through the recipe's
template and a trained adapter; mistakes in the input fail in one line before any weight loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli
from tests.test_errors import assert_user_error, write_recipe

pytestmark = pytest.mark.twins("xsum_tiny")  # the twin `trained` gives this module's tests (docs/testing.md)

TINY_XSUM = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"

N = 8


@pytest.fixture(scope="module")
def articles(tiny, tmp_path_factory):
    """N held-out tiny articles as JSONL records and as raw text lines, and their reference summaries."""
    rows = [json.loads(line) for line in (tiny / "data" / "xsum_tiny" / "test.jsonl").read_text().splitlines()[:N]]
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "articles.jsonl").write_text("".join(json.dumps({"document": r["document"]}) + "\n" for r in rows))
    (folder / "articles.txt").write_text("".join(r["document"] + "\n\n" for r in rows))  # blank lines are skipped
    return folder, [r["summary"] for r in rows]


@pytest.fixture(scope="module")
def xsum(trained):
    """(run folder, output_dir) of the session's trained tiny XSum twin."""
    run = trained("xsum_tiny")
    return run.run_dir, run.output_dir


@pytest.fixture(scope="module")
def from_jsonl(xsum, articles):
    run_dir, out = xsum
    result = run_cli("generate", TINY_XSUM, "--run", run_dir, "--input", articles[0] / "articles.jsonl",
                     f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_generate_prints_one_summary_per_article(from_jsonl, articles):
    from rouge_score import rouge_scorer

    lines = from_jsonl.stdout.splitlines()
    assert len(lines) == N and all(line.strip() for line in lines)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l = np.mean([scorer.score(ref, pred)["rougeL"].fmeasure * 100 for ref, pred in zip(articles[1], lines)])
    print(f"ROUGE-L of `runner generate` on {N} held-out articles: {rouge_l:.1f}")
    assert rouge_l >= 30  # an untrained model scores about 0 here
    assert "generating" in from_jsonl.stderr  # the progress bar goes to stderr, stdout holds only completions


def test_raw_text_from_stdin_gives_the_same_summaries(xsum, from_jsonl, articles):
    run_dir, out = xsum
    text = (articles[0] / "articles.txt").read_text()
    result = run_cli("generate", TINY_XSUM, "--run", run_dir, "--input", "-", "--jsonl", f"output_dir={out}",
                     input=text)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["document"] for r in records] == [line for line in text.splitlines() if line]
    assert [r["completion"] for r in records] == from_jsonl.stdout.splitlines()


def test_input_mistakes_fail_before_loading(tmp_path, tiny, cli, articles, xsum):
    run_dir, _ = xsum
    missing = cli("generate", TINY_XSUM, "--run", run_dir, "--input", tmp_path / "nope.jsonl")
    assert_user_error(missing, "--input", "file not found")
    bad_record = tmp_path / "bad.jsonl"
    bad_record.write_text('{"article": "Snow closes schools."}\n')
    assert_user_error(cli("generate", TINY_XSUM, "--run", run_dir, "--input", bad_record),
                      "--input", "line 1", "'document'")
    two_fields = write_recipe(tmp_path, tiny, lambda r: r["prompt"].update(
        template="Title: {id}\nArticle: {document}\nSummary:", truncate=None))
    assert_user_error(cli("generate", two_fields, "--run", run_dir, "--input", articles[0] / "articles.txt"),
                      "--input", "{id}, {document}", "JSONL")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_user_error(cli("generate", TINY_XSUM, "--run", run_dir, "--input", empty), "--input", "no inputs")
    assert_user_error(cli("generate", TINY_XSUM, "--run", tmp_path, "--input", empty), "--run", "no trained adapter")


@pytest.mark.slow
def test_a_broken_json_record_is_refused_not_read_as_text(tmp_path, tiny, cli):
    """A line that starts with '{' is a record: one that does not parse is an error, not the article's text."""
    broken = tmp_path / "in.jsonl"
    broken.write_text('Snow closes schools.\n{"document": "The council approved a budget.",}\n')
    line = assert_user_error(cli("generate", TINY_XSUM, "--base", "--input", broken, "--jsonl"),
                             "--input", "line 2: not valid JSON (", "column 47", "read as a JSON record")
    assert line.startswith("error: --input: line 2: not valid JSON (Expecting property name")


def test_without_a_recipe_a_run_generates_with_its_own(xsum, from_jsonl, articles):
    """No RECIPE: the run's recipe.yaml (the template the adapter learned), the same summaries; overrides apply on
    top (a word before the options that looks like key.path=value is one)."""
    run_dir, _ = xsum
    result = run_cli("generate", "generation.batch_size=3", "--run", run_dir, "--input", articles[0] / "articles.jsonl")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines() == from_jsonl.stdout.splitlines()
    assert "note:" not in result.stderr
