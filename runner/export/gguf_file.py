"""``runner export --format gguf``: the merged model written as one GGUF file (llama.cpp, Ollama, LM Studio).

The file is written with the ``gguf`` package's GGUFWriter (an optional extra: ``pip install 'qlora-recipes[gguf]'``),
the way llama.cpp's ``convert_hf_to_gguf.py`` writes these architectures: the same tensor names (gguf's own
TensorNameMap), the same metadata keys, Llama's q/k rows permuted for llama.cpp's rotary layout, 1-D tensors (norms,
biases) kept in F32. The weights are the QLoRA-correct merge (runner.model.merge), not the original checkpoint's.

Quantizations the gguf package computes itself (f32, f16, bf16, q8_0, q5_0, q4_0) are written directly; the k-quants
(q4_k_m, ...) need llama.cpp's ``llama-quantize``, run on an f16 file when it is found (``--llama-cpp DIR``,
``$LLAMA_CPP_DIR`` or PATH). What is written is read back and checked (``verify``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from runner.common.errors import EnvironmentProblem, RecipeError

# transformers' model_type -> llama.cpp's architecture name; others are not supported yet.
ARCHITECTURES = {"phi": "phi2", "llama": "llama"}
# --quant -> (gguf's GGMLQuantizationType name, LlamaFileType name); None: llama-quantize's type name instead.
DIRECT = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
LLAMA_QUANTIZE = {"q2_k": "Q2_K", "q3_k_m": "Q3_K_M", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M",
                  "q6_k": "Q6_K"}
QUANTS = (*DIRECT, *LLAMA_QUANTIZE)
LLAMA_CPP_ENV = "LLAMA_CPP_DIR"
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) of the bases we know; another base gets "default".
PRE_TOKENIZERS = {"microsoft/phi-2": "phi-2", "meta-llama/Meta-Llama-3-8B": "llama-bpe",
                  "meta-llama/Meta-Llama-3-8B-Instruct": "llama-bpe", "meta-llama/Llama-3.2-1B": "llama-bpe",
                  "meta-llama/Llama-3.2-1B-Instruct": "llama-bpe", "meta-llama/Llama-3.2-3B-Instruct": "llama-bpe"}


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError:
        raise EnvironmentProblem("--format gguf", "the gguf package is not installed",
                                 "pip install 'qlora-recipes[gguf]' (or pip install gguf) in the runner's environment"
                                 ) from None
    return gguf


def check(config, quant: str, llama_cpp: str | None) -> str | None:
    """Before any weight loads: the gguf package, the architecture, the quantization and what it needs. Returns
    the path of llama-quantize when ``quant`` needs it."""
    _gguf()
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise RecipeError("--format gguf", f"the {kind!r} architecture is not supported yet (supported: "
                          f"{', '.join(ARCHITECTURES)})", "export a transformers folder (--format hf) and convert "
                          "it with llama.cpp's convert_hf_to_gguf.py")
    if kind == "llama" and (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default") != "default":
        raise RecipeError("--format gguf", "Llama models with scaled rotary embeddings are not supported yet",
                          "export a transformers folder (--format hf) and convert it with llama.cpp")
    if quant not in QUANTS:
        raise RecipeError("--quant", f"{quant!r} is not a quantization this export knows",
                          f"one of {', '.join(QUANTS)}")
    if quant in DIRECT:
        return None
    return find_llama_quantize(llama_cpp, quant)


def find_llama_quantize(llama_cpp: str | None, quant: str) -> str:
    """llama.cpp's llama-quantize: in --llama-cpp DIR (or $LLAMA_CPP_DIR) or its build/bin, else on PATH."""
    root = llama_cpp or os.environ.get(LLAMA_CPP_ENV)
    places = [Path(root) / "build" / "bin", Path(root)] if root else []
    for place in places:
        if (place / "llama-quantize").is_file() and os.access(place / "llama-quantize", os.X_OK):
            return str(place / "llama-quantize")
    found = None if root else shutil.which("llama-quantize")
    if found:
        return found
    where = f"in {root} or its build/bin" if root else f"on PATH (nor --llama-cpp DIR / ${LLAMA_CPP_ENV} given)"
    raise EnvironmentProblem("--quant", f"{quant} needs llama.cpp's llama-quantize, not found {where}",
                             "build llama.cpp (cmake -B build && cmake --build build --target llama-quantize) and "
                             f"pass --llama-cpp DIR, or use one of {', '.join(DIRECT)}")


# ---------------------------------------------------------------- tensors


