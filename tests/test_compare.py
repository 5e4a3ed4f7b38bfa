"""Base vs adapter: the paired bootstrap, metrics side by side, and `runner compare` on a trained tiny run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from runner.cli import recipes
from runner.evaluate import compare as compare_mod
from runner.recipe import recipe as recipe_mod
from tests.conftest import ROOT, run_cli
from tests.test_metrics import METRICS

pytestmark = pytest.mark.twins("xsum_tiny")  # the twin `trained` gives this module's tests (docs/testing.md)

TINY_XSUM = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"

def test_side_by_side_knows_which_direction_is_better():
    adapter = json.loads(json.dumps(METRICS))
    adapter["rouge"]["rougeL"] = {"f1": 60.0, "ci95": [52.0, 68.0]}
    adapter["loss"].update(loss=2.1, loss_ci95=[1.9, 2.3])
    adapter["classification"]["invalid"] = 0
    rows = compare_mod.side_by_side(METRICS, adapter, {"rouge.rougeL": {"difference_ci95": [15, 25]}})
    assert rows["rouge.rougeL"]["better"] == "adapter" and rows["rouge.rougeL"]["ci_overlap"] is False
    assert rows["rouge.rougeL"]["difference"] == 20 and rows["rouge.rougeL"]["paired"]
    assert rows["loss.loss"]["better"] == "base" and rows["loss.loss"]["ci_overlap"] is True
    assert rows["classification.invalid"]["better"] == "adapter" and rows["classification.invalid"]["ci_overlap"] is None
    assert rows["classification.accuracy"]["better"] == "tie"


def test_a_metric_whose_direction_is_not_declared_names_no_better_system():
    base = {"split": "test", "examples": 3, "mine:Score": {"score": 0.4}}
    adapter = {"split": "test", "examples": 3, "mine:Score": {"score": 0.6}}
    (row,) = compare_mod.side_by_side(base, adapter, {}).values()
    assert row["difference"] == pytest.approx(0.2) and row["better"] is None


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def compared(trained):
    run = trained("xsum_tiny")
    run_dir, out = run.run_dir, run.output_dir
    args = ("compare", TINY_XSUM, "--run", run_dir, f"output_dir={out}", "data.test_samples=24",
            "evaluation.evaluators=[{name: rouge}, {name: loss}, {name: samples, count: 4}]")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-4000:]
    (folder,) = run_dir.glob("compare-*")
    return folder, result, args


def test_compare_writes_both_systems_side_by_side(compared):
    folder, result, _ = compared
    summary = json.loads((folder / "comparison.json").read_text())
    rows = summary["metrics"]
    assert summary["examples"] == 24 and summary["seed"] == 42
    assert set(rows) >= {"rouge.rouge1", "rouge.rouge2", "rouge.rougeL", "rouge.rougeLsum", "loss.loss",
                         "loss.perplexity"}
    rouge_l = rows["rouge.rougeL"]
    print(f"ROUGE-L base {rouge_l['base']:.1f} -> adapter {rouge_l['adapter']:.1f}, "
          f"loss {rows['loss.loss']['base']:.2f} -> {rows['loss.loss']['adapter']:.2f}")
    assert rouge_l["adapter"] > rouge_l["base"] + 20 and rouge_l["better"] == "adapter"
    assert rouge_l["difference"] == pytest.approx(rouge_l["adapter"] - rouge_l["base"], abs=1e-6)
    assert rouge_l["paired"]["difference_ci95"][0] > 0 and rouge_l["ci_overlap"] is False
    assert rows["loss.loss"]["adapter"] < rows["loss.loss"]["base"] and rows["loss.loss"]["better"] == "adapter"
    assert "paired" not in rows["loss.loss"]
    md = (folder / "comparison.md").read_text()
    assert "| rouge.rougeL |" in md and "| loss.perplexity |" in md and "## Examples" in md
    assert "rouge.rougeL: base" in result.stdout and "comparison.md" in result.stdout


def test_both_systems_saw_the_same_examples(compared):
    folder, _, _ = compared
    rows = {s: [json.loads(line) for line in (folder / s / "predictions.jsonl").read_text().splitlines()]
            for s in ("base", "adapter")}
    key = [(r["index"], r["id"], r["prompt"], r["reference"]) for r in rows["base"]]
    assert sorted(key) == sorted((r["index"], r["id"], r["prompt"], r["reference"]) for r in rows["adapter"])
    assert len(key) == 24
    assert [r["prediction"] for r in rows["base"]] != [r["prediction"] for r in rows["adapter"]]


def test_an_interrupted_comparison_is_picked_up_again(compared):
    folder, _, args = compared
    base_metrics = (folder / "base" / "metrics.json").read_text()
    (folder / "comparison.json").unlink()
    (folder / "adapter" / "metrics.json").unlink()
    lines = (folder / "adapter" / "predictions.jsonl").read_text().splitlines()
    (folder / "adapter" / "predictions.jsonl").write_text("\n".join(lines[:10]) + "\n")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"comparison folder: {folder}" in result.stdout
    assert "base: evaluating" not in result.stdout and "adapter: evaluating" in result.stdout
    assert "resuming evaluation: 10 of 24" in result.stdout
    assert (folder / "base" / "metrics.json").read_text() == base_metrics
    assert len((folder / "adapter" / "predictions.jsonl").read_text().splitlines()) == 24
    assert (folder / "comparison.json").exists()


def test_compare_needs_a_finished_run(tmp_path, tiny, cli):
    result = cli("compare", TINY_XSUM, "--run", tmp_path, f"output_dir={tmp_path}")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --run: ")


@pytest.mark.slow
@pytest.mark.twins("agnews_tiny")
def test_compare_ranks_a_users_metric_by_its_declaration(trained):
    """The trained AG News twin against its base, scored by a user's evaluator whose error_rate is declared
    lower-is-better and loss_free higher-is-better: the adapter is better on both (a guess from the names would have
    called the base better on both)."""
    run = trained("agnews_tiny")
    result = run_cli("compare", ROOT / "recipes" / "tiny" / "agnews_tiny.yaml", "--run", run.run_dir,
                     f"output_dir={run.output_dir}", "data.test_samples=24", "generation.mode=rank",
                     "evaluation.evaluators=[{name: 'tests.userevals:ErrorRate'}, {name: classification, labels: "
                     "[World, Sports, Business, Sci/Tech], confusion_matrix: false}]")
    assert result.returncode == 0, result.stderr[-4000:]
    folder = max(run.run_dir.glob("compare-*"))
    rows = json.loads((folder / "comparison.json").read_text())["metrics"]
    error, free = rows["tests.userevals:ErrorRate.error_rate"], rows["tests.userevals:ErrorRate.loss_free"]
    print(f"error rate base {error['base']:.3f} -> adapter {error['adapter']:.3f}")
    assert error["adapter"] < error["base"] and error["better"] == "adapter"
    assert free["adapter"] > free["base"] and free["better"] == "adapter"
    assert error["paired"]["difference"] < 0  # paired over the same examples (its per_example)
    assert rows["classification.accuracy"]["better"] == "adapter"
    md = (folder / "comparison.md").read_text()
    assert f"| tests.userevals:ErrorRate.error_rate | {error['base']:.4g} | {error['adapter']:.4g} | " in md


# ---------------------------------------------------------------- adapter vs adapter


@pytest.fixture(scope="module")
def pair(trained):
    """A barely-trained adapter (2 steps) as A, the session's trained one (the recipe as written) as B."""
    twin = trained("xsum_tiny")
    full, out = twin.run_dir, twin.output_dir
    result = run_cli("train", TINY_XSUM, f"output_dir={out}/barely", "training.max_steps=2", "--no-eval")
    assert result.returncode == 0, result.stderr[-4000:]
    (barely,) = [p for p in (out / "barely" / "xsum_tiny").iterdir() if (p / "adapter").is_dir()]
    args = ("compare", TINY_XSUM, "--run", barely, "--run", full, f"output_dir={out}", "data.test_samples=16",
            "evaluation.evaluators=[{name: rouge}, {name: samples, count: 2}]")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-4000:]
    (folder,) = full.glob("vs-*")
    return barely, full, folder, result


