"""The families' real shapes: the published config.json values of each model (no weights), as transformers config
classes build them. tests/test_families_plan.py writes them as config-only folders and runs `runner plan` on them;
bench/families.py builds random-weight models of them on the GPU.

Only what shapes the model is written out (dimensions, attention layout, activation, embeddings tying, sliding
windows, experts); token ids, rope scaling and the like keep the class defaults (they change no memory term).
"""

from __future__ import annotations

from pathlib import Path

# name -> (transformers config class, published config.json values)
REAL = {
    "llama-3.2-1b": ("LlamaConfig", dict(  # meta-llama/Llama-3.2-1B
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True)),
    "llama-3.1-8b": ("LlamaConfig", dict(  # meta-llama/Llama-3.1-8B
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    "qwen3-1.7b": ("Qwen3Config", dict(  # Qwen/Qwen3-1.7B
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3-4b": ("Qwen3Config", dict(  # Qwen/Qwen3-4B
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3-8b": ("Qwen3Config", dict(  # Qwen/Qwen3-8B
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=False, use_sliding_window=False)),
    "gemma-3-1b": ("Gemma3TextConfig", dict(  # google/gemma-3-1b-pt (text only)
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768,
        sliding_window=512, query_pre_attn_scalar=256, rms_norm_eps=1e-6, final_logit_softcapping=None,
        attn_logit_softcapping=None, tie_word_embeddings=True)),
    "mistral-7b-v0.3": ("MistralConfig", dict(  # mistralai/Mistral-7B-v0.3
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False)),
    "phi-3-mini": ("Phi3Config", dict(  # microsoft/Phi-3-mini-4k-instruct
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
        sliding_window=2047, tie_word_embeddings=False, pad_token_id=32000)),
    "phi-2": ("PhiConfig", dict(  # microsoft/phi-2
        vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
        partial_rotary_factor=0.4, max_position_embeddings=2048, hidden_act="gelu_new", tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(  # Qwen/Qwen3-30B-A3B
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu",
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)),
}


def config(name: str, **overrides):
    """The transformers config of family ``name`` (overrides on top: e.g. fewer layers)."""
    import transformers

    cls, values = REAL[name]
    return getattr(transformers, cls)(**{**values, **overrides})


def write(name: str, folder: Path, **overrides) -> Path:
    """A folder holding only config.json for family ``name``, as `runner plan` reads it."""
    config(name, **overrides).save_pretrained(folder)
    return folder


# The same classes shrunk for CPU tests: every structural choice of the family kept (head_dim apart from
# hidden/heads, GQA, tying, windows, experts), only the sizes small.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(name: str, **overrides):
    """Family ``name``'s config at CPU size."""
    values = dict(TINY)
    real = REAL[name][1]
    if "num_key_value_heads" in real:
        values["num_key_value_heads"] = 2 if real["num_key_value_heads"] < real["num_attention_heads"] else 4
    if "head_dim" in real:
        values["head_dim"] = 32 if real["head_dim"] * real["num_attention_heads"] != real["hidden_size"] else 16
    if "num_experts" in real:
        values.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if real.get("sliding_window"):
        values["sliding_window"] = 8
    if REAL[name][0] == "Gemma3TextConfig":
        values["layer_types"] = ["sliding_attention", "full_attention"]
    if REAL[name][0] == "PhiConfig":
        values.update(resid_pdrop=0.0, embd_pdrop=0.0)
    return config(name, **{**values, **overrides})
