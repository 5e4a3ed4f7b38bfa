"""The prompt a shipped model expects, in the two template languages that carry it: Jinja (the GGUF's
``tokenizer.chat_template``, as llama.cpp and LM Studio apply it) and Go templates (an Ollama Modelfile's TEMPLATE),
with the stop strings and decoding settings the evaluation used, so ``ollama create`` gives the same prompts.

A template recipe (``prompt.template``) becomes a template that puts the user's message into its main field
(``prompt.truncate``, or its only field), as ``runner generate`` does with a raw text line; a template with several
fields gets no template (the caller fills them in; the card shows the recipe's template). A chat recipe keeps its
chat template (the training markers removed); Ollama gets a Go version of the built-in ChatML, and for any other
chat template Ollama's own detection from the GGUF's template.
"""

from __future__ import annotations

import re

from runner.common.errors import RecipeError
from runner.data import chat
from runner.evaluate import infer

# ChatML (runner.data.chat's built-in) in Ollama's Go template language.
CHATML_GO = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
             '<|im_start|>assistant\n')
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def _main_field(recipe: dict) -> str | None:
    try:
        return infer.main_field(recipe)
    except RecipeError:  # several fields: a raw message cannot fill them
        return None


def _template_parts(recipe: dict) -> tuple[str, str] | None:
    """The recipe's prompt template split around its main field: (before, after); None without one main field."""
    main = _main_field(recipe)
    if main is None:
        return None
    template = recipe["prompt"]["template"]
    before, _, after = template.partition("{" + main + "}")
    return before.replace("{{", "{").replace("}}", "}"), after.replace("{{", "{").replace("}}", "}")


def _jinja_literal(text: str) -> str:
    return "" if not text else "{% raw %}" + text.replace("{% endraw %}", "{% endraw %}{{ '{% endraw %}' }}{% raw %}") \
        + "{% endraw %}"


def jinja_template(recipe: dict, tokenizer) -> str | None:
    """The chat template for the GGUF: the recipe's chat template, or its prompt template around the last user
    message; None for a template with several fields."""
    if chat.is_chat(recipe):
        return _GENERATION_TAG.sub("", tokenizer.chat_template or "") or None
    parts = _template_parts(recipe)
    if parts is None:
        return None
    before, after = parts
    return ("{%- for message in messages -%}{%- if message['role'] == 'user' -%}" + _jinja_literal(before)
            + "{{ message['content'] }}" + _jinja_literal(after) + "{%- endif -%}{%- endfor -%}")


def _go_literal(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def go_template(recipe: dict) -> str | None:
    """Ollama's TEMPLATE: the recipe's prompt around ``{{ .Prompt }}``, or ChatML's; None where Ollama should use
    its own reading of the GGUF's chat template."""
    if chat.is_chat(recipe):
        return CHATML_GO if recipe["prompt"]["chat_template"] == "chatml" else None
    parts = _template_parts(recipe)
    if parts is None:
        return None
    before, after = parts
    return _go_literal(before) + "{{ .Prompt }}" + _go_literal(after)


def _quoted(text: str) -> str:
    """A Modelfile argument: triple quotes keep newlines and quotes as they are."""
    if '"""' in text:
        raise RecipeError("generation.stop", f"{text!r} cannot be written into an Ollama Modelfile",
                          'a stop string or template without """')
    return f'"""{text}"""'


def parameters(recipe: dict, stops: list[str]) -> list[tuple[str, str]]:
    """The recipe's decoding settings as Ollama's PARAMETERs (greedy: temperature 0)."""
    g = recipe["generation"]
    out = [("num_predict", str(g["max_new_tokens"])), ("num_ctx", str(recipe["prompt"]["max_length"]
                                                                      + g["max_new_tokens"]))]
    if g["do_sample"]:
        out += [("temperature", f"{g['temperature']:g}"), ("top_p", f"{g['top_p']:g}")]
        if g["top_k"]:
            out.append(("top_k", str(g["top_k"])))
    else:
        out += [("temperature", "0"), ("top_k", "1")]
    if g["repetition_penalty"] != 1.0:
        out.append(("repeat_penalty", f"{g['repetition_penalty']:g}"))
    out += [("stop", _quoted(s)) for s in stops]
    return out


def modelfile(recipe: dict, gguf_name: str, stops: list[str]) -> str:
    """The Modelfile beside ``gguf_name``: ``ollama create NAME -f Modelfile`` in that folder."""
    lines = [f"# Ollama Modelfile for {recipe['name']}: ollama create {recipe['name']} -f Modelfile",
             "# The prompt, stop strings and decoding settings are the ones its evaluation used.",
             f"FROM ./{gguf_name}"]
    template = go_template(recipe)
    if template is not None:
        lines.append(f"TEMPLATE {_quoted(template)}")
    elif not chat.is_chat(recipe):
        lines.append("# No TEMPLATE: prompt.template has several fields; send the whole prompt, filled in as "
                     "the recipe's template (README.md) shows, and Ollama passes it as it is.")
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    else:
        lines.append("# No TEMPLATE: Ollama reads the chat template stored in the GGUF file.")
    if num_beams := recipe["generation"]["num_beams"]:
        if num_beams > 1:
            lines.append(f"# The evaluation used beam search ({num_beams} beams); Ollama decodes greedily here.")
    lines += [f"PARAMETER {key} {value}" for key, value in parameters(recipe, stops)]
    return "\n".join(lines) + "\n"
