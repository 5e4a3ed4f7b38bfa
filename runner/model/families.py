"""The model families the runner has presets and tiny twins for, declared: each family's transformers model_type(s),
preset hub id, linear module names (attention, MLP, experts and router for mixture-of-experts), recommended LoRA
targets, chat template (Jinja, with the ``{% generation %}`` markers training needs), special and stop tokens, and
the structural facts the memory model and the twins use (gated MLP, tied embeddings, sliding window).

Declared contracts, read from the transformers 5 modeling code of each family (tests/test_families.py checks the
linear names against a meta-device model of each tiny twin), never guessed from names. A model whose model_type is
not here still trains from ``model.name_or_path`` with ``all-linear``; only the torch-free checks of
``runner validate`` need a family. Imports nothing heavy (``runner validate`` uses it).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from runner.common.errors import RecipeError

# ---------------------------------------------------------------- chat templates
# Written as the families' own templates render a text conversation (no tools, no images, no thinking), with
# {% generation %} around what the assistant writes (content and end of turn), as TRL's training variants
# (trl/chat_templates/*_training.jinja) place them. Whitespace inside a Jinja template is output: hence one line
# per piece, with -%} trimming.

LLAMA3 = "\n".join((  # Llama 3.1 / 3.2 Instruct, minus the tools block and the "Cutting Knowledge Date" system preamble
    "{{- bos_token -}}",
    "{%- for message in messages -%}",
    "{%- if message['role'] == 'assistant' -%}",
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}",
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' -}}{% endgeneration %}",
    "{%- else -%}",
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
))

# Qwen3 with enable_thinking=False: ChatML, each answer after an empty think block (as the real template writes the
# last one; it drops the block from earlier turns, which would make training and inference prompts differ by turn)
QWEN3 = "\n".join((
    "{%- for message in messages -%}",
    "{%- if message['role'] == 'assistant' -%}",
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}",
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}",
    "{%- else -%}",
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}",
))

# Gemma 3 (text): no system role, a system turn is prefixed to the first user turn; the assistant is 'model'
GEMMA3 = "\n".join((
    "{{- bos_token -}}",
    "{%- if messages[0]['role'] == 'system' -%}",
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}",
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}",
    "{%- for message in loop_messages -%}",
    "{%- if message['role'] == 'assistant' -%}",
    "{{- '<start_of_turn>model\\n' -}}",
    "{% generation %}{{- message['content'] | trim + '<end_of_turn>' -}}{% endgeneration %}{{- '\\n' -}}",
    "{%- else -%}",
    "{{- '<start_of_turn>user\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}",
))

# Mistral-7B-Instruct-v0.3: [INST] turns, the system text before the last user turn, answers end with EOS
MISTRAL = "\n".join((
    "{{- bos_token -}}",
    "{%- if messages[0]['role'] == 'system' -%}",
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}",
    "{%- set last_user = loop_messages | selectattr('role', 'equalto', 'user') | list | last -%}",
    "{%- for message in loop_messages -%}",
    "{%- if message['role'] == 'user' -%}",
    "{%- if system_message is defined and message is sameas last_user -%}",
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' -}}",
    "{%- else -%}{{- '[INST] ' + message['content'] + '[/INST]' -}}{%- endif -%}",
    "{%- else -%}",
    "{% generation %}{{- ' ' + message['content'] | trim + eos_token -}}{% endgeneration %}",
    "{%- endif -%}",
    "{%- endfor -%}",
))

# Phi-3-mini-4k-instruct; the real template ends a conversation (not a prompt) with EOS after the last <|end|>
PHI3 = "\n".join((
    "{%- for message in messages -%}",
    "{%- if message['role'] == 'assistant' -%}",
    "{{- '<|assistant|>\\n' -}}{% generation %}{{- message['content'] + '<|end|>' -}}{% endgeneration %}{{- '\\n' -}}",
    "{%- else -%}",
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}",
))


# ---------------------------------------------------------------- the families

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """One family's declared contract. ``attention``/``mlp``: the nn.Linear leaf names in each decoder layer (the
    output head is never a LoRA target); ``experts``/``router``: a mixture of experts' parameter names, which in
    transformers 5 are fused 3-D tensors and a router weight, not nn.Linear (no target_modules name reaches them;
    peft 0.22 expands ``all-linear`` to them as target_parameters); ``dense_mlp_when``: config keys whose
    non-default value adds dense MLP layers to a mixture of experts."""

    name: str                       # the registry key and the preset/twin file stem
    title: str                      # what people call it
    model_types: tuple[str, ...]    # transformers' config.model_type values
    preset: str                     # the preset recipe's hub id
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    lora_targets: tuple[str, ...] | str  # recommended lora.target_modules
    chat_template: str | None       # Jinja, None: the family has no chat format (a base model)
    bos: str | None
    eos: str                        # the tokenizer's EOS
    turn_end: str | None            # what ends an assistant turn in the template (a stop token); None: no chat
    special_tokens: tuple[str, ...]  # the control tokens the template writes
    pad: str | None = None          # the tokenizer's own pad token; None: the runner pads with EOS
    add_bos: bool = False           # the tokenizer puts BOS before every text
    gated_mlp: bool = True          # act(gate(x)) * up(x): three MLP matrices per layer (else up/act/down)
    tied_embeddings: bool = False   # the preset's tie_word_embeddings
    sliding_window: str = ""        # where and how the family attends to a local window; "" = never
    experts: tuple[str, ...] = ()
    router: tuple[str, ...] = ()
    dense_mlp_when: tuple[str, ...] = ()
    other_presets: tuple[str, ...] = ()  # other hub ids of the family the registry knows

    @property
    def linear(self) -> tuple[str, ...]:
        """Every nn.Linear leaf name of a decoder layer, attention first."""
        return self.attention + self.mlp

    def linear_for(self, config: dict) -> tuple[str, ...]:
        """The linear names of the model this config.json describes: a mixture of experts whose config asks for
        dense layers (Qwen3-MoE's mlp_only_layers, decoder_sparse_step > 1) has their MLP linears too."""
        dense = any(config.get(key) not in (None, [], 1) for key in self.dense_mlp_when)
        return self.attention + (GATED_MLP if dense else ()) + self.mlp

    @property
    def hub_ids(self) -> tuple[str, ...]:
        return (self.preset, *self.other_presets)


FAMILIES: tuple[Family, ...] = (
    Family("llama", "Llama 3.x", ("llama",), "meta-llama/Llama-3.2-1B-Instruct", ATTENTION, GATED_MLP, "all-linear",
           LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>",
           ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           add_bos=True, tied_embeddings=True,
           other_presets=("meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.1-8B-Instruct")),
    Family("qwen3", "Qwen 3", ("qwen3",), "Qwen/Qwen3-1.7B", ATTENTION, GATED_MLP, "all-linear", QWEN3,
           None, "<|im_end|>", "<|im_end|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
           pad="<|endoftext|>", tied_embeddings=True,  # (use_sliding_window exists, off in every released Qwen3)
           other_presets=("Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B")),
    Family("gemma3", "Gemma 3 (text)", ("gemma3_text",), "google/gemma-3-1b-it", ATTENTION, GATED_MLP, "all-linear",
           GEMMA3, "<bos>", "<eos>", "<end_of_turn>", ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
           pad="<pad>", add_bos=True, tied_embeddings=True,
           sliding_window="5 of every 6 layers attend to a 512-token window (layer_types), the 6th to all"),
    Family("mistral", "Mistral", ("mistral",), "mistralai/Mistral-7B-Instruct-v0.3", ATTENTION, GATED_MLP,
           "all-linear", MISTRAL, "<s>", "</s>", "</s>", ("<s>", "</s>", "[INST]", "[/INST]"), add_bos=True,
           sliding_window="every layer, 4096 tokens in v0.1; none (sliding_window: null) in v0.2 and v0.3",
           other_presets=("mistralai/Mistral-7B-v0.3",)),
    Family("phi3", "Phi-3", ("phi3",), "microsoft/Phi-3-mini-4k-instruct", ("qkv_proj", "o_proj"),
           ("gate_up_proj", "down_proj"), "all-linear", PHI3, "<s>", "<|endoftext|>", "<|end|>",
           ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), pad="<|endoftext|>",
           sliding_window="every layer, 2047 tokens (Phi-3-mini-4k)",
           other_presets=("microsoft/Phi-3.5-mini-instruct",)),
    Family("phi2", "Phi-2", ("phi",), "microsoft/phi-2", ("q_proj", "k_proj", "v_proj", "dense"), ("fc1", "fc2"),
           ("q_proj", "k_proj", "v_proj", "dense"), None, "<|endoftext|>", "<|endoftext|>", None, ("<|endoftext|>",),
           gated_mlp=False),
    Family("qwen3_moe", "Qwen 3 MoE", ("qwen3_moe",), "Qwen/Qwen3-30B-A3B", ATTENTION, (), "all-linear", QWEN3,
           None, "<|im_end|>", "<|im_end|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
           pad="<|endoftext|>", experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
           router=("mlp.gate.weight",), dense_mlp_when=("mlp_only_layers", "decoder_sparse_step")),
)
BY_NAME = {family.name: family for family in FAMILIES}


