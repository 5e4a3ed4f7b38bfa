"""`runner sweep`: the grid, its statistics (seed noise apart from test-example noise) on hand-made runs, and a real
2 x 2 sweep with 2 seeds of the tiny AG News twin through the CLI (a few optimizer steps per cell)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from runner.cli import sweep, sweep_summary
from runner.common.errors import RecipeError
from tests.conftest import ROOT, ahead, run_cli

AGNEWS = ROOT / "recipes" / "tiny" / "agnews_tiny.yaml"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]

# ---------------------------------------------------------------- the grid


def test_values_split_at_top_level_commas_only():
    assert sweep.split_values("8,16, 32") == ["8", "16", "32"]
    assert sweep.split_values("[q_proj,v_proj],all-linear") == ["[q_proj,v_proj]", "all-linear"]
    assert sweep.split_values("{a: 1, b: 2}") == ["{a: 1, b: 2}"]
    assert sweep.split_values("'a, b',c") == ["'a, b'", "c"]
    axes, fixed = sweep.parse_grid(["lora.r=8,16", "training.max_steps=5", "lora.target_modules=[q_proj,v_proj]"])
    assert axes == [("lora.r", ["8", "16"])]
    assert fixed == ["training.max_steps=5", "lora.target_modules=[q_proj,v_proj]"]


def test_cells_pin_the_data_seed_and_get_their_own_output_folder(tiny, tmp_path):
    folder, cells, axes, _ = sweep.cells(AGNEWS, ["lora.r=4,8", f"output_dir={tmp_path}", "seed=7"], seeds=3)
    assert folder.parent == tmp_path / "agnews_tiny" / "sweeps"
    assert [(c.setting, c.seed) for c in cells] == [((("lora.r", v),), s) for v in ("4", "8") for s in (7, 8, 9)]
    assert {c.recipe["data"]["seed"] for c in cells} == {7}  # every training seed sees the same examples
    assert [c.recipe["lora"]["r"] for c in cells] == [4, 4, 4, 8, 8, 8]
    outs = {c.recipe["output_dir"] for c in cells}
    assert len(outs) == 6 and all(Path(o).parent == folder for o in outs)
    # safe, short folder names: no '=', the setting and the seed readable
    assert sorted(Path(o).name for o in outs) == [f"r-{r}_seed-{s}" for r in (4, 8) for s in (7, 8, 9)]
    again, _, _, _ = sweep.cells(AGNEWS, ["lora.r=4,8", f"output_dir={tmp_path}", "seed=7"], seeds=3)
    assert again == folder  # the same command finds the same sweep


def test_cell_names_are_safe_short_and_never_shared():
    names = sweep.cell_names([((("lora.r", "8"), ("training.learning_rate", "2e-4")), 42),
                              ((("lora.target_modules", "[q_proj,v_proj]"),), 1),
                              ((("lora.target_modules", "[q_proj, v_proj]"),), 1),  # the same once made safe
                              ((("data.source", "/a/" + "b" * 200 + ".jsonl"),), 1)])
    assert names[0] == "r-8_learning_rate-2e-4_seed-42"
    assert names[1].startswith("target_modules-q_proj-v_proj_seed-1-") and names[1] != names[2]
    assert names[3].endswith("_seed-1") and len(names[3]) < 60
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)


def test_data_seed_pins_the_samples_while_the_seed_changes(tiny):
    from runner.cli import recipes
    from runner.data import data as data_mod

    def test_ids(*overrides):
        recipe = recipes.load(AGNEWS, ["data.test_samples=20", *overrides])
        return data_mod.sample(data_mod.load_raw(recipe), recipe)["test"]["id"]

    assert test_ids("seed=1", "data.seed=5") == test_ids("seed=2", "data.seed=5") == test_ids("seed=5")
    assert test_ids("seed=1") != test_ids("seed=2")


@pytest.mark.parametrize("args,seeds,where", [
    (["training.max_steps=5"], 1, "error: sweep: nothing to sweep"),
    (["seed=1,2"], 1, "error: seed: is swept with --seeds N"),
    (["lora.r=8,8"], 1, "error: lora.r: has an empty or repeated value"),
    (["lora.r=0,8"], 2, "error: lora.r: 0 is out of range (in the cell lora.r=0)"),
    (["lora.r=4,8", "lora.r=16"], 1, "error: lora.r: is given twice: as an axis, then as a fixed override (give"),
    (["lora.r=16", "lora.r=4,8"], 1, "error: lora.r: is given twice: as a fixed override, then as an axis"),
    (["lora.r=4,8", "training.max_steps=2", "training.max_steps=3"], 1, "error: training.max_steps: is given twice"),
    (["lora.r=4,8", "lora.r=16,32"], 1, "error: lora.r: is given twice: as an axis, then as an axis"),
    (["lora.r=4,8", "data.source=./nope.jsonl"], 1, "error: data.source: file not found: "),
    (["lora.r=4,8", "model.name_or_path=./nope"], 1, "error: model.name_or_path: local folder not found: "),
])
def test_grid_mistakes_fail_before_anything_trains(tiny, tmp_path, args, seeds, where):
    with pytest.raises(RecipeError) as err:
        sweep.cells(AGNEWS, [*args, f"output_dir={tmp_path}"], seeds=seeds)
    assert err.value.line().startswith(where)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["../x", "/tmp/t/abs", "a/b", ".hidden", ""])
def test_a_sweep_name_that_is_no_folder_name_is_refused(tiny, tmp_path, name):
    from tests.test_hostile import one_line, run_main

    code, out, err = run_main("sweep", AGNEWS, "lora.r=4,8", "--name", name, "--dry-run", f"output_dir={tmp_path}")
    assert code == 2 and one_line(err).startswith(f"error: --name: {name!r} is not a folder name (one name of")
    assert "sweep folder" not in out and not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_metric_the_evaluators_do_not_have_fails_before_any_cell_trains(tiny, tmp_path, cli, dry_run):
    result = cli("sweep", AGNEWS, "lora.r=4,8", "--metric", "rogue", "training.max_steps=2", f"output_dir={tmp_path}",
                 *dry_run)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --metric: 'rogue' is not a metric of these runs (one of: classification.accuracy, "
        "classification.macro_f1, classification.invalid, classification.invalid_rate)")
    assert "sweep folder" not in result.stdout and not any(tmp_path.iterdir())  # no cell planned or trained


@pytest.mark.slow
def test_dry_run_plans_every_setting_and_a_config_mistake_names_its_cell(tiny, tmp_path, cli):
    result = cli("sweep", AGNEWS, "lora.r=4,8", "--seeds", "2", f"output_dir={tmp_path}", "--dry-run", "--card", "H200")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 setting(s) x 2 seed(s) = 4 cells" in result.stdout and "time on NVIDIA H200, named" in result.stdout
    assert [line.split(":")[0].strip() for line in result.stdout.splitlines() if "predicted peak" in line] == [
        "lora.r=4", "lora.r=8"]
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
    bad = cli("sweep", AGNEWS, "lora.target_modules=[q_proj,o_proj],all-linear", f"output_dir={tmp_path}")
    assert bad.returncode == 2 and bad.stderr.strip().startswith(
        "error: lora.target_modules[1]: Phi-2 (phi) has no linear module 'o_proj' (in the cell "
        "lora.target_modules=[q_proj,o_proj])")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the statistics, on hand-made runs


def fake_run(folder: Path, cell, correct: np.ndarray) -> Path:
    """A finished-looking run whose predictions are right exactly where ``correct`` is."""
    run = folder / "run"
    (run / "adapter").mkdir(parents=True)
    gold = [LABELS[i % 4] for i in range(len(correct))]
    with open(run / "predictions.jsonl", "w") as f:
        for i, (g, ok) in enumerate(zip(gold, correct, strict=True)):
            pred = g if ok else LABELS[(LABELS.index(g) + 1) % 4]
            f.write(json.dumps({"index": i, "id": str(i), "prompt": f"p{i}", "reference": g, "prediction": pred}) + "\n")
    acc = float(np.mean(correct))
    (run / "metrics.json").write_text(json.dumps({"split": "test", "examples": len(correct), "classification": {
        "accuracy": acc, "accuracy_ci95": [acc - 0.1, acc + 0.1]}}))
    (run / "env.json").write_text(json.dumps({"train_seconds": 10.0 + cell.seed}))
    return run


def summarize(tiny, tmp_path, scores: dict[str, list[np.ndarray]]):
    """Summarize a 1-axis sweep of lora.r whose runs are right where ``scores[r][seed]`` says."""
    folder, cells, axes, fixed = sweep.cells(AGNEWS, [f"lora.r={','.join(scores)}", f"output_dir={tmp_path}",
                                                      "evaluation.evaluators=[{name: classification}]"],
                                             seeds=len(next(iter(scores.values()))))
    grid = sweep.settings(cells)
    run_dirs = {}
    for setting, group in grid.items():
        for cell, correct in zip(group, scores[setting[0][1]], strict=True):
            run_dirs[id(cell)] = fake_run(tmp_path / f"{setting[0][1]}-{cell.seed}", cell, correct)
    return sweep_summary.summarize(folder, grid, run_dirs, {}, None, axes, fixed)


def test_a_clear_gain_exceeds_both_seed_and_test_noise(tiny, tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    weak = [rng.random(n) < p for p in (0.40, 0.42, 0.41)]
    strong = [rng.random(n) < p for p in (0.80, 0.81, 0.79)]
    summary = summarize(tiny, tmp_path, {"4": weak, "8": strong})
    assert summary["primary_metric"] == "classification.accuracy" and summary["best"] == "lora.r=8"
    row = summary["settings"][0]["metrics"]["classification.accuracy"]
    values = [float(np.mean(w)) for w in weak]
    assert row["values"] == values and row["mean"] == pytest.approx(np.mean(values))
    assert row["sd"] == pytest.approx(np.std(values, ddof=1))
    (c,) = summary["comparisons"]
    assert c["setting"] == "lora.r=4" and c["difference"] == pytest.approx(np.mean(values) - np.mean(
        [np.mean(s) for s in strong]))
    assert c["beyond_seed_noise"] and c["beyond_test_noise"] and c["real"]


def test_seed_noise_hides_a_difference_the_test_set_alone_would_call_real(tiny, tmp_path):
    """The same examples for every seed: a fixed gain on a few examples passes the paired test over examples, but
    the seeds disagree wildly, so the sweep does not call it real."""
    n = 200
    base = np.zeros(n, dtype=bool)
    seeds_a = [base.copy() for _ in range(3)]
    for run, k in zip(seeds_a, (20, 100, 60), strict=True):
        run[:k] = True
    seeds_b = [run.copy() for run in seeds_a]
    for run in seeds_b:
        run[150:165] = True  # 15 more examples right in every seed of setting 8
    summary = summarize(tiny, tmp_path, {"4": seeds_a, "8": seeds_b})
    (c,) = summary["comparisons"]
    assert c["beyond_test_noise"] is True and c["beyond_seed_noise"] is False and c["real"] is False
    md = sweep_summary.markdown(summary)
    assert "no: within seed noise" in md and "| lora.r=4 | -0.075 |" in md


def evaluated_sweep(tmp_path, predictions: dict[str, list[list[str]]], evaluators: str, baseline: list[str] | None = None,
                    primary: str | None = None) -> dict:
    """Summarize a 1-axis sweep of lora.r whose runs predicted ``predictions[r][seed]`` for the gold labels
    LABELS[i % 4], scored by the cell recipe's own evaluators as evaluation scores them (metrics.json with their
    declarations); ``baseline``: the predictions of a trivial baseline every run gets in baselines.json."""
    from runner.evaluate import baselines as baselines_mod
    from runner.evaluate import evaluate as evaluate_mod
    from runner.evaluate.metrics import DECLARED, declared_by

    folder, cells, axes, fixed = sweep.cells(AGNEWS, [f"lora.r={','.join(predictions)}", f"output_dir={tmp_path}",
                                                      f"evaluation.evaluators={evaluators}"],
                                             seeds=len(next(iter(predictions.values()))))
    grid = sweep.settings(cells)

    def scored(recipe, folder: Path, predicted: list[str]) -> dict:
        folder.mkdir(parents=True)
        with open(folder / "predictions.jsonl", "w") as f:
            for i, pred in enumerate(predicted):
                f.write(json.dumps({"index": i, "id": str(i), "prompt": f"p{i}", "reference": LABELS[i % 4],
                                    "prediction": pred}) + "\n")
        records = evaluate_mod.read_records(folder / "predictions.jsonl")
        built = evaluate_mod.build_evaluators(recipe)
        metrics = {"split": "test", "examples": len(records), **{n: e.evaluate(records, folder) for n, e in built},
                   DECLARED: declared_by(built)}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    run_dirs = {}
    for setting, group in grid.items():
        for cell, predicted in zip(group, predictions[setting[0][1]], strict=True):
            run = tmp_path / f"{setting[0][1]}-{cell.seed}"
            scored(cell.recipe, run, predicted)
            (run / "env.json").write_text(json.dumps({"train_seconds": 10.0}))
            if baseline is not None:
                result = {"examples": len(baseline), "skipped": [], "baselines": {"majority class": {
                    "metrics": scored(cell.recipe, run / "baselines" / "majority_class", baseline)}}}
                (run / "baselines.json").write_text(json.dumps(result))
            run_dirs[id(cell)] = run
    assert baselines_mod  # runs are marked degenerate by runner.evaluate.baselines.degenerate
    return sweep_summary.summarize(folder, grid, run_dirs, {}, primary, axes, fixed)


CLASSIFICATION = "{name: classification, labels: [World, Sports, Business, Sci/Tech], confusion_matrix: false}"
USER = f"[{{name: 'tests.userevals:ErrorRate'}}, {CLASSIFICATION}]"


def right_where(correct) -> list[str]:
    return [LABELS[i % 4] if ok else LABELS[(i + 1) % 4] for i, ok in enumerate(correct)]


def test_a_users_lower_is_better_metric_ranks_by_its_declaration(tiny, tmp_path):
    """The user's error_rate is declared lower-is-better (its name says nothing of it) and is the primary metric
    (its evaluator comes first and names it its headline): the setting with the lower error rate is the best. A
    guess from the name would have named the other."""
    rng = np.random.default_rng(0)
    n = 200
    weak = [right_where(rng.random(n) < p) for p in (0.40, 0.42, 0.41)]
    strong = [right_where(rng.random(n) < p) for p in (0.80, 0.81, 0.79)]
    summary = evaluated_sweep(tmp_path, {"4": weak, "8": strong}, USER)
    metric = "tests.userevals:ErrorRate.error_rate"
    assert summary["primary_metric"] == metric
    rows = {row["label"]: row["metrics"][metric] for row in summary["settings"]}
    assert rows["lora.r=8"]["mean"] < rows["lora.r=4"]["mean"] and rows["lora.r=8"]["better"] == "lower"
    assert summary["best"] == summary["leader"] == "lora.r=8" and summary["no_winner"] is None
    (c,) = summary["comparisons"]
    assert c["setting"] == "lora.r=4" and c["difference"] > 0 and c["real"]
    # its higher-is-better twin, named like a loss, picks the same setting
    again = evaluated_sweep(tmp_path / "again", {"4": weak, "8": strong}, USER,
                            primary="tests.userevals:ErrorRate.loss_free")
    assert again["best"] == "lora.r=8"


def test_constant_predictions_are_degenerate_and_name_no_winner(tiny, tmp_path):
    """The README's sweep after too few steps: every seed of every setting predicts one label, the scores tie
    exactly at the majority class's (0.25 ± 0). Every run is marked degenerate and no setting is named the best."""
    constant = ["World"] * 40
    summary = evaluated_sweep(tmp_path, {"4": [constant] * 2, "8": [constant] * 2},
                              f"[{CLASSIFICATION}]",
                              baseline=constant)
    assert summary["best"] is None and summary["leader"] == "lora.r=4"
    assert "degenerate" in summary["no_winner"]
    for row in summary["settings"]:
        assert row["degenerate_runs"] == 2 and row["metrics"]["classification.accuracy"]["values"] == [0.25, 0.25]
        for run in row["runs"]:
            assert run["degenerate"] == ["all 40 predictions are the same: `World`",
                                         "classification.accuracy 0.25 is no better than the majority class "
                                         "baseline's 0.25"]
    md = sweep_summary.markdown(summary)
    assert "## No best setting on classification.accuracy" in md and "## Against the best setting" not in md
    assert "## Degenerate runs" in md and "- lora.r=8, seed 43: all 40 predictions are the same: `World`" in md
    (row,) = [line for line in md.splitlines() if line.startswith("| lora.r=4 | 0.25 ± 0 ")]
    assert row.endswith(" | 2 of 2 |")  # the degenerate runs column
    lines = sweep_summary.summary_lines(summary)
    assert lines[0].startswith("lora.r=4: classification.accuracy 0.25 ± 0") and "degenerate in 2 of 2" in lines[0]
    assert any(line.startswith("no winner: ") for line in lines) and not any(line.startswith("best:") for line in lines)


