"""``runner sweep RECIPE key=v1,v2 ... [--seeds N]``: a grid of settings x training seeds, each cell a normal run.

Every cell is trained, evaluated and reported by ``runner train``'s own command, in this process, into its own
output folder ``<output_dir>/<name>/sweeps/<sweep>/<cell>/`` (cell_names: ``r-8_learning_rate-0.001_seed-42``), so
``training.resume: auto`` and the run folder
layout work as for any run. A cell whose finished run (adapter, metrics.json, report.md) was made from exactly the
cell's resolved recipe is not trained again: repeating the command resumes an interrupted sweep, or just rewrites
the summary. All cells pin ``data.seed`` to the recipe's sample seed, so every training seed sees the same train,
eval and test examples and the seeds differ only in training randomness (LoRA init, data order, dropout, sampling).

Before anything trains, every cell's recipe is validated and checked against the model's config, and the plan
(profile, micro-batch, predicted peak GPU memory and training time) of every setting is printed.

The summary (``sweep.md``, ``sweep.json``, ``sweep.png``, runner.cli.sweep_summary): one row per setting with the
mean over seeds of each metric, the spread across seeds and the test-example uncertainty; every setting against
the best mean on the primary metric, a winner named only beyond both seed and test-example noise, and degenerate
runs marked.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from runner.cli import recipes, sweep_summary
from runner.common.errors import RecipeError
from runner.recipe.validation import schema
from runner.store import runs

# ---------------------------------------------------------------- the grid

# A sweep trains every cell: counts past these are typos (an extra digit, a pasted column), refused before any
# recipe is resolved, rather than a machine busy for hours or out of memory building the grid.
MAX_SEEDS, MAX_CELLS = 100, 1000


def split_values(text: str) -> list[str]:
    """``8,16`` -> ["8", "16"]; commas inside [...], {...} or quotes belong to one value
    (``[q_proj,v_proj],all-linear`` is two values)."""
    parts, current, depth, quote = [], "", 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    return [*parts, current.strip()]


def parse_grid(overrides: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(axes [(key, [value text, ...])], fixed overrides): an override with several comma-separated values is an
    axis of the grid; one with a single value applies to every cell."""
    axes, fixed, given = [], [], {}  # given: key -> "an axis" / "a fixed override", as first given
    for text in overrides:
        if "=" not in text:
            raise RecipeError(text, "an override must look like key.path=value", "an axis: key.path=v1,v2")
        key, _, value = text.partition("=")
        key = key.strip()
        values = split_values(value)
        kind = "an axis" if len(values) > 1 else "a fixed override"
        if key in given:  # one of the two would be dropped silently: the last one given wins in a recipe
            raise RecipeError(key, f"is given twice: as {given[key]}, then as {kind}",
                              "give each key once: key=v1,v2,... to sweep it, key=value to fix it")
        given[key] = kind
        if len(values) == 1:
            fixed.append(text)
            continue
        if key == "seed":
            raise RecipeError("seed", "is swept with --seeds N, not as an axis", "e.g. runner sweep R lora.r=8,16 --seeds 3")
        if "" in values or len(set(values)) < len(values):
            raise RecipeError(key, f"has an empty or repeated value in {value!r}", "list each value once: key=v1,v2")
        axes.append((key, values))
    return axes, fixed


def check_name(name: str | None) -> None:
    """``--name`` is one folder under ``<output_dir>/<name>/sweeps/``, spelled as a recipe's ``name`` must be
    (the schema's pattern): no ``..``, no ``/``, no absolute path that would put the sweep elsewhere."""
    pattern = schema()["properties"]["name"]["pattern"]
    if name is not None and not re.fullmatch(pattern, name):
        raise RecipeError("--name", f"{name[:60]!r} is not a folder name", "one name of letters, digits, '.', '_' "
                          "and '-', starting with a letter or digit, e.g. --name lora-rank")


@dataclass
class Cell:
    setting: tuple[tuple[str, str], ...]  # (key, value text) per axis
    seed: int
    overrides: list[str]
    recipe: dict

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.setting) or "(recipe as written)"


