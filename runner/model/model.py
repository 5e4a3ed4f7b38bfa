"""Tokenizer, base model (bitsandbytes quantization), LoRA (peft), and the checks that need only the config."""

from __future__ import annotations

import difflib
from pathlib import Path

from runner.common import artifacts, cpu
from runner.common.errors import RecipeError, hub_unreachable, short
from runner.data import chat
from runner.model import hub, lora, start

_DTYPES = ("bfloat16", "float16", "float32")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str):
    """auto: bf16 where the GPU supports it, else fp16 on GPU; fp32 on CPU (bf16 matmuls are slow there)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _source(recipe: dict, key: str = "name_or_path") -> str:
    return recipe["model"][key] or recipe["model"]["name_or_path"]


_LOCAL_HINT = "the directory needs config.json and weights saved with save_pretrained"


def _missing_folder(key_path: str, src: str) -> RecipeError | None:
    """A local model path that is no folder. recipe.load made every local path (./ ../ / ~) absolute and a hub id
    never is; transformers would read a missing one as a malformed hub id ("Repo id must be in the form ...")."""
    path = Path(src)
    if not path.is_absolute() or path.is_dir():
        return None
    what = "is a file, not a folder" if path.exists() else "local folder not found"
    return RecipeError(key_path, f"{what}: {src}", "paths in a recipe are relative to the recipe file, on the "
                       "command line to where you run it; a hub id has no leading ./ ../ / or ~")


def check_local(recipe: dict) -> None:
    """The model's local folders exist and the model's has its config (torch-free: `runner validate` calls it; hub
    ids are left to loading)."""
    for key in ("name_or_path", "tokenizer"):
        src = recipe["model"][key]
        error = _missing_folder(f"model.{key}", src) if src else None
        if error is not None:
            raise error
    src = recipe["model"]["name_or_path"]
    if Path(src).is_absolute() and not (Path(src) / "config.json").is_file():
        raise RecipeError("model.name_or_path", f"{src} has no config.json", _LOCAL_HINT)


def _load_error(key_path: str, what: str, exc: Exception) -> RecipeError:
    missing = _missing_folder(key_path, what)
    if missing is not None:
        return missing
    # recipe.load made every local path absolute (see _missing_folder): anything else is a hub id
    unreachable = None if Path(what).is_absolute() else hub_unreachable(exc, key_path, what, "use a local directory")
    if unreachable is not None:
        return unreachable
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    local = Path(what).expanduser().exists()
    hint = (_LOCAL_HINT if local else
            "check the hub id, your network or HF_HUB_OFFLINE; offline, use a local directory")
    return RecipeError(key_path, f"cannot load {what!r}: {text[:200]}", hint)


# A local model folder whose files were cut short or changed (a copy or download that stopped, a full disk).
_DAMAGED_HINT = "copy or download the model folder again; a partial copy or download leaves files like this"


def load_tokenizer(recipe: dict):
    from transformers import AutoTokenizer

    src = _source(recipe, "tokenizer")
    key = "model.tokenizer" if recipe["model"]["tokenizer"] else "model.name_or_path"
    artifacts.check_folder(src, "the tokenizer's files", _DAMAGED_HINT)
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=recipe["model"]["revision"],
                                            trust_remote_code=recipe["model"]["trust_remote_code"])
    except Exception as exc:
        raise _load_error(key, src, exc) from None
    if tok.eos_token is None:
        raise RecipeError(key, f"tokenizer of {src!r} has no EOS token", "completions end with EOS; pick a tokenizer that has one")
    if tok.pad_token is None:
        # Padding is masked out of attention and loss, so reusing EOS is safe; a new token would resize 4-bit embeddings.
        tok.pad_token = tok.eos_token
    chat.attach(recipe, tok)  # chat data: the recipe's chat template, on the tokenizer every command uses
    return tok


def load_config(recipe: dict):
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig

    hub_logging.set_verbosity_error()  # its retry warnings would bury the one-line error below

    src = recipe["model"]["name_or_path"]
    hub.check_model(recipe)  # a hub id out of reach fails at once, not after huggingface_hub's retries
    artifacts.check_folder(src, "the model's weights or config", _DAMAGED_HINT)
    try:
        config = AutoConfig.from_pretrained(src, revision=recipe["model"]["revision"],
                                            trust_remote_code=recipe["model"]["trust_remote_code"])
    except Exception as exc:
        raise _load_error("model.name_or_path", src, exc) from None
    artifacts.check_dimensions(config, src)
    return config


def meta_model(config):
    """The architecture with no weights (meta device): module names and parameter counts for free."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_lora_variants(recipe: dict, model) -> None:
    """modules_to_save and layers_to_transform against the architecture (meta-device model, no weights)."""
    spec = recipe["lora"]
    if spec is None:
        return
    linear = lora.linear_module_names(model)
    targets = set(linear) if spec["target_modules"] == "all-linear" else set(spec["target_modules"])
    leaves = lora.leaf_module_names(model)
    quantized = recipe["quantization"]["method"] != "none"
    for i, name in enumerate(spec["modules_to_save"]):
        where = f"lora.modules_to_save[{i}]"
        if name not in leaves:
            close = difflib.get_close_matches(name, leaves, n=1)
            raise RecipeError(where, f"{model.config.model_type} has no module {name!r}",
                              (f"did you mean {close[0]!r}? " if close else "") + f"modules: {', '.join(leaves)}")
        if name in targets:
            raise RecipeError(where, f"{name!r} is also a LoRA target (lora.target_modules)",
                              "a module gets LoRA or is trained in full, not both")
        if quantized and name in linear:
            raise RecipeError(where, f"{name!r} is a linear layer the {recipe['quantization']['method']} base "
                              "stores quantized, so its weights cannot be trained",
                              "give LoRA to it (lora.target_modules), or train unquantized modules such as the "
                              "output head, embeddings or norms")
    layers = spec["layers_to_transform"]
    if layers:
        n = model.config.get_text_config().num_hidden_layers
        for i, index in enumerate(layers):
            if index >= n:
                raise RecipeError(f"lora.layers_to_transform[{i}]", f"layer {index} does not exist",
                                  f"{model.config.model_type} here has {n} layers: 0 to {n - 1}")
    if layers or spec["modules_to_save"] or lora.has_experts(model):
        try:  # peft finds the layers and modules itself: its refusal is the recipe's mistake
            lora.lora_on_meta(recipe, meta_model(model.config))
        except ValueError as exc:
            raise RecipeError("lora", f"peft cannot apply it to this model: {str(exc).splitlines()[0][:200]}",
                              "check lora.layers_to_transform, lora.modules_to_save and lora.target_modules") from None