def for_model_type(model_type: str | None) -> Family | None:
    """The family of a transformers model_type (config.json's "model_type"); None when the runner has none."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def for_hub_id(hub_id: str) -> Family | None:
    """The family whose preset (or other known hub id) this is, case-insensitively; None otherwise."""
    return next((f for f in FAMILIES if hub_id.lower() in (h.lower() for h in f.hub_ids)), None)


def local_config(recipe: dict) -> dict | None:
    """config.json of the recipe's model when it is a local folder (recipe.load made local paths absolute)."""
    path = Path(recipe["model"]["name_or_path"]) / "config.json"
    if not path.is_absolute() or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading says what is wrong with it, with the whole error
    return config if isinstance(config, dict) else None


def of_recipe(recipe: dict) -> tuple[Family | None, dict | None]:
    """The family of the recipe's model, from its local config.json or else its hub id; and that config."""
    config = local_config(recipe)
    if config is not None:
        return for_model_type(config.get("model_type")), config
    return for_hub_id(recipe["model"]["name_or_path"]), None


def check_targets(recipe: dict) -> Family | None:
    """lora.target_modules against the family's linear names, without torch (``runner validate``); the family
    checked, or None when the model's family is not known here (training checks the targets on the model itself)."""
    lora = recipe["lora"]
    family, config = of_recipe(recipe)
    if family is None or lora is None or lora["target_modules"] == "all-linear":
        return family
    available = family.linear_for(config or {})
    for i, name in enumerate(lora["target_modules"]):
        if name not in available:
            close = difflib.get_close_matches(name, available, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            extra = (f"; its experts ({', '.join(family.experts)}) and router are not linear modules: "
                     "all-linear reaches them" if family.experts else "")
            raise RecipeError(f"lora.target_modules[{i}]", f"{family.title} ({family.model_types[0]}) has no linear "
                              f"module {name!r}", f"{hint}its linear modules: {', '.join(available)}{extra}")
    return family
