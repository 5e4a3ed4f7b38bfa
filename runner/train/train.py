"""Training: the run folder, SFTConfig and SFTTrainer from the recipe, the adapter and the run record.

Reads top to bottom like the run itself: check, set up each recipe section, train, save, evaluate.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from runner.common import cpu, dist, safeio
from runner.common.errors import RecipeError
from runner.data import chat, preference, prepared_cache
from runner.data import data as data_mod
from runner.evaluate import evaluate
from runner.model import counting
from runner.model import model as model_mod
from runner.model import start as adapter_start
from runner.recipe import methods as recipe_methods
from runner.speed import profiles
from runner.store import checkpoints, runs
from runner.train import divergence, early, live_eval, methods, tracking

# ---------------------------------------------------------------- one _setup_* per recipe section


def _setup_data(recipe: dict, tokenizer) -> data_mod.Prepared:
    if recipe["data"]["splits"]["train"] is None:
        raise RecipeError("data.splits.train", "is null, so there is nothing to train on", "name the train split")
    roles = ("train", "eval", recipe["evaluation"]["split"])
    prepare = preference.prepare if recipe_methods.is_preference(recipe) else data_mod.prepare
    prepared = prepared_cache.prepared(recipe, tokenizer, tuple(dict.fromkeys(roles)), prepare)
    where = f" (prepared before: {prepared_cache.cache_dir() / prepared.cached})" if prepared.cached else ""
    print(f"data: {data_mod.describe(prepared.stats)}{where}", flush=True)
    evaluate.check_labels(recipe, {role: examples for role, examples in prepared.splits.items()
                                   if role not in recipe_methods.pair_roles(recipe)})
    return prepared


def _setup_model(recipe: dict, speed):
    from transformers import set_seed

    # LoRA's random init happens here, before the trainer seeds anything: the same on every rank and every world size.
    set_seed(recipe["seed"])
    model = model_mod.load_for_training(recipe, speed)
    trainable, total = counting.count_parameters(model)
    print(counting.parameter_line(trainable, total), flush=True)
    return model, trainable, total


def _setup_training(recipe: dict, run_dir: Path, has_eval: bool, speed=None, stopping: early.Decider | None = None,
                    train_rows: int = 0):
    """The method's TRL config from the recipe (runner.train.methods); the micro-batch, accumulation and
    checkpointing are the resolved ``speed``'s (None: as the recipe writes them); ``stopping``: early stopping's
    metric (runner.train.early)."""
    import torch
    from trl import SFTConfig

    speed = speed or profiles.as_written(recipe)
    t = recipe["training"]
    on_gpu = torch.cuda.is_available()
    dtype = model_mod.resolve_dtype(recipe["model"]["dtype"])
    # A model kept in bf16 needs no autocast; under it, CUDA runs every LayerNorm in fp32, and the 4-bit layers
    # return their input's dtype, so the residual stream and all activations downstream would be fp32 again.
    mixed = on_gpu and not speed.keep_dtype
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if t["eval_every"] else "epoch"
    save_strategy = "steps" if t["save_every"] else "no"
    if t["early_stopping"] is not None:  # a checkpoint at every evaluation, so the best one can be restored
        save_strategy = eval_strategy
    return _one_gpu_per_process(methods.config(recipe, dict(
        output_dir=str(run_dir / "checkpoints"),
        seed=recipe["seed"],
        num_train_epochs=t["epochs"],
        max_steps=t["max_steps"] or -1,
        per_device_train_batch_size=speed.micro_batch_size,
        per_device_eval_batch_size=speed.micro_batch_size,
        gradient_accumulation_steps=speed.gradient_accumulation_steps,
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler"],
        warmup_steps=t["warmup_ratio"] if t["warmup_ratio"] < 1 else 0,
        weight_decay=t["weight_decay"],
        max_grad_norm=t["max_grad_norm"] or 0.0,
        optim=t["optimizer"],
        **_checkpointing_args(SFTConfig, speed.gradient_checkpointing),
        packing=t["packing"],
        max_length=recipe["prompt"]["max_length"],
        # Loss on the completion only; for chat data on every assistant turn, as the chat template's
        # {% generation %} markers delimit them (runner.data.chat).
        completion_only_loss=not chat.is_chat(recipe),
        assistant_only_loss=chat.is_chat(recipe),
        eval_strategy=eval_strategy,
        eval_steps=t["eval_every"],
        save_strategy=save_strategy,
        save_steps=t["save_every"] or t["eval_every"] or 500,
        save_total_limit=None,  # runner.store.checkpoints rotates, counting only complete checkpoints
        logging_steps=t["logging_steps"],
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must show (runner.train.divergence), not become the mean of the rest
        # Mixed precision only on a GPU: TRL turns bf16 on by default, and bf16 matmuls on CPU are ~3x slower.
        bf16=mixed and dtype == torch.bfloat16,
        fp16=mixed and dtype == torch.float16,
        use_cpu=not on_gpu,
        # Every LoRA weight takes part in every forward: no extra autograd traversal to look for unused ones.
        ddp_find_unused_parameters=False,
        **_fsdp_args(speed),
        **tracking.trainer_args(recipe, run_dir),
        **early.trainer_args(recipe, stopping),
        dataloader_num_workers=0,
        dataset_num_proc=cpu.data_workers(train_rows),  # TRL's tokenization: the cores, for large data
        save_only_model=False,
    )))


def _one_gpu_per_process(args):
    """One process trains on one GPU. Without a launcher, transformers would wrap the model in nn.DataParallel over
    every visible GPU, which TRL refuses (and which the 4-bit model, placed on one GPU, could not use)."""
    if dist.world().size == 1 and args.n_gpu > 1:
        print(f"note: {args.n_gpu} GPUs visible to one process: training on {args.device} (to use them all, launch "
              f"with torchrun --nproc-per-node {args.n_gpu}, or make train NPROC={args.n_gpu})", flush=True)
        args._n_gpu = 1  # read by Trainer as args.n_gpu; set by args.device above
    return args


def _fsdp_args(speed) -> dict:
    """FSDP-QLoRA as peft and accelerate document it: every decoder layer its own shard unit (peft's wrap policy
    puts the LoRA weights in units of their own), flat parameters of the frozen 4-bit storage in the compute dtype,
    rank 0's weights synchronized to the others, full state dicts so the adapter saves as usual."""
    if speed.distributed != "fsdp":
        return {}
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 1, "use_orig_params": False, "sync_module_states": True,
                            "cpu_ram_efficient_loading": True, "state_dict_type": "FULL_STATE_DICT",
                            "backward_prefetch": "backward_pre", "limit_all_gathers": True}}