def check(recipe: dict):
    """Config-only checks; returns the meta-device model for parameter counting."""
    config = load_config(recipe)
    try:
        model = meta_model(config)
    except ValueError as exc:
        raise RecipeError("model.name_or_path", f"not a causal language model: {str(exc)[:150]}",
                          "use a model with an AutoModelForCausalLM class") from None
    except (ArithmeticError, TypeError, IndexError, AssertionError) as exc:  # sizes that do not fit each other
        raise RecipeError("model.name_or_path", f"its config.json describes no model that can be built: "
                          f"{type(exc).__name__}: {short(exc, 150)}", artifacts.CONFIG_HINT) from None
    lora.check_targets(recipe, model)
    check_lora_variants(recipe, model)
    return model


def preflight(recipe: dict):
    """Everything that can fail from the recipe and the model's config, before a folder or weight exists: the
    config-only checks, then the tokenizer. Returns (meta-device model, tokenizer)."""
    meta = check(recipe)
    return meta, load_tokenizer(recipe)


def quantization_config(recipe: dict, sharded: bool = False):
    """``sharded``: FSDP shards only floating-point tensors, so the packed 4-bit weights are stored in the compute
    dtype (bitsandbytes' quant_storage), like the unquantized weights of the same layer."""
    from transformers import BitsAndBytesConfig

    q = recipe["quantization"]
    if q["method"] == "bnb_4bit":
        compute = resolve_dtype(q["compute_dtype"])
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q["quant_type"],
                                  bnb_4bit_use_double_quant=q["double_quant"], bnb_4bit_compute_dtype=compute,
                                  **({"bnb_4bit_quant_storage": compute} if sharded else {}))
    if q["method"] == "bnb_8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_trainable_here(recipe: dict, speed=None) -> None:
    """What the LoRA init needs of this machine and launch, before weights load."""
    import torch

    lora = recipe["lora"]
    init = lora["init"] if lora else "default"
    if init == "loftq" and not torch.cuda.is_available():
        raise RecipeError("lora.init", "loftq is computed on a CUDA GPU (peft's replace_lora_weights_loftq) and "
                          "this machine has none", "use init: default or gaussian here")
    if init in ("loftq", "pissa") and speed is not None and speed.distributed == "fsdp":
        raise RecipeError("lora.init", f"{init} initializes from whole weights, which FSDP shards",
                          "use init: default or gaussian with training.distributed: fsdp")


