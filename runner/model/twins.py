"""Tiny offline twins of the model families in runner.model.families: each a random-init model of the family's own
transformers class and config structure (its attention, MLP, norm and rope layout, tied or untied embeddings,
sliding window where the family has one; Qwen3-MoE with experts and router), shrunk to hidden 64 and 2 layers,
with the tiny BPE tokenizer (runner.model.tiny) plus the family's special tokens, BOS/EOS/pad and chat template.
Saved with save_pretrained to ``<out>/<family>/`` and loaded by the runner through the real ``from_pretrained`` path.
Phi-2's twin is runner.model.tiny's ``phi/``.

    python -m runner.model.twins [--out .cache/tiny]   # builds the tiny data and Phi twin first (idempotent)
    python -m runner.model.twins --recipe R [k=v ...]  # ... and only the family twins recipe R's model names
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from runner.model import families, tiny

# Small enough that each family's chat twin trains in well under a minute on 2 CPU cores; grouped-query attention
# (4 query heads, 2 key/value heads) as every family here but Phi-2 has; the wider init tiny.py explains.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.08)
WINDOW = 32  # shorter than the chat twin's conversations, so the window masks something

# Per family: the transformers config class and what its preset's config.json sets that the class defaults differ
# on (rope, norms, windows, activation, MoE shape), at twin size.
CONFIGS = {
    "llama": ("LlamaConfig", dict(rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=128))),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                  rope_theta=1000000.0))),
    # 1 of every 6 Gemma 3 layers attends globally: here layer 0 slides, layer 1 is global; no softcapping in Gemma 3.
    "gemma3": ("Gemma3TextConfig", dict(tie_word_embeddings=True, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention"])),
    # v0.3 has no window; v0.1's every-layer window is the family's, and the twin keeps it to test the mask path.
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW, rope_parameters=dict(rope_type="default",
                                                                                 rope_theta=1000000.0))),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW, original_max_position_embeddings=512)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
}


def tokenizer_for(family: families.Family, phi_dir: Path):
    """The tiny BPE tokenizer with the family's special tokens, BOS/EOS/pad and chat template."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(phi_dir / "tokenizer.json"))
    specials = dict.fromkeys([*family.special_tokens, *(t for t in (family.bos, family.eos, family.pad) if t)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if family.add_bos:  # as the family's tokenizer: BOS before every text
        bos = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{family.bos} $A",
                                                           pair=f"{family.bos} $A {family.bos} $B",
                                                           special_tokens=[(family.bos, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, chat_template=family.chat_template,
                                   model_max_length=COMMON["max_position_embeddings"])


def build_twin(family: families.Family, out: Path, seed: int = 0) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, extra = CONFIGS[family.name]
    tokenizer = tokenizer_for(family, out / "phi")
    ids = {f"{role}_token_id": tokenizer.convert_tokens_to_ids(token)
           for role, token in (("bos", family.bos), ("eos", family.eos), ("pad", family.pad)) if token}
    config = getattr(transformers, class_name)(vocab_size=-(-len(tokenizer) // 64) * 64,
                                               **{"bos_token_id": None, "pad_token_id": None, **ids}, **COMMON, **extra)
    if family.name == "gemma3":  # Gemma 3 names its activation hidden_activation
        config.hidden_activation = "gelu_pytorch_tanh"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder = out / family.name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _stamp(out: Path) -> str:
    source = Path(__file__).read_bytes() + Path(families.__file__).read_bytes() + (out / "BUILT").read_bytes()
    return f"family twin built by runner.model.twins {hashlib.sha256(source).hexdigest()[:16]}\n"


def build(out: Path = tiny.DEFAULT_OUT, force: bool = False, names=None) -> Path:
    """The tiny data, the Phi twin and the family twins ``names`` (all by default) under ``out``; each skipped when
    built by this same code (its own ``BUILT`` stamp)."""
    out = tiny.build(Path(out), force)
    stamp = _stamp(out)
    for name in CONFIGS if names is None else names:
        marker = out / name / "BUILT"
        if force or not marker.exists() or marker.read_text() != stamp:
            build_twin(families.BY_NAME[name], out)
            marker.write_text(stamp)
    return out


def named_by(recipe_path: Path, overrides: list[str], out: Path) -> list[str]:
    """The family twins a recipe's model (and tokenizer) paths point at, as the recipe composes (extends and
    overrides applied); none for a recipe that cannot be read, whose error the runner itself then reports."""
    from runner.common.errors import RecipeError
    from runner.recipe.compose import compose

    try:
        model = compose(Path(recipe_path), overrides).get("model") or {}
    except (RecipeError, OSError):
        return []
    folders = {Path(str(model.get(k))).resolve() for k in ("name_or_path", "tokenizer") if model.get(k)}
    return [name for name in CONFIGS if (Path(out) / name).resolve() in folders]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.model.twins", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=tiny.DEFAULT_OUT, help="where data/, phi/ and the twins go")
    parser.add_argument("--force", action="store_true", help="rebuild even when already built")
    parser.add_argument("--recipe", type=Path, help="build only the twins this recipe's model names (make train)")
    parser.add_argument("overrides", nargs="*", help="the recipe's key=value overrides (with --recipe)")
    args = parser.parse_args(argv)
    names = None if args.recipe is None else named_by(args.recipe, args.overrides, args.out)
    out = build(args.out, args.force, names)
    if names != []:  # quiet for a recipe that names no family twin (make train's default)
        print(f"tiny data, Phi twin and {'every family twin' if names is None else ', '.join(names)} in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