@pytest.mark.slow
def test_a_trained_adapter_beats_a_barely_trained_one(pair):
    barely, trained, folder, result = pair
    summary = json.loads((folder / "comparison.json").read_text())
    assert summary["systems"] == ["A", "B"] and summary["runs"] == {"A": str(barely), "B": str(trained)}
    assert json.loads((folder / "runs.json").read_text()) == {"A": str(barely), "B": str(trained)}
    row = summary["metrics"]["rouge.rougeL"]
    print(f"ROUGE-L A (2 steps) {row['A']:.1f} -> B (fully trained) {row['B']:.1f}")
    assert row["difference"] == pytest.approx(row["B"] - row["A"], abs=1e-6) and row["difference"] > 0
    assert row["better"] == "B" and row["paired"]["difference_ci95"][0] > 0
    rows = {s: [json.loads(line) for line in (folder / s / "predictions.jsonl").read_text().splitlines()]
            for s in ("A", "B")}
    assert [(r["index"], r["reference"]) for r in rows["A"]] == [(r["index"], r["reference"]) for r in rows["B"]]
    assert len(rows["A"]) == 16 and [r["prediction"] for r in rows["A"]] != [r["prediction"] for r in rows["B"]]
    # B's predictions are the trained adapter's own: the same as evaluating it alone would give (greedy decoding).
    md = (folder / "comparison.md").read_text()
    assert md.startswith("# Adapter vs adapter: xsum_tiny") and "| metric | A | B | B − A |" in md
    assert "rouge.rougeL: A " in result.stdout and "-> B " in result.stdout