def _checkpointing_args(config_cls, enabled: bool) -> dict:
    # transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing* (the old names warn).
    prefix = "activation" if "activation_checkpointing" in config_cls.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None}


def _log_callback(path: Path):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Streams every log record (train loss, eval loss, lr, ...) to train_log.jsonl as it happens (rank 0: the
        trainer logs values already averaged over the ranks)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return JsonlLog()


# ---------------------------------------------------------------- the run


def _setup_speed(recipe: dict, meta, speed=None):
    """The profile's settings (runner.speed.profiles), decided from the config before any weight loads; ``speed``, when
    given, instead of them."""
    speed = speed or profiles.resolve(recipe, meta.config)
    model_mod.check_trainable_here(recipe, speed)
    if speed.distributed == "fsdp":
        import torch

        if not torch.cuda.is_available():
            raise RecipeError("training.distributed", "fsdp shards the model across GPUs and this launch has none",
                              "use ddp for CPU processes (auto picks it)")
    if speed.profile != "none" or speed.predicted_gb is not None or speed.world_size > 1:
        print(f"speed: {speed.describe()}", flush=True)
    if not speed.cudnn_sdpa:
        import torch

        # cuDNN's SDPA builds an execution graph per new shape (seconds of host time); flash attention does not.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return speed


