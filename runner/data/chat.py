"""Chat data: conversations (``prompt.messages``, TRL's conversational format) and the one chat template that renders
them in training, evaluation, comparison and generation.

A conversation is a list of ``{role, content}`` turns ending with an assistant turn. Training hands the whole
conversation to TRL with ``assistant_only_loss``: the loss covers the assistant turns only, as the template's
``{% generation %}`` markers delimit them (content and end-of-turn marker). Evaluation predicts the last assistant
turn: its prompt is the conversation before it plus the template's generation prompt, rendered by the same template
(set on the tokenizer here, once, and saved with the adapter), and its reference is that turn's content.

Nothing here imports torch or transformers at module level: ``runner validate`` runs ``check_recipe``.
"""

from __future__ import annotations

import difflib
import re

from runner.common.errors import RecipeError, short
from runner.recipe.checks import is_chat  # chat.is_chat: the recipe layer's one test of chat data

ROLES = ("system", "user", "assistant", "tool")
# ChatML with {% generation %} markers around each assistant turn's content and <|im_end|>, so TRL's assistant mask
# covers the end-of-turn marker too and the model learns to stop. Written on few lines: whitespace in a Jinja
# template is output.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{%- else -%}{{- message['content'] + '<|im_end|>' -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
BUILTINS = {"chatml": CHATML}
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as trl.chat_template_utils.has_generation_markers
_PROBE = "PROBE-ANSWER-7"  # assistant content the end-of-turn probe looks for


def check_recipe(recipe: dict) -> None:
    """The chat template a chat recipe names (no data, no tokenizer): a built-in, null (the tokenizer's own) or
    Jinja with {% generation %} markers. A recipe check (runner.cli.recipes), after the prompt's shape."""
    if not is_chat(recipe):
        return
    template = recipe["prompt"].get("chat_template")
    if template is None or template in BUILTINS:
        return
    if "{{" not in template and "{%" not in template:
        close = difflib.get_close_matches(template, list(BUILTINS), n=1)
        raise RecipeError("prompt.chat_template", f"{short(template, 40)!r} is neither a built-in template nor Jinja",
                          f"did you mean {close[0]!r}?" if close else
                          f"built-in: {', '.join(BUILTINS)}; null = the tokenizer's own; or a Jinja chat template")
    if not _GENERATION.search(template):
        raise RecipeError("prompt.chat_template", "has no {% generation %} markers, so the assistant turns cannot be "
                          "told apart for the loss", "wrap each assistant turn's output (content and end-of-turn) in "
                          "{% generation %}...{% endgeneration %}")


# ---------------------------------------------------------------- the template on the tokenizer


def attach(recipe: dict, tokenizer) -> None:
    """Set the recipe's chat template on ``tokenizer`` (so TRL, rendering and the saved adapter's tokenizer all use
    it) and check that it renders a conversation and ends an assistant turn with something the model can learn."""
    if not is_chat(recipe):
        return
    name = recipe["prompt"]["chat_template"]
    if name is None:
        text = _tokenizer_training_template(tokenizer)
    else:
        text = BUILTINS.get(name, name)
    tokenizer.chat_template = text
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _PROBE}]
    try:
        full = tokenizer.apply_chat_template(probe, tokenize=False)
        prompt = tokenizer.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True)
        masked = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
    except Exception as exc:  # jinja2's TemplateError and friends: the recipe's template is broken
        raise RecipeError("prompt.chat_template", f"does not render a conversation: {type(exc).__name__}: "
                          f"{short(exc, 150)}", "fix the Jinja template") from None
    trained = tokenizer.decode([t for t, m in zip(masked["input_ids"], masked["assistant_masks"]) if m])
    if _PROBE not in trained:
        raise RecipeError("prompt.chat_template", "marks no assistant tokens for the loss",
                          "put {% generation %}...{% endgeneration %} around the assistant turn's output")
    at = full.find(_PROBE)
    if not full.startswith(prompt) or at < len(prompt):
        raise RecipeError("prompt.chat_template", "renders the conversation before the last assistant turn "
                          "differently with and without that turn, so training and inference would see different "
                          "prompts", "make add_generation_prompt output exactly what precedes an assistant turn")
    end = full[at + len(_PROBE):].strip()
    if not end:
        raise RecipeError("prompt.chat_template", "writes nothing after an assistant turn, so the model never learns "
                          "where an answer ends", "end each assistant turn with a marker, e.g. <|im_end|> or the EOS")
    if end not in trained[trained.index(_PROBE):]:
        raise RecipeError("prompt.chat_template", f"leaves the end of an assistant turn ({short(end, 20)!r}) out of "
                          "the loss, so the model never learns to stop", "move {% endgeneration %} after it")
    tokenizer.runner_turn_end = end
    tokenizer.runner_answer_prefix = full[len(prompt):at]  # what the template writes before an answer (Mistral: " ")


class _StopTokenWarning:
    """TRL warns that the end-of-turn "token" is not trained when it is not one added token (ChatML's <|im_end|> as
    plain text). attach checked that the end of turn is inside the loss mask, so the warning is wrong here."""

    @staticmethod
    def filter(record) -> bool:
        return "end-of-turn token in the loss mask" not in record.getMessage()