def test_an_exact_tie_names_no_winner(tiny, tmp_path):
    """Two settings whose seeds predict exactly alike (and not constantly): the same means, no difference beyond
    any noise, so neither is named the best."""
    rng = np.random.default_rng(1)
    seeds = [right_where(rng.random(60) < p) for p in (0.6, 0.7)]
    summary = evaluated_sweep(tmp_path, {"4": seeds, "8": seeds}, USER)
    assert summary["best"] is None and "not beyond the noise" in summary["no_winner"]
    assert all(row["degenerate_runs"] == 0 for row in summary["settings"])
    (c,) = summary["comparisons"]
    assert c["difference"] == 0 and not c["real"]


def test_a_metric_whose_direction_is_not_declared_ranks_nothing(tiny, tmp_path):
    rng = np.random.default_rng(2)
    summary = evaluated_sweep(tmp_path, {"4": [right_where(rng.random(40) < 0.3)] * 2,
                                         "8": [right_where(rng.random(40) < 0.9)] * 2},
                              "[{name: 'tests.userevals:Undeclared'}, {name: classification, confusion_matrix: false}]")
    assert summary["primary_metric"] == "tests.userevals:Undeclared.score"
    assert summary["best"] is None and summary["comparisons"] == [] and "declares no direction" in summary["no_winner"]