def _setup_adapter_dtype(trainer, recipe: dict) -> None:
    """Keep the LoRA weights in the model's dtype where that is fp32 (a CPU). TRL casts a quantized model's LoRA
    weights to bf16, the QLoRA paper's choice for GPUs; on a CPU every LoRA matmul then runs in bf16, which only CPUs
    with AVX512-BF16 or AMX do natively. Without them oneDNN emulates it: measured on the tiny XSum twin, a step took
    twice the CPU time with oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2), the path of a CPU without AVX-512. The
    optimizer is built when training starts, so it sees the fp32 weights."""
    import torch

    if recipe["quantization"]["method"] == "none" or model_mod.resolve_dtype(recipe["model"]["dtype"]) != torch.float32:
        return
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _trained_in_checkpoint(trainer, resume_from: str | None, recipe: dict):
    """The training result when the checkpoint to resume from was taken at the last of training.max_steps (the run
    was stopped after it, before the adapter was saved), else None. transformers resumes such a checkpoint and
    trains one step past max_steps (it checks for the end after a step); this loads its weights and state instead.
    Under FSDP the model is sharded only inside ``train``: left to it."""
    max_steps = recipe["training"]["max_steps"]
    if resume_from is None or not max_steps or trainer.is_fsdp_enabled:
        return None
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
    if state.global_step < max_steps:
        return None
    trainer._load_from_checkpoint(resume_from)
    trainer.state = state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    print(f"{Path(resume_from).name} holds all {max_steps} steps: nothing left to train", flush=True)
    return TrainOutput(state.global_step, sum(losses) / len(losses) if losses else float("nan"), {})


# torch.compile's backend for training.compile (tests use "eager": the same tracing, no code generation).
COMPILE_BACKEND = "inductor"


def _setup_compile(trainer, speed) -> tuple[list, list]:
    """Each decoder layer compiled in place (torch's regional compilation: every layer reuses one graph, so
    compiling costs one layer's time), replayed as CUDA graphs where ``speed`` says so; the layers to uncompile
    and the gradient hooks to remove after training. Decoder layers are what transformers names in
    ``_no_split_modules``."""
    if not speed.compiled:
        return [], []
    import torch

    names = set()
    for module in trainer.model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in trainer.model.modules() if type(m).__name__ in names]
    mode = {"mode": "reduce-overhead"} if speed.cuda_graphs else {}
    for layer in layers:
        layer.compile(backend=COMPILE_BACKEND, **mode)
    trainer.graph_steps = speed.cuda_graphs
    hooks = []
    if speed.cuda_graphs and trainer.args.gradient_accumulation_steps > 1:
        # A gradient the backward graph returns lives in the graphs' memory pool, which the next micro-batch
        # overwrites: gradients that accumulate across micro-batches must be copies (torch refuses to add to
        # an overwritten one).
        hooks = [p.register_hook(torch.clone) for p in trainer.model.parameters() if p.requires_grad]
    return layers, hooks


def _uncompile(compiled: tuple[list, list], trainer) -> None:
    # Evaluation decodes with a KV cache and new shapes every step: compiled layers would recompile for each.
    # nn.Module.compile keeps the compiled call here; without it the module runs its own forward again.
    layers, hooks = compiled
    for layer in layers:
        layer._compiled_call_impl = None
    for hook in hooks:
        hook.remove()
    if trainer.graph_steps:  # the graphs keep their memory pool until torch's compiler state is reset
        import torch

        trainer.graph_steps = False
        torch.compiler.reset()


def _setup_shapes(trainer, speed, tokenizer, recipe: dict) -> None:
    if speed.fixed_shapes and recipe["training"]["method"] in ("sft", "pretrain"):  # the others: TRL's pair collators
        # Compiled layers: every batch as many rows as the micro-batch (runner.speed.profiles.FixedRows)
        rows = speed.micro_batch_size if speed.compiled else None
        trainer.data_collator = profiles.FixedRows(tokenizer.pad_token_id, recipe["prompt"]["max_length"], rows)