def _slug(text: str, limit: int = 90) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
    if len(slug) > limit:
        slug = slug[:limit - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return slug


def cell_names(grid: list[tuple[tuple, int]]) -> list[str]:
    """A folder name per (setting, seed): each axis's last key part and value, then the seed
    (``r-8_learning_rate-0.001_seed-42``), in letters, digits, '.', '_' and '-' only (no '=' for a shell or a path to
    trip on). A long value is cut (with a hash of it); two cells that would come out the same get a hash of their
    exact setting each."""
    names = ["_".join([*(f"{k.rsplit('.', 1)[-1]}-{_slug(v, 24) or 'x'}" for k, v in setting), f"seed-{seed}"])
             for setting, seed in grid]
    return [name if names.count(name) == 1 else f"{name}-{hashlib.sha1(repr(cell).encode()).hexdigest()[:8]}"
            for name, cell in zip(names, grid, strict=True)]


def sweep_folder(base: dict, axes, fixed, seeds: list[int], name: str | None) -> Path:
    """``<output_dir>/<name>/sweeps/<id>``: the same command finds the same folder again."""
    if name is None:
        spec = json.dumps({"axes": axes, "fixed": fixed, "seeds": seeds}, sort_keys=True)
        readable = "_".join(k.rsplit(".", 1)[-1] for k, _ in axes) or "seeds"
        name = _slug(f"{readable}_{len(seeds)}seeds", 60) + "-" + hashlib.sha1(spec.encode()).hexdigest()[:8]
    return Path(base["output_dir"]) / base["name"] / "sweeps" / name


def _check_local(recipe: dict) -> None:
    """What `runner validate` checks beyond the schema: the local files and folders a cell names, the local data's
    columns (a swept data.source or model path is found missing before any cell trains) and the early-stopping
    metric."""
    from runner.data import data
    from runner.model import families, model
    from runner.train import early

    model.check_local(recipe)
    families.check_targets(recipe)
    data.check_files(recipe)
    early.decider(recipe)


def cells(recipe_path, overrides: list[str], seeds: int, name: str | None = None) -> tuple[Path, list[Cell], list, list]:
    """(sweep folder, every cell with its resolved recipe, the axes, the fixed overrides). Any cell's recipe mistake
    is raised here, before anything trains, naming the cell."""
    axes, fixed = parse_grid(overrides)
    check_name(name)
    if not 1 <= seeds <= MAX_SEEDS:
        raise RecipeError("--seeds", f"{seeds:,} is out of range", f"from 1 to {MAX_SEEDS}")
    size = math.prod(len(values) for _, values in axes) * seeds
    if size > MAX_CELLS:
        counts = " x ".join([*(f"{len(v):,} ({k})" for k, v in axes), f"{seeds} seed(s)"])
        raise RecipeError("sweep", f"{counts} is {size:,} cells, more than {MAX_CELLS:,}",
                          "sweep fewer values or seeds at a time; each cell is a training run")
    if not axes and seeds < 2:
        raise RecipeError("sweep", "nothing to sweep", "give key.path=v1,v2,... and/or --seeds N with N >= 2")
    base = recipes.load(recipe_path, fixed)
    seed_list = [base["seed"] + i for i in range(seeds)]
    data_seed = base["data"]["seed"] if base["data"]["seed"] is not None else base["seed"]
    folder = sweep_folder(base, axes, fixed, seed_list, name)
    out = []
    grid = [(tuple(zip((k for k, _ in axes), values, strict=True)), seed)
            for values in itertools.product(*(vals for _, vals in axes)) for seed in seed_list]
    for (setting, seed), cell_name in zip(grid, cell_names(grid), strict=True):
        cell_overrides = [*fixed, *(f"{k}={v}" for k, v in setting), f"seed={seed}", f"data.seed={data_seed}",
                          f"output_dir={folder / cell_name}"]
        cell = Cell(setting, seed, cell_overrides, {})
        try:
            cell.recipe = recipes.load(recipe_path, cell_overrides)
            _check_local(cell.recipe)
        except RecipeError as exc:
            raise RecipeError(exc.key_path, f"{exc.problem} (in the cell {cell.label})", exc.hint) from None
        out.append(cell)
    return folder, out, axes, fixed


def finished_run(cell: Cell) -> Path | None:
    """The cell's newest run that finished (adapter, metrics.json, report.md) from exactly its resolved recipe."""
    root = Path(cell.recipe["output_dir"]) / cell.recipe["name"]
    if not root.is_dir():
        return None
    for run_dir in sorted((p for p in root.iterdir() if p.is_dir()), reverse=True):
        done = all((run_dir / f).is_file() for f in ("adapter/adapter_config.json", "metrics.json", "report.md",
                                                       "recipe.yaml"))
        if done and runs.saved_recipe(run_dir) == cell.recipe:
            return run_dir
    return None


def check_metric(metric: str | None, grid: dict[tuple, list[Cell]]) -> None:
    """``--metric`` against the metrics every setting's evaluators declare, before anything trains; a setting with
    a user's evaluator that declares none is checked on its finished runs (summarize)."""
    from runner.evaluate import evaluate as evaluate_mod

    if metric is None:
        return
    for group in grid.values():
        names = evaluate_mod.metric_names(group[0].recipe)
        if names is not None and metric not in names:
            raise sweep_summary.unknown_metric(metric, names)


# ---------------------------------------------------------------- plan and run


def settings(all_cells: list[Cell]) -> dict[tuple, list[Cell]]:
    out: dict[tuple, list[Cell]] = {}
    for cell in all_cells:
        out.setdefault(cell.setting, []).append(cell)
    return out


def plan_setting(recipe: dict, card_gb: float | None, card: tuple[str, str] | None) -> dict:
    """Config-only checks and the plan of one setting: the profile's choice, predicted peak memory and time (on
    ``card``; None: no GPU here, no time predicted)."""
    from runner.model import model as model_mod
    from runner.speed import memory, profiles, throughput

    meta = model_mod.check(recipe)
    info = memory.model_info(recipe, meta.config)
    speed = profiles.resolve(recipe, meta.config, card_gb, detect=False, info=info)
    predicted = speed.predicted_gb or memory.estimate(recipe, meta.config, speed, info).reserved_gb
    seconds = throughput.predict_seconds(recipe, card[0], speed.profile, info["total"]) if card else None
    return {"profile": speed.profile, "micro_batch": f"{speed.micro_batch_size} x {speed.gradient_accumulation_steps}",
            "checkpointing": speed.gradient_checkpointing, "peak_reserved_gb": round(predicted, 2),
            "card": throughput.CARDS[card[0]]["name"] if card else None, "card_why": card[1] if card else None,
            "train_seconds": None if seconds is None else round(seconds, 1)}


def plan_lines(plans: dict[tuple, dict], grid: dict[tuple, list[Cell]]) -> list[str]:
    from runner.speed import throughput

    first = next(iter(plans.values()))
    timed = first["card"] is not None
    lines = [f"plan per setting (peak GPU memory from the config; time on {first['card']}, {first['card_why']}):"
             if timed else f"plan per setting (peak GPU memory from the config; {throughput.NOT_PREDICTED}):"]
    for setting, p in plans.items():
        label = grid[setting][0].label
        lines.append(f"  {label}: profile {p['profile']}, micro-batch {p['micro_batch']}, "
                     f"{'checkpointing' if p['checkpointing'] else 'no checkpointing'}, predicted peak "
                     f"{p['peak_reserved_gb']:.2f} GiB"
                     + (f", training {throughput.duration(p['train_seconds'])} per seed" if timed else ""))
    return lines


def run_cell(recipe_path, cell: Cell) -> Path:
    """Train, evaluate and report the cell with `runner train`'s own code (runner.cli.pipeline), in this process (under
    a launcher, every rank takes part and rank 0 writes the records, as for `runner train`)."""
    # A fresh recipe, as `runner train` would load it: the cell's own stays as planned, for comparing with its run.
    from runner.cli import pipeline
    from runner.common import dist
    pipeline.train_evaluate_report(recipes.load(recipe_path, cell.overrides), recipe_path)
    dist.barrier()  # rank 0 writes the report after the other ranks are done
    gc.collect()  # the cell's model and trainer are garbage now: free them before the next cell loads its own
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    run_dir = dist.broadcast(finished_run(cell) if dist.world().main else None)
    if run_dir is None:
        raise RuntimeError(f"the cell {cell.label}, seed {cell.seed} trained but left no finished run folder")
    return run_dir


# ---------------------------------------------------------------- the command


def sweep(recipe_path, overrides: list[str], seeds: int = 1, name: str | None = None, metric: str | None = None,
          card_name: str | None = None, card_gb: float | None = None, dry_run: bool = False) -> Path | None:
    from runner.common import dist
    from runner.speed import throughput

    folder, all_cells, axes, fixed = cells(recipe_path, overrides, seeds, name)
    main = dist.init().main  # under a launcher every rank trains each cell; rank 0 alone decides and writes
    grid = settings(all_cells)
    check_metric(metric, grid)
    card = throughput.find_card(card_name, throughput.gpu_name())
    if card_gb is None and card_name is not None:
        card_gb = throughput.CARDS[card[0]]["memory_gb"]
    elif card_gb is None:
        from runner.speed import profiles

        card_gb = profiles.gpu_memory_gb()
    plans = {}
    for setting, group in grid.items():
        try:
            plans[setting] = plan_setting(group[0].recipe, card_gb, card)
        except RecipeError as exc:  # the model's config rejects this setting (or the hub is out of reach): say which
            raise type(exc)(exc.key_path, f"{exc.problem} (in the cell {group[0].label})", exc.hint) from None
    if main:
        print(f"sweep folder: {folder}\n{len(grid)} setting(s) x {seeds} seed(s) = {len(all_cells)} cells", flush=True)
        print("\n".join(plan_lines(plans, grid)), flush=True)
    if dry_run:
        return None
    run_dirs = {}
    for i, cell in enumerate(all_cells, 1):
        where = f"cell {i}/{len(all_cells)} [{cell.label}, seed={cell.seed}]"
        done = dist.broadcast(finished_run(cell) if main else None)
        if main:
            print(f"{where}: {'training' if done is None else f'finished already: {done}'}", flush=True)
        if done is not None:
            run_dirs[id(cell)] = done
            continue
        run_dirs[id(cell)] = run_cell(recipe_path, cell)
    if not main:
        return None
    summary = sweep_summary.summarize(folder, grid, run_dirs, plans, metric, axes, fixed)
    path = sweep_summary.write(summary, folder)
    for line in sweep_summary.summary_lines(summary):
        print(line)
    return path