def quiet_trl_stop_token_warning() -> None:
    import logging

    logging.getLogger("trl.trainer.sft_trainer").addFilter(_StopTokenWarning)


def _tokenizer_training_template(tokenizer) -> str:
    """The tokenizer's own chat template, in TRL's training variant when it lacks {% generation %} markers (TRL ships
    those for the templates of the common model families)."""
    from trl.chat_template_utils import get_training_chat_template

    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    if not own:
        raise RecipeError("prompt.chat_template", "is null (the tokenizer's own), but the tokenizer has none",
                          f"name one: {', '.join(BUILTINS)}, or give a Jinja chat template")
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        raise RecipeError("prompt.chat_template", "the tokenizer's own template has no {% generation %} markers and "
                          "TRL has no training variant of it", f"name a built-in ({', '.join(BUILTINS)}) or give "
                          "that template with {% generation %}...{% endgeneration %} around assistant turns") from None
    return own if patched is None else patched


def turn_end(tokenizer) -> str:
    """The text that closes an assistant turn (``<|im_end|>`` for ChatML), found by ``attach``."""
    return tokenizer.runner_turn_end


def answer_prefix(tokenizer) -> str:
    """The text a chat template puts between its generation prompt and an answer's content (found by ``attach``):
    "" for most, a space for Mistral's "[/INST] answer"; rank mode scores each label after it, as trained."""
    return tokenizer.runner_answer_prefix


def completion_end(recipe: dict, tokenizer) -> str:
    """What training puts after a completion, for scoring it as trained: EOS, or a chat template's end of turn."""
    return turn_end(tokenizer) if is_chat(recipe) else tokenizer.eos_token


def cut_partial_end(recipe: dict, tokenizer, text: str) -> str:
    """A prediction cut off by max_new_tokens in the middle of the end-of-turn marker (``Sports<|im``) loses that
    start of the marker: it is not part of the answer. Two characters at least, so one ``<`` of content stays."""
    if not is_chat(recipe):
        return text
    end = turn_end(tokenizer)
    for size in range(len(end) - 1, 1, -1):
        if text.endswith(end[:size]):
            return text[:-size].strip()
    return text


def stop_strings(recipe: dict, tokenizer) -> list[str]:
    """``generation.stop``, plus a chat template's end of turn when that is not simply EOS (generation stops there)."""
    stops = list(recipe["generation"]["stop"])
    if is_chat(recipe) and turn_end(tokenizer) != tokenizer.eos_token and turn_end(tokenizer) not in stops:
        stops.append(turn_end(tokenizer))
    return stops


# ---------------------------------------------------------------- conversations


def check_turns(messages, where: str, final_assistant: bool = True) -> list[dict]:
    """``messages`` as a list of {role, content} dicts, or a RecipeError naming the row (``where``) and the turn."""
    if not isinstance(messages, list) or not messages:
        raise RecipeError("prompt.messages", f"{where}: is not a list of {{role, content}} turns "
                          f"(got {type(messages).__name__})", "each conversation is a list like "
                          "[{role: user, content: ...}, {role: assistant, content: ...}]")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RecipeError("prompt.messages", f"{where}: messages[{i}] is not a {{role, content}} turn",
                              "each turn has a role and a content")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            raise RecipeError("prompt.messages", f"{where}: messages[{i}].role {short(role, 30)!r} is not a chat "
                              "role", (f"did you mean {close[0]!r}? " if close else "") + f"roles: {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise RecipeError("prompt.messages", f"{where}: messages[{i}].content is empty",
                              "every turn needs text; fix or drop that conversation")
    if final_assistant and messages[-1]["role"] != "assistant":
        raise RecipeError("prompt.messages", f"{where}: the conversation ends with a {messages[-1]['role']} turn",
                          "end every conversation with the assistant turn the model learns to write")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def render_prompt(tokenizer, history: list[dict]) -> str:
    """The conversation so far plus the generation prompt, as text the runner tokenizes as usual (with the
    tokenizer's special tokens): a BOS the template writes itself is left out when the tokenizer adds one anyway,
    so the prompt's tokens are the template's, with one BOS, as in training."""
    text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def looks_like_chat(value) -> bool:
    """A column value that is a conversation (a list of dicts with a role), e.g. under a prompt template by mistake."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def render_batch(rows: dict, recipe: dict, tokenizer) -> dict:
    """Chat rows -> the runner's example columns: prompt (the turns before the last, + generation prompt), completion
    (the last assistant turn's content: the reference), n_tokens (the whole conversation as TRL tokenizes it),
    and messages (what TRL trains on)."""
    column = recipe["prompt"]["messages"]
    n = len(rows[column])
    ids = rows.get("id") or [None] * n
    conversations = [check_turns(m, f"row {ids[i] if ids[i] is not None else i}") for i, m in enumerate(rows[column])]
    counts = [len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"])
              for c in conversations]
    return {"prompt": [render_prompt(tokenizer, c[:-1]) for c in conversations],
            "completion": [c[-1]["content"] for c in conversations], "n_tokens": counts, "truncated": [False] * n,
            "id": [str(x) if x is not None else None for x in ids], "messages": conversations}