def train(recipe: dict, instrument=None, speed: profiles.Speed | None = None,
          trackers: tracking.Session | None = None):
    """Train the recipe. Returns (run folder, trained model, tokenizer, prepared data) for evaluation.

    The recipe says what is trained; how (micro-batch x accumulation, checkpointing, the profile's switches, the
    processes) is ``speed``, resolved here by the recipe's training.profile unless given (the benchmark gives its
    own). ``instrument(trainer)``, when given, runs just before training (the benchmark adds its timers there).
    ``trackers``: the session that holds training.report_to's runs open after training, for the caller to finish
    with the evaluation's metrics (runner.cli.pipeline); without one they end with training."""
    world = dist.init()
    meta, tokenizer = model_mod.preflight(recipe)
    tracking.check(recipe)
    stopping = early.decider(recipe)
    speed = methods.speed_for(recipe, _setup_speed(recipe, meta, speed))
    early.check_launch(stopping, speed)
    live_eval.check_launch(recipe, speed)
    started_from = adapter_start.describe(recipe)  # model.adapter found (or refused) before any weight loads
    prepared = _setup_data(recipe, tokenizer)
    # Rank 0 claims the one run folder (or finds the run to resume); every rank trains into it.
    run_dir, resume_from = dist.broadcast(runs.open_run(recipe, fingerprint=prepared.fingerprint)
                                          if world.main else None)
    print(f"run folder: {run_dir}", flush=True)
    threads = cpu.torch_threads(recipe)
    trained = runs.trained_adapter(run_dir)
    if trained is not None:  # interrupted after training: evaluate what was trained
        return run_dir, model_mod.load_trained(recipe, trained), tokenizer, prepared
    Trainer = methods.trainer_class(recipe)
    if chat.is_chat(recipe):
        chat.quiet_trl_stop_token_warning()
    start = time.time()
    try:
        # FSDP's arguments come first: transformers loads the model for sharding only when they are set.
        args = _setup_training(recipe, run_dir, has_eval="eval" in prepared.splits, speed=speed, stopping=stopping,
                               train_rows=len(prepared.splits["train"]))
        model, trainable, total = _setup_model(recipe, speed)
        t = recipe["training"]  # checkpoints by time unless the recipe sets them by steps
        record = checkpoints.run_record(t["save_total_limit"], resume_from,
                                        t["save_every_minutes"] if t["save_every"] is None else None)
        guard = divergence.guard(recipe, run_dir)
        init_dir = _save_pissa_init(model, recipe, run_dir, world)
        train_ds, eval_ds = methods.datasets(recipe, prepared)
        with tracking.environment(recipe, run_dir):  # the tracker callbacks read it when they are made
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=train_ds,
                eval_dataset=eval_ds,
                processing_class=tokenizer,
                callbacks=[record, guard, _log_callback(run_dir / "train_log.jsonl"), *early.callbacks(recipe)],
            )
        session = trackers if trackers is not None else tracking.Session()
        session.attach(trainer, recipe["evaluation"]["split"], resume_from)
        trainer.extra_metrics = live_eval.scorer(recipe, stopping, tokenizer, prepared.splits.get("eval"))
        guard.attach(trainer)
        checkpoints.resume_in_the_same_precision(trainer)
        _setup_shapes(trainer, speed, tokenizer, recipe)
        _setup_adapter_dtype(trainer, recipe)
        compiled = _setup_compile(trainer, speed)
    except RecipeError:
        if world.main and not (resume_from and recipe["training"]["resume"] == "auto"):
            shutil.rmtree(run_dir, ignore_errors=True)  # a user mistake leaves no half-made run behind
        raise
    if world.main:
        runs.write_env(run_dir, recipe, prepared, threads=threads, trainable=trainable, total=total,
                       speed=speed.as_dict(), world_size=world.size, nodes=world.nodes, distributed=speed.distributed)
        runs.note_resolved(run_dir, recipe, speed.as_dict())
        if started_from is not None:
            runs.update_env(run_dir, started_from=started_from)
    if instrument is not None:
        instrument(trainer)
    load_s = time.time() - start
    try:
        result = (_trained_in_checkpoint(trainer, resume_from, recipe)
                  or trainer.train(resume_from_checkpoint=resume_from))
    except BaseException:
        _close_progress_bars(trainer)
        raise
    finally:
        _uncompile(compiled, trainer)
    if trackers is None:  # nobody evaluates into the trackers' runs: they end with training, as the trainer's do
        session.finish()
    train_s = record.seconds()  # the whole run's, over every session (runner.store.checkpoints)
    methods.drop_reference(trainer.model)
    divergence.check_weights(trainer.model, recipe, run_dir, result.global_step)
    adapter_dir = run_dir / "adapter"
    _save_adapter(trainer, tokenizer, adapter_dir, world, init_dir)
    ranks = dist.gather({"rank": world.rank, "device": runs.device_name(), **runs.peak_memory()})
    best = early.best_record(trainer, recipe, stopping)
    if world.main:
        runs.update_env(run_dir, train_seconds=round(train_s, 2), load_seconds=round(load_s, 2),
                        train_loss=record.mean_loss() if record.mean_loss() is not None else result.training_loss,
                        global_step=result.global_step, **runs.peak_memory(),
                        **({"ranks": ranks} if world.size > 1 else {}), **({"early_stopping": best} if best else {}),
                        **({"task_metrics": trainer.extra_metrics.record()}
                           if isinstance(trainer.extra_metrics, live_eval.Scorer) else {}))
    print(f"adapter saved to {adapter_dir} ({result.global_step} steps, {train_s:.1f} s)", flush=True)
    if best is not None:
        print(f"early stopping: {checkpoints.describe_best(best)}", flush=True)
    _router_logits_off(trainer.model)
    return run_dir, trainer.model, tokenizer, prepared