def test_without_a_gpu_the_sweep_plan_predicts_no_time(tiny, tmp_path):
    """No GPU, no card named: memory is predicted (for a GPU), time is not; sweep.md keeps no H100 time either."""
    from runner.speed import throughput

    folder, cells, axes, fixed = sweep.cells(AGNEWS, ["lora.r=4,8", f"output_dir={tmp_path}",
                                                      "evaluation.evaluators=[{name: classification}]"], seeds=1)
    grid = sweep.settings(cells)
    plans = {setting: sweep.plan_setting(group[0].recipe, None, None) for setting, group in grid.items()}
    assert all(p["card"] is None and p["train_seconds"] is None for p in plans.values())
    lines = sweep.plan_lines(plans, grid)
    assert lines[0] == f"plan per setting (peak GPU memory from the config; {throughput.NOT_PREDICTED}):"
    assert all("predicted peak" in line and "per seed" not in line for line in lines[1:])
    run_dirs = {id(c): fake_run(tmp_path / f"run{i}", c, np.arange(20) % 2 == 0) for i, c in enumerate(cells)}
    md = sweep_summary.markdown(sweep_summary.summarize(folder, grid, run_dirs, plans, None, axes, fixed))
    assert "Predicted training time" not in md and "H100" not in md and "| lora.r=4 |" in md