def _loftq(model, recipe: dict) -> None:
    """LoftQ on the 4-bit model: A and B from the SVD of (original weight - its 4-bit version), read from the
    model's safetensors (peft's replace_lora_weights_loftq)."""
    from peft import replace_lora_weights_loftq

    src = recipe["model"]["name_or_path"]
    local = Path(src).expanduser()
    try:
        replace_lora_weights_loftq(model, model_path=str(local) if local.is_dir() else None)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise RecipeError("lora.init", f"loftq needs the model's original weights as safetensors: "
                          f"{str(exc).splitlines()[0][:150]}",
                          "a local directory with model.safetensors, or a hub model already in the cache") from None


# Activations written as a chain of Python elementwise ops, and the one fused kernel computing the same formula:
# Phi-2's gelu_new keeps about five [tokens, intermediate] tensors per layer for backward; gelu(approximate="tanh")
# keeps one and launches one kernel.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}
# Where configs name their MLP activation: hidden_act (Llama, Qwen, Mistral, Phi), hidden_activation (Gemma).
ACTIVATION_KEYS = ("hidden_act", "hidden_activation")


def fused_activation_for(config) -> dict:
    """The config values that swap this architecture's activation for its fused kernel ({} where it is one kernel
    already: silu, gelu_pytorch_tanh): the key the config itself uses for it, whatever the family calls it."""
    for key in ACTIVATION_KEYS:
        act = getattr(config, key, None)
        if isinstance(act, str):
            return {key: FUSED_ACTIVATIONS[act]} if act in FUSED_ACTIVATIONS else {}
    return {}