def _permute(weights, n_head: int, n_head_kv: int):
    """HF's rotary halves -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


class Tensors:
    """The merged model's tensors as llama.cpp reads them, {gguf name: float32 numpy array}, each made when it is
    asked for: a whole model in float32 is four bytes a weight (11 GB for Phi-2), so the writer and the read-back
    check hold one tensor at a time."""

    def __init__(self, model, arch: str):
        gguf = _gguf()
        self.config, self.arch = model.config, arch
        self.state = model.state_dict()  # references to the model's own tensors, no copies
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], self.config.num_hidden_layers)
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.keys = {}  # gguf name -> state_dict key, in the model's order
        for key in self.state:
            if (tied and key == "lm_head.weight") or key.endswith("rotary_emb.inv_freq"):
                continue  # tied: llama.cpp reads token_embd for the output when there is no output tensor
            new = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ValueError(f"no GGUF name for the tensor {key!r} of a {arch} model")
            self.keys[new] = key

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)

    def __contains__(self, name) -> bool:
        return name in self.keys

    def shape(self, name: str) -> list[int]:
        return list(self.state[self.keys[name]].shape)

    def __getitem__(self, name: str):
        key = self.keys[name]
        data = self.state[key].detach().float().cpu().numpy()
        if self.arch == "llama" and key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = self.config.num_attention_heads
            kv = self.config.num_key_value_heads if key.endswith("k_proj.weight") else heads
            data = _permute(data, heads, kv)
        return data


def _qtype(gguf, name: str, shape: list[int], quant: str):
    """The type a tensor is stored in: 1-D tensors and norms F32 (as llama.cpp's converter does), rows that do not
    divide into the quantization's blocks F16."""
    qtype = gguf.GGMLQuantizationType[DIRECT[quant][0]]
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        return qtype
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _nbytes(gguf, shape: list[int], qtype) -> int:
    """Bytes of a tensor of ``shape`` stored as ``qtype`` (what the header announces before the data is made)."""
    stored = gguf.quants.quant_shape_to_byte_shape(shape, qtype) if qtype.name not in ("F32", "F16", "BF16") else shape
    width = {"F32": 4, "F16": 2, "BF16": 2}.get(qtype.name, 1)
    count = 1
    for n in stored:
        count *= n
    return count * width


# ---------------------------------------------------------------- metadata and vocabulary


def _hparams(writer, config, arch: str) -> None:
    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    rope = getattr(config, "rope_parameters", None) or {}
    if arch == "phi2":
        writer.add_head_count_kv(heads)
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * config.hidden_size) // heads)
        writer.add_add_bos_token(False)
        return
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)


def _vocab(writer, tokenizer_dir: Path, tokenizer, vocab_size: int, base: str, chat_template: str | None) -> dict:
    """The tokenizer as llama.cpp reads it: a byte-level BPE (GPT-2 style) vocabulary, or a SentencePiece-style
    one (byte fallback, Llama 2), through gguf's own vocabulary readers as convert_hf_to_gguf.py does."""
    gguf = _gguf()
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if spec.get("model", {}).get("type") == "BPE" and byte_level:
        tokens, types = _bpe_tokens(gguf, tokenizer, vocab_size)
        pre = PRE_TOKENIZERS.get(base, "default")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        merges = True
    elif spec.get("model", {}).get("byte_fallback"):
        vocab = gguf.LlamaHfVocab(tokenizer_dir)
        tokens, scores, types = zip(*vocab.all_tokens())
        pre = "default"
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        merges = False
    else:
        raise RecipeError("--format gguf", f"the tokenizer's kind ({spec.get('model', {}).get('type')}) is not "
                          "supported yet", "export a transformers folder (--format hf) and convert it with llama.cpp")
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=merges, n_vocab=vocab_size)
    special.chat_template = chat_template  # the recipe's prompt, not whatever the base's tokenizer carried
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2" if merges else "llama", "pre": pre, "tokens": len(tokens)}