# ---------------------------------------------------------------- a real sweep through the CLI


# 3 optimizer steps of 16 examples, no eval split, 24 test examples ranked (one forward pass per batch): each of
# the 8 cells is mostly model loading.
ARGS = ("sweep", AGNEWS, "lora.r=4,8", "training.learning_rate=0.001,0.003", "--seeds", "2", "training.max_steps=3",
        "data.train_samples=96", "data.splits.eval=null", "training.eval_every=null", "data.test_samples=24",
        "generation.mode=rank")


@ahead("sweep")
def _sweep(out: Path, lane):
    return run_cli(*ARGS, f"output_dir={out}", lane=lane)


@pytest.fixture(scope="module")
def swept(background):
    out, result = background("sweep")
    assert result.returncode == 0, result.stderr[-4000:]
    (folder,) = (out / "agnews_tiny" / "sweeps").iterdir()
    return out, folder, result


@pytest.mark.slow
def test_the_sweep_table_matches_the_run_folders(swept):
    _, folder, result = swept
    summary = json.loads((folder / "sweep.json").read_text())
    assert [r["label"] for r in summary["settings"]] == [
        f"lora.r={r}, training.learning_rate={lr}" for r in (4, 8) for lr in ("0.001", "0.003")]
    assert summary["seeds"] == [42, 43] and summary["examples"] == 24 and summary["same_examples"]
    examples = None
    for row in summary["settings"]:
        assert [run["seed"] for run in row["runs"]] == [42, 43]
        values = []
        for run in row["runs"]:
            run_dir = Path(run["run"])
            recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
            assert recipe["seed"] == run["seed"] and recipe["data"]["seed"] == 42
            assert str(recipe["lora"]["r"]) == row["setting"]["lora.r"]
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert run["metrics"]["classification.accuracy"] == metrics["classification"]["accuracy"]
            env = json.loads((run_dir / "env.json").read_text())
            assert run["train_seconds"] == env["train_seconds"] and env["global_step"] == 3
            values.append(metrics["classification"]["accuracy"])
            seen = [(r["index"], r["reference"]) for r in map(json.loads, (run_dir / "predictions.jsonl").open())]
            examples = examples or seen
            assert seen == examples  # every cell evaluated the same test examples
            assert "## Baselines" in (run_dir / "report.md").read_text()  # every run's report has them
        entry = row["metrics"]["classification.accuracy"]
        assert entry["values"] == values and entry["mean"] == pytest.approx(np.mean(values))
        assert entry["sd"] == pytest.approx(np.std(values, ddof=1))
    assert len(summary["comparisons"]) == 3
    md = (folder / "sweep.md").read_text()
    for row in summary["settings"]:
        assert f"| {row['label']} | {row['metrics']['classification.accuracy']['mean']:.4g} ± " in md
    assert "beyond both?" in md and "majority class" in md and "smallest difference" in md
    assert (folder / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stdout.count(": training") == 8 and "plan per setting" in result.stdout


@pytest.mark.slow
def test_the_sweep_marks_degenerate_runs_and_names_no_winner_within_noise(swept):
    """Three optimizer steps leave the cells near chance, many predicting one label (README's sweep example): each
    run is marked degenerate exactly when its predictions are constant or its accuracy is no better than a trivial
    baseline's (its report.md says so too), and a best setting is named only beyond both noises."""
    _, folder, result = swept
    summary = json.loads((folder / "sweep.json").read_text())
    for row in summary["settings"]:
        for run in row["runs"]:
            run_dir = Path(run["run"])
            predicted = {json.loads(line)["prediction"] for line in (run_dir / "predictions.jsonl").open()}
            accuracy = run["metrics"]["classification.accuracy"]
            scored = json.loads((run_dir / "baselines.json").read_text())["baselines"]
            beaten_by = [n for n, b in scored.items() if accuracy <= b["metrics"]["classification"]["accuracy"]]
            assert bool(run["degenerate"]) == (len(predicted) == 1 or bool(beaten_by)), run
            assert ("**Degenerate run**" in (run_dir / "report.md").read_text()) == bool(run["degenerate"])
        assert row["degenerate_runs"] == sum(bool(run["degenerate"]) for run in row["runs"])
    assert any(run["degenerate"] for row in summary["settings"] for run in row["runs"])
    leader = next(row for row in summary["settings"] if row["label"] == summary["leader"])
    clear = all(c["real"] for c in summary["comparisons"]) and not leader["degenerate_runs"]
    assert summary["best"] == (summary["leader"] if clear else None)
    md = (folder / "sweep.md").read_text()
    assert "## Degenerate runs" in md
    if summary["best"] is None:
        assert "## No best setting on classification.accuracy" in md and "no winner: " in result.stdout


@pytest.mark.slow
def test_repeating_the_sweep_trains_nothing(swept):
    out, folder, _ = swept
    runs_before = sorted(folder.glob("*/agnews_tiny/*"))
    table = json.loads((folder / "sweep.json").read_text())
    result = run_cli(*ARGS, f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("finished already") == 8 and ": training" not in result.stdout
    assert sorted(folder.glob("*/agnews_tiny/*")) == runs_before
    assert json.loads((folder / "sweep.json").read_text())["settings"] == table["settings"]


@pytest.mark.slow
def test_a_sweep_under_torchrun_trains_each_cell_once(tiny, tmp_path):
    """Two processes (gloo): every rank trains each cell together, one run folder per cell, rank 0 writes the
    summary; repeated, nothing trains."""
    from tests.e2e.test_distributed import launch, torchrun

    args = ("sweep", ROOT / "recipes" / "tiny" / "xsum_tiny.yaml", "lora.r=4,8", "training.max_steps=2",
            "data.train_samples=64", "data.splits.eval=null", "training.eval_every=null", "data.test_samples=8",
            "evaluation.evaluators=[{name: rouge}]", f"output_dir={tmp_path}")
    first = launch(torchrun(2), *args)
    assert first.returncode == 0, first.stderr[-4000:]
    (folder,) = (tmp_path / "xsum_tiny" / "sweeps").iterdir()
    summary = json.loads((folder / "sweep.json").read_text())
    assert [r["label"] for r in summary["settings"]] == ["lora.r=4", "lora.r=8"]
    runs = sorted(folder.glob("*/xsum_tiny/*"))
    assert len(runs) == 2 and all((r / "report.md").is_file() for r in runs)
    assert first.stdout.count(": training") == 2 and first.stdout.count("done: ") == 1 + 2
    again = launch(torchrun(2), *args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("finished already") == 2 and sorted(folder.glob("*/xsum_tiny/*")) == runs