def load_base(recipe: dict, fused_activation: bool = False, sharded: bool = False):
    """The base model as the recipe quantizes it, on this process's GPU when there is one. ``sharded`` (FSDP):
    loaded on the CPU; FSDP moves each process's shard to its GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    m = recipe["model"]
    kwargs = dict(revision=m["revision"], trust_remote_code=m["trust_remote_code"],
                  attn_implementation=m["attn_implementation"], dtype=resolve_dtype(m["dtype"]),
                  quantization_config=quantization_config(recipe, sharded))
    if fused_activation:
        kwargs.update(fused_activation_for(load_config(recipe)))
    if torch.cuda.is_available():
        # Sharded: quantized on the CPU, so no GPU ever holds the whole model (bitsandbytes' loader would put it on
        # this process's GPU); FSDP then moves one layer at a time to the GPU and keeps this rank's shard of it.
        kwargs["device_map"] = {"": "cpu" if sharded else torch.cuda.current_device()}
    artifacts.check_folder(m["name_or_path"], "the model's weights or config", _DAMAGED_HINT)
    try:
        model = AutoModelForCausalLM.from_pretrained(m["name_or_path"], **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error("model.name_or_path", m["name_or_path"], exc) from None
    if sharded and hasattr(model, "hf_device_map"):
        # accelerate refuses a 4-bit model whose device map differs from the training device; FSDP places it.
        del model.hf_device_map
    return model


def load_for_training(recipe: dict, speed=None):
    """``speed`` (runner.speed.profiles.Speed) may keep the loaded dtype, fuse the activation and decide gradient
    checkpointing; None = as the recipe writes it."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    sharded = speed is not None and speed.distributed == "fsdp"
    model = load_base(recipe, fused_activation=bool(speed and speed.fused_activation), sharded=sharded)
    _keep_trainable_layout(model)
    gc = speed.gradient_checkpointing if speed is not None else recipe["training"]["gradient_checkpointing"]
    # FSDP flattens each layer's frozen weights into one tensor of one dtype: no fp32 upcast of the norms there.
    if recipe["quantization"]["method"] != "none" and speed is not None and (speed.keep_dtype or sharded):
        _freeze_for_kbit_training(model)
    elif recipe["quantization"]["method"] != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe["model"]["adapter"] is not None:  # continue a trained adapter (runner.model.start)
        model = start.attach(model, recipe)
    elif recipe["lora"] is not None:
        model = get_peft_model(model, lora.lora_config(recipe, model=model))
        if recipe["lora"]["init"] == "loftq":
            _loftq(model, recipe)
    model.config.use_cache = False
    return model


def _freeze_for_kbit_training(model) -> None:
    """peft's prepare_model_for_kbit_training minus its fp32 cast of every unquantized weight: that cast makes the
    residual stream, norms and head fp32, doubling their activations and adding a cast kernel around every 4-bit
    matmul. bf16 norms and head are what bf16 training uses anyway; the LoRA weights are trained as TRL keeps them.
    Checkpointing (non-reentrant, so no input-grad hook is needed) is switched on by the trainer's arguments."""
    for param in model.parameters():
        param.requires_grad = False


def _keep_trainable_layout(model) -> None:
    """On CPU, bitsandbytes repacks 4-bit weights into an inference-only layout on the first forward in eval mode
    (e.g. the eval loss between training steps), after which training forwards fail with an in-place error."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_trained(recipe: dict, adapter_dir: Path | None):
    """Base model plus the saved adapter (or the base alone), ready for inference."""
    from peft import PeftModel

    if adapter_dir is not None:  # a damaged adapter is named before the base model loads
        artifacts.check_folder(adapter_dir, "the run's adapter", "the run folder's adapter was cut short or changed "
                               "since it was saved: train the run again, or use another run")
    model = load_base(recipe)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        _adapter_as_saved(model, Path(adapter_dir))
    model.eval()
    return model


def load_for_inference(recipe: dict, adapter_dir: Path | None):
    """The model that `runner eval`, `compare` and `generate` predict with: the recipe's threads, the base model
    and the saved adapter (None: the base alone), in eval mode. Call ``preflight`` first, so the recipe's mistakes
    show before any weight loads."""
    cpu.torch_threads(recipe)
    return load_trained(recipe, adapter_dir)


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _adapter_as_saved(model, adapter_dir: Path) -> None:
    """peft upcasts a loaded adapter to fp32; TRL trains a quantized model's LoRA weights in bf16. Keep the dtype
    the adapter was saved in, so a saved run predicts what it did when it was evaluated in training (and an
    evaluation resumed after a crash goes on with the same numbers)."""
    import torch
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return
    with safe_open(str(path), "pt") as f:
        saved = {f.get_slice(key).get_dtype() for key in f.keys()}
    if len(saved) != 1 or next(iter(saved)) not in _SAFETENSORS_DTYPES:
        return
    dtype = getattr(torch, _SAFETENSORS_DTYPES[saved.pop()])
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)
