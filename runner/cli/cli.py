"""Command line: ``runner <command> RECIPE [key.path=value ...]``.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so ``validate`` and
``--help`` answer at once.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path

from runner.cli import arguments, outcome, recipes
from runner.common import cpu, dist
from runner.common.errors import RecipeError, classify


@functools.lru_cache(maxsize=1)  # built once per process: the fuzz tests call main() thousands of times (~4 ms each)
def _parser() -> argparse.ArgumentParser:
    parser = arguments.Parser(prog="runner", description="Declarative QLoRA recipe runner.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in recipes.RUN_COMMANDS:
            p.add_argument("recipe", metavar="RECIPE", nargs="?", default=None,
                           help="recipe YAML file (default with --run: the run's own recipe.yaml, as it trained)")
        else:
            p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", metavar="key.path=value",
                       help="override recipe keys, e.g. training.max_steps=5")
        add_args(p)
    return parser


def _recipe(args) -> dict:
    """The resolved recipe of RECIPE (or, left out, of the run given with --run) plus the overrides."""
    return recipes.for_command(args)


def _evaluation_examples(recipe: dict):
    """(tokenizer, the evaluation split's prepared examples), after the config-only checks."""
    from runner.data import data as data_mod
    from runner.data import prepared_cache
    from runner.evaluate import evaluate
    from runner.model import model

    _, tokenizer = model.preflight(recipe)
    role = recipe["evaluation"]["split"]
    examples = prepared_cache.prepared(recipe, tokenizer, (role,), data_mod.prepare).splits[role]
    evaluate.check_labels(recipe, {role: examples})
    return tokenizer, examples


def cmd_validate(args) -> int:
    from runner.recipe import recipe as recipe_mod

    start = time.perf_counter()
    recipe = _recipe(args)
    from runner.data import data
    from runner.model import families, model
    from runner.train import early, tracking

    tracking.check(recipe)
    early.decider(recipe)  # the early-stopping metric: the trainer's, or one an evaluator declares with a direction
    model.check_local(recipe)  # the files and folders the recipe names, read no further than their first lines
    family = families.check_targets(recipe)  # LoRA targets against the model family's linear modules, no torch
    data.check_files(recipe)
    if args.show:
        print(recipe_mod.dump(recipe), end="")
    from runner.model.lora import lora_text

    targets = lora_text(recipe["lora"])
    # With --print, stdout is the recipe alone (`> r.yaml` saves a recipe that loads again); the verdict goes aside.
    print(f"ok: {args.recipe} -> {recipe['name']}: {recipe['model']['name_or_path']}, "
          f"{recipe['quantization']['method']}, {targets}{f' ({family.title} family)' if family else ''} "
          f"({time.perf_counter() - start:.2f} s)",
          file=sys.stderr if args.show else sys.stdout)
    return 0


def cmd_train(args) -> int:
    recipe = _recipe(args)
    from runner.cli import pipeline

    pipeline.train_evaluate_report(recipe, args.recipe, evaluate_after=not args.no_eval)
    return 0


def cmd_inspect(args) -> int:
    recipe = _recipe(args)
    from runner.data import inspection
    from runner.model import model

    out_dir = inspection.check_out(Path(args.out)) if args.out else inspection.default_out_dir(recipe)
    result = inspection.analyze(recipe, model.load_tokenizer(recipe), use_cache=not args.no_cache)
    print(inspection.table(result))
    path = inspection.write(result, out_dir)
    print(f"\nsaved: {path} and length histograms in {path.parent}" + (" (from the cache)" if result["cached"] else ""))
    return 0


def cmd_eval(args) -> int:
    recipe = _recipe(args)
    from runner.common import dist
    from runner.evaluate import evaluate
    from runner.evaluate.metrics import summary_line
    from runner.model import model
    from runner.store import runs

    run_dir = None if args.base else _trained_run(recipe, args.run)
    world = dist.init()
    tokenizer, examples = _evaluation_examples(recipe)
    # Rank 0 opens (or reopens) the one evaluation folder; every rank writes its share of predictions there.
    out_dir = dist.broadcast(runs.open_eval_dir(recipe, Path(args.run) if args.run else None) if world.main else None)
    print(f"evaluation folder: {out_dir}", flush=True)
    net = model.load_for_inference(recipe, run_dir / "adapter" if run_dir else None)
    metrics = evaluate.evaluate(recipe, net, tokenizer, out_dir, examples=examples)
    if metrics is not None:
        print(summary_line(metrics))
        print(f"done: {out_dir}")
    return 0


def cmd_compare(args) -> int:
    recipe = _recipe(args)
    if len(args.run) > 2:
        raise RecipeError("--run", f"given {len(args.run)} times", "one run (vs the base model) or two (A vs B)")
    if len(args.run) == 2:
        return _compare_adapters(args, recipe)
    from runner.common import dist
    from runner.evaluate import compare
    from runner.model import model

    run_dir = _trained_run(recipe, args.run[0])
    world = dist.init()
    tokenizer, examples = _evaluation_examples(recipe)
    out_dir = dist.broadcast(compare.open_compare_dir(recipe, run_dir) if world.main else None)
    print(f"comparison folder: {out_dir}", flush=True)
    net = model.load_for_inference(recipe, run_dir / "adapter")
    summary = compare.compare(recipe, run_dir, net, tokenizer, examples, out_dir)
    if summary is not None:
        print("\n".join(compare.summary_lines(summary)))
        print(f"done: {out_dir / 'comparison.md'}")
    return 0


def cmd_sweep(args) -> int:
    from runner.cli import sweep

    _check_gpu_gb(args.gpu_gb)
    path = sweep.sweep(args.recipe, args.overrides, seeds=args.seeds, name=args.name, metric=args.metric,
                       card_name=args.card, card_gb=args.gpu_gb, dry_run=args.dry_run)
    if path is not None:
        print(f"done: {path}")
    return 0


def _trained_run(recipe: dict, run) -> Path:
    """The finished run folder ``run``, its adapter trained on the recipe's base model; a run of another recipe (task)
    on that base is used, with a note saying so."""
    from runner.store import runs

    run_dir = runs.find_run(run)
    note = runs.trained_with(recipe, run_dir)
    if note and dist.world().main:
        print(note, file=sys.stderr, flush=True)
    return run_dir


def _compare_adapters(args, recipe: dict) -> int:
    from runner.common import dist
    from runner.evaluate import compare
    from runner.model import model

    if Path(args.run[0]).resolve() == Path(args.run[1]).resolve():
        raise RecipeError("--run", "A and B are the same run", "give two different run folders")
    run_a, run_b = (_trained_run(recipe, r) for r in args.run)
    world = dist.init()
    tokenizer, examples = _evaluation_examples(recipe)
    out_dir = dist.broadcast(compare.open_pair_dir(recipe, run_a, run_b) if world.main else None)
    print(f"comparison folder: {out_dir}", flush=True)
    net = model.load_for_inference(recipe, run_a / "adapter")
    net.load_adapter(str(run_b / "adapter"), adapter_name="B")
    summary = compare.compare_adapters(recipe, run_a, run_b, net, tokenizer, examples, out_dir)
    if summary is not None:
        print("\n".join(compare.summary_lines(summary)))
        print(f"done: {out_dir / 'comparison.md'}")
    return 0


def cmd_generate(args) -> int:
    import json

    recipe = _recipe(args)
    from runner.common import dist
    from runner.evaluate import infer
    from runner.model import model

    if dist.world().size > 1:
        raise RecipeError("runner generate", "prints completions from one process, not under a launcher",
                          "run it without torchrun / accelerate launch; `runner eval` spreads over several GPUs")
    adapter = None if args.base else _trained_run(recipe, args.run) / "adapter"
    rows = infer.read_inputs(infer.open_input(args.input), recipe)  # input mistakes show before weights load
    _, tokenizer = model.preflight(recipe)
    fitted = [infer.fit_prompt(row, recipe, tokenizer) for row in rows]
    shortened = sum(cut for _, cut in fitted)
    if shortened:
        print(f"{shortened} of {len(rows)} inputs shortened to fit prompt.max_length", file=sys.stderr, flush=True)
    net = model.load_for_inference(recipe, adapter)
    completions = infer.complete(net, tokenizer, [prompt for prompt, _ in fitted], recipe)
    for row, text in zip(rows, completions):
        print(json.dumps({**row, "completion": text}, ensure_ascii=False) if args.jsonl else " ".join(text.split()))
    return 0


def cmd_export(args) -> int:
    recipe = _recipe(args)
    from runner.export import export
    from runner.model import model

    export.refuse_launcher()
    run_dir = _trained_run(recipe, args.run)
    out = export.check_out(Path(args.out))
    meta, _ = model.preflight(recipe)
    tool = export.check_format(args.format, args.quant, args.llama_cpp, meta.config)
    record = export.export(recipe, run_dir, out, args.format, args.quant, tool)
    print(export.summary(record, out))
    print(f"done: {out}")
    return 0


def cmd_push(args) -> int:
    recipe = _recipe(args)
    from runner.export import push

    url = push.push(recipe, _trained_run(recipe, args.run), args.repo, private=args.private, quant=args.quant,
                    kind="gguf" if args.gguf else "merged" if args.merged else "adapter", dry_run=args.dry_run)
    print("dry run: nothing was uploaded" if url is None else f"done: {url}")
    return 0


def cmd_plan(args) -> int:
    recipe = _recipe(args)
    from runner.model import hub

    if args.gpus < 1:
        raise RecipeError("--gpus", f"{args.gpus} is not a number of GPUs", "use 1 or more")
    _check_gpu_gb(args.gpu_gb)
    hub.check_model(recipe)  # before torch loads (to look for a GPU): a hub id out of reach fails in a moment
    from runner.speed import plan, throughput

    card = throughput.find_card(args.card, throughput.gpu_name())
    print(plan.report(recipe, _card_gb(args, card), gpus=args.gpus, card=card))
    return 0


def _check_gpu_gb(gpu_gb: float | None) -> None:
    """argparse takes any float: nan, inf and sizes <= 0 would plan for no card at all (0 read as "no GPU")."""
    if gpu_gb is not None and not (math.isfinite(gpu_gb) and gpu_gb > 0):
        raise RecipeError("--gpu-gb", f"{gpu_gb:g} is not a card's memory", "give its size in GiB, e.g. 80")


def _card_gb(args, card: tuple[str, str]) -> float | None:
    """--gpu-gb, else the named card's memory, else this machine's GPU's (None without one)."""
    from runner.speed import profiles, throughput

    if args.gpu_gb is not None:
        return args.gpu_gb
    if args.card is not None:
        return throughput.CARDS[card[0]]["memory_gb"]
    return profiles.gpu_memory_gb()


# name -> (help, add its options, run it). A new command is one entry here plus its two functions.
COMMANDS = {
    "validate": ("check a recipe (schema, cross-checks, the local files and data columns) without loading anything heavy",
                 arguments.validate, cmd_validate),
    "inspect": ("token lengths, truncation, drops and labels of the recipe's data per split; writes inspect.json "
                "and histograms", arguments.inspect, cmd_inspect),
    "train": ("train the recipe's adapter, evaluate it and write report.md; writes a run folder under output_dir",
              arguments.train, cmd_train),
    "eval": ("evaluate a finished run's adapter (--run) or the untrained base model (--base)",
             arguments.eval, cmd_eval),
    "compare": ("evaluate the base model (adapter disabled) and the adapter, or two adapters (--run A --run B), on "
                "the same examples; writes comparison.md and comparison.json", arguments.compare, cmd_compare),
    "sweep": ("train a grid of settings (key.path=v1,v2,...) x seeds, each cell a normal run (finished cells are "
              "kept); writes sweep.md, sweep.json and sweep.png", arguments.sweep, cmd_sweep),
    "generate": ("print completions for your own inputs (JSONL records or raw text lines) with a run's adapter",
                 arguments.generate, cmd_generate),
    "export": ("merge a run's adapter into the dequantized base and save a plain transformers model folder "
               "(safetensors, tokenizer, model card), or with --format gguf a GGUF file and an Ollama Modelfile",
               arguments.export, cmd_export),
    "push": ("upload a run's adapter (or --merged / --gguf model), its card and record to a new hub repo",
             arguments.push, cmd_push),
    "plan": ("trainable/total parameters and predicted peak GPU memory per profile, from the config alone",
             arguments.plan, cmd_plan),
}


def _quiet_libraries() -> None:
    """Library deprecation notices and bitsandbytes' optional-kernel notice are not the user's to act on; they
    would bury the one-line errors and the progress this CLI prints."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _one_voice() -> dist.World:
    """Under a launcher only rank 0 prints progress and results (the trainer's own logs do the same); every rank
    still prints its errors."""
    world = dist.world()
    if not world.main:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the life of the process
    return world


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    previous = outcome.sigterm_as_interrupt()
    failed: list = []  # background threads' failures, in the order they happened
    hook, threading.excepthook = threading.excepthook, functools.partial(outcome.thread_failed, failed,
                                                                        threading.excepthook)
    try:
        code = _main(argv)
        if code == 0 and failed:  # the command succeeded without what that thread did: say so, in one line
            print(outcome.background_failure(failed[0]), file=sys.stderr)
        return code
    finally:
        threading.excepthook = hook
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    _quiet_libraries()
    world = _one_voice()
    try:
        parser = _parser()
        # Overrides may come after options too (`runner eval R --run D key=value`): collect what argparse left.
        args, extra = parser.parse_known_args(argv)
        unknown = [a for a in extra if a.startswith("-")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *extra]
        recipes.settle_recipe(args)
        return COMMANDS[args.command][2](args)
    except KeyboardInterrupt as exc:
        outcome.ending()
        terminated = isinstance(exc, outcome.Terminated)
        left = outcome.discard_unfinished()
        if world.main:  # rank 0 held the folders
            print(outcome.interrupted(left, "terminated (SIGTERM)" if terminated else "interrupted"), file=sys.stderr)
        elif terminated:  # a rank signalled alone (or by the launcher, stopping the job) says which it is
            print(outcome.terminated_rank(world), file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # the one-line contract: whatever escaped becomes one line, never a traceback
        outcome.ending()
        from runner.store import runs

        error = classify(exc, runs.written())  # the folders this command opened (runs records them)
        outcome.discard_unfinished()
        if os.environ.get("RUNNER_DEBUG") and not isinstance(exc, RecipeError):
            import traceback

            traceback.print_exc()
        print(outcome.for_rank(error, world), file=sys.stderr, end="")
        return error.exit_code


def run() -> int:
    """The ``runner`` command and ``python -m runner``: the CPU settings first (runner.common.cpu: before anything
    loads, and the command executed again where glibc's must be in place from its start), main(), and under a
    launcher the rank's end (dist.end)."""
    cpu.start()
    return dist.end(main())


if __name__ == "__main__":
    raise SystemExit(run())