@pytest.mark.slow
def test_compare_says_how_a_and_b_were_trained_differently(pair):
    barely, trained, folder, result = pair
    steps = recipes.load(TINY_XSUM)["training"]["max_steps"]
    summary = json.loads((folder / "comparison.json").read_text())
    # output_dir differs too, as it always may: where a run writes is not how it trained
    assert summary["recipe_differences"] == [{"key": "training.max_steps", "A": 2, "B": steps}]
    assert f"A vs B: trained with training.max_steps 2 -> {steps}" in result.stdout.splitlines()
    md = (folder / "comparison.md").read_text()
    assert f"## How A and B were trained differently\n\n| recipe key | A | B |\n|---|---|---|\n" \
           f"| training.max_steps | 2 | {steps} |\n" in md


def test_the_recipe_differences_of_two_runs(tmp_path):
    from runner.store import runs

    def run(name: str, *overrides: str):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "recipe.yaml").write_text(recipe_mod.dump(recipes.load(TINY_XSUM, [f"output_dir={folder}",
                                                                                     *overrides])))
        return folder

    a = run("a", "lora.r=8", "training.resume=never")
    b = run("b", "lora.r=16", "training.learning_rate=0.003", "lora.target_modules=[q_proj]")
    lr = recipes.load(TINY_XSUM)["training"]["learning_rate"]
    targets = recipes.load(TINY_XSUM)["lora"]["target_modules"]
    assert runs.recipe_differences(a, b) == [("lora.r", 8, 16), ("lora.target_modules", targets, ["q_proj"]),
                                             ("training.learning_rate", lr, 0.003)]
    assert runs.recipe_differences(a, run("c", "lora.r=8")) == []  # training.resume differs: not how it trained
    assert runs.recipe_differences(a, tmp_path) is None  # no recipe.yaml
    assert compare_mod.difference_line([]) == "A vs B: trained with the same recipe"


# ---------------------------------------------------------------- a run's own recipe


def run_copy(trained, twin: str, copy: Path) -> Path:
    """A copy of a trained twin's adapter and recipe (evaluating it writes into the run folder)."""
    run = trained(twin).run_dir
    shutil.copytree(run / "adapter", copy / "adapter")
    shutil.copy(run / "recipe.yaml", copy / "recipe.yaml")
    return copy


@pytest.fixture
def agnews_run_copy(trained, tmp_path):
    return run_copy(trained, "agnews_tiny", tmp_path / "agnews_run")