def _router_logits_off(model) -> None:
    """TRL turns a mixture of experts' router logits on for its load-balancing loss (the config's
    router_aux_loss_coef); evaluation wants none: with them on, generate() computes that loss at every step and
    fails on a padded batch (transformers' load_balancing_loss_func against the step's attention mask)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "output_router_logits", False):
        cfg.output_router_logits = False


def _close_progress_bars(trainer) -> None:
    """The trainer's progress bars, closed when training fails: closed later, at exit, they would print after the
    CLI's error line, or the error would continue a bar's unfinished line."""
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback):
            for bar in (callback.training_bar, callback.prediction_bar):
                if bar is not None:
                    bar.close()


def _save_pissa_init(model, recipe: dict, run_dir: Path, world: dist.World) -> Path | None:
    """PiSSA trains against a residual base (the weights minus their principal part). peft converts the trained
    adapter to a plain LoRA of the original weights at save time, from the adapter as it was initialized: saved
    here once (a resumed run initializes the same, deterministically from the seed), with init marked done so that
    loading it does not decompose again."""
    lora = recipe["lora"]
    if lora is None or lora["init"] != "pissa":
        return None
    init_dir = run_dir / "adapter_init"
    model.peft_config["default"].init_lora_weights = True
    if world.main and not init_dir.is_dir():
        with safeio.folder(init_dir) as partial:
            model.save_pretrained(partial)
    dist.barrier()
    return init_dir


def _save_adapter(trainer, tokenizer, adapter_dir: Path, world: dist.World, init_dir: Path | None = None) -> None:
    """The adapter once, by rank 0, loadable with plain ``PeftModel.from_pretrained``. Under FSDP every rank takes
    part in gathering the full (unsharded) adapter weights first. ``init_dir``: a PiSSA adapter's initial state,
    from which peft converts it to a plain LoRA of the original base weights."""
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    extra = {"state_dict": state} if state is not None else {}
    if init_dir is not None:
        extra["path_initial_model_for_weight_conversion"] = str(init_dir)
    if world.main:
        with safeio.folder(adapter_dir) as partial:  # appears whole or not at all
            trainer.model.save_pretrained(partial, **extra)
            tokenizer.save_pretrained(partial)
    dist.barrier()  # no rank reads the adapter (evaluation) before it is complete