def _bpe_tokens(gguf, tokenizer, vocab_size: int):
    """convert_hf_to_gguf.py's get_vocab_base: every id up to the model's vocabulary size, unused ones padded."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


# ---------------------------------------------------------------- writing and checking


def write(model, tokenizer, tokenizer_dir: Path, path: Path, quant: str, *, name: str, base: str,
          chat_template: str | None, quantize_tool: str | None = None) -> dict:
    """The GGUF file of ``model`` at ``path``; returns what was written (for export.json and the check)."""
    import numpy as np

    gguf = _gguf()
    arch = ARCHITECTURES[model.config.model_type]
    tensors = Tensors(model, arch)
    direct = quant if quant in DIRECT else "f16"  # llama-quantize works from an f16 file
    target = path if quant in DIRECT else path.with_name(path.name + ".f16")
    writer = gguf.GGUFWriter(target, arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[DIRECT[direct][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hparams(writer, model.config, arch)
    vocab = _vocab(writer, tokenizer_dir, tokenizer, model.config.vocab_size, base, chat_template)
    types = {key: _qtype(gguf, key, tensors.shape(key), direct) for key in tensors}
    for key, qtype in types.items():  # the header first, from shapes alone; then each tensor made and written
        writer.add_tensor_info(key, tensors.shape(key), np.float32, _nbytes(gguf, tensors.shape(key), qtype),
                               raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, qtype in types.items():
        data = tensors[key]
        writer.write_tensor_data(data if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(data, qtype))
    writer.close()
    if quant not in DIRECT:
        try:
            done = subprocess.run([quantize_tool, str(target), str(path), LLAMA_QUANTIZE[quant]],
                                  capture_output=True, text=True, check=False)
        finally:
            target.unlink(missing_ok=True)
        if done.returncode != 0:
            raise EnvironmentProblem("--quant", f"llama-quantize failed ({done.returncode}): "
                                     f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}",
                                     "check the llama.cpp build, or use --quant f16 / q8_0")
    return {"architecture": arch, "quant": quant, "tensors": {k: tensors.shape(k) for k in tensors},
            "types": {k: t.name for k, t in types.items()}, "vocab": vocab,
            "context_length": model.config.max_position_embeddings, "chat_template": chat_template, "source": tensors}


def verify(path: Path, written: dict) -> dict:
    """Read the file back: architecture, context length, vocabulary, chat template, every tensor's name and shape;
    for the types gguf can dequantize, the largest difference from the merged weights (relative to the tensor's
    largest weight)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    arch = written["architecture"]

    def field(key):
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    problems = []
    expected = {"general.architecture": arch, f"{arch}.context_length": written["context_length"],
                "tokenizer.ggml.model": written["vocab"]["model"], "tokenizer.chat_template": written["chat_template"]}
    for key, want in expected.items():
        if field(key) != want:
            problems.append(f"{key} is {field(key)!r}, not {want!r}")
    tokens = field("tokenizer.ggml.tokens")
    if tokens is None or len(tokens) != written["vocab"]["tokens"]:
        problems.append(f"{len(tokens or [])} tokens, not {written['vocab']['tokens']}")
    shapes = {t.name: list(reversed([int(n) for n in t.shape])) for t in reader.tensors}
    if shapes != written["tensors"]:
        missing = sorted(set(written["tensors"]) ^ set(shapes)) or [k for k in shapes if shapes[k] != written["tensors"][k]]
        problems.append(f"tensors differ from what was written, e.g. {missing[:3]}")
    worst = 0.0
    source = written["source"]
    for t in reader.tensors:
        if t.name not in source:
            continue
        want = source[t.name]  # made now, one tensor at a time
        try:
            back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        except NotImplementedError:  # a type llama-quantize wrote that gguf cannot read back
            continue
        scale = float(abs(want).max()) or 1.0
        worst = max(worst, float(abs(back.astype("float32") - want).max()) / scale)
    if problems:
        raise EnvironmentProblem(str(path), "the GGUF file read back wrong: " + "; ".join(problems),
                                 "a bug in the export or the gguf package; RUNNER_DEBUG=1 shows more")
    return {"tensors": len(shapes), "metadata": sorted(expected), "tokens": len(tokens),
            "max_weight_error_relative": worst}


def llama_cpp_gap(path: Path, reference, tokenizer, prompt: str) -> dict | None:
    """Logits of the GGUF under llama-cpp-python against the merged model's, on one prompt; None when
    llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import numpy as np
    import torch

    ids = tokenizer(prompt)["input_ids"]
    net = Llama(model_path=str(path), logits_all=True, n_ctx=max(64, len(ids) + 8), verbose=False)
    net.eval(ids)
    theirs = np.asarray(net.scores[: len(ids)], dtype=np.float32)
    with torch.inference_mode():
        ours = reference(torch.tensor([ids], device=next(reference.parameters()).device)).logits[0].float().cpu().numpy()
    return {"tokens": len(ids), "max_abs_logit_diff": float(abs(ours - theirs).max()),
            "max_abs_logit": float(abs(ours).max()), "same_next_token": bool((ours.argmax(-1) == theirs.argmax(-1)).all())}