@pytest.mark.slow
@pytest.mark.twins("agnews_tiny")
def test_without_a_recipe_a_run_is_evaluated_with_its_own(agnews_run_copy, cli):
    """`runner eval --run DIR` (make eval RUN=DIR): the AG News run on its own data and evaluators, not the XSum
    recipe make used to pass by default; overrides apply on top of the run's recipe."""
    result = cli("eval", "--run", agnews_run_copy, "data.test_samples=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note:" not in result.stderr
    (folder,) = agnews_run_copy.glob("eval-*")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["examples"] == 4 and "classification" in metrics and "rouge" not in metrics
    used = recipes.load(folder / "recipe.yaml")
    assert used["name"] == "agnews_tiny" and used["data"]["test_samples"] == 4


@pytest.mark.parametrize("target", ["eval", "compare", "generate", "export"])
def test_make_passes_recipe_only_when_the_user_names_one(target, tmp_path):
    import subprocess

    def dry(*given: str) -> str:
        out = subprocess.run(["make", "-n", "-C", str(ROOT), target, "RUN=runs/agnews_tiny/1", "OUT=o",
                              f"VENV={tmp_path}", f"TINY={tmp_path / 'BUILT'}", *given],
                             capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "RECIPE"})
        assert out.returncode == 0, out.stderr
        return next(line for line in out.stdout.splitlines() if f"runner {target} " in line)

    assert f"runner {target}  --run runs/agnews_tiny/1" in dry()  # the run's own recipe
    assert f"runner {target} my.yaml --run runs/agnews_tiny/1" in dry("RECIPE=my.yaml")


def test_compare_refuses_the_same_run_twice_and_a_third(tiny, tmp_path, cli):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    same = cli("compare", TINY_XSUM, "--run", run, "--run", run, f"output_dir={tmp_path}")
    assert same.returncode == 2 and same.stderr.strip() == \
        "error: --run: A and B are the same run (give two different run folders)"
    three = cli("compare", TINY_XSUM, "--run", run, "--run", run, "--run", run, f"output_dir={tmp_path}")
    assert three.returncode == 2 and three.stderr.strip().startswith("error: --run: given 3 times")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written


# ---------------------------------------------------------------- a run of another recipe


@pytest.fixture
def xsum_run_copy(trained, tmp_path):
    return run_copy(trained, "xsum_tiny", tmp_path / "xsum_run")


@pytest.mark.slow
def test_eval_of_another_tasks_run_says_so_and_goes_on(xsum_run_copy, tmp_path, cli):
    agnews = ROOT / "recipes" / "tiny" / "agnews_tiny.yaml"  # the same tiny base model, another task
    result = cli("eval", agnews, "--run", xsum_run_copy, "data.test_samples=4", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {xsum_run_copy} was trained with the recipe 'xsum_tiny'; using it with 'agnews_tiny' "
                     "(its data, prompt and evaluators)"]
    assert list(xsum_run_copy.glob("eval-*/metrics.json"))


@pytest.mark.slow
@pytest.mark.parametrize("command", [["eval", "--run", "A"], ["compare", "--run", "A"],
                                     ["compare", "--run", "A", "--run", "B"], ["generate", "--run", "A", "--input", "IN"],
                                     ["export", "--run", "A", "--out", "OUT"]])
def test_a_run_trained_on_another_base_model_is_refused(xsum_run_copy, tmp_path, cli, command):
    shutil.copytree(xsum_run_copy, tmp_path / "B")
    (tmp_path / "in.txt").write_text("The council approved a budget for new schools.\n")
    runs = {"A": str(xsum_run_copy), "B": str(tmp_path / "B"), "IN": str(tmp_path / "in.txt"),
            "OUT": str(tmp_path / "exported")}
    other = tmp_path / "other-model"
    result = cli(command[0], TINY_XSUM, *(runs.get(a, a) for a in command[1:]), f"model.name_or_path={other}",
                 f"output_dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().startswith(f"error: --run: {xsum_run_copy} was trained on ")
    assert f"not the recipe's {other} (bnb_4bit) (an adapter fits its own base model only: give the recipe it was " \
           f"trained with, {xsum_run_copy / 'recipe.yaml'})" in result.stderr
    assert not list(tmp_path.rglob("eval-*")) and not list(tmp_path.rglob("compare-*"))
    assert not (tmp_path / "exported").exists()
