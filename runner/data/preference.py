"""Preference pairs (training.method dpo, orpo, kto): each row's prompt with a chosen and a rejected answer, checked
and fitted to ``prompt.max_length`` before any weight loads, and what `runner inspect` reports of them.

Two forms. Template form: ``prompt.template`` renders the prompt, ``prompt.chosen`` and ``prompt.rejected`` the two
answers (templates over the row's fields, EOS appended as TRL appends it). Chat form: ``prompt.messages`` holds the
conversation so far (ending with a user turn) and ``prompt.chosen`` / ``prompt.rejected`` each name the column
holding one final assistant turn (TRL's conversational preference format). The pair roles (train and eval: the
trainer's pairs, runner.recipe.checks.pair_roles) are rendered here; the evaluation split goes through
runner.data.data as for sft.
"""

from __future__ import annotations

import numpy as np

from runner.common.errors import RecipeError
from runner.data import chat
from runner.data import data as data_mod
from runner.recipe.methods import pair_roles
from runner.recipe.templates import render, template_fields

SIDES = ("chosen", "rejected")


def side_column(recipe: dict, side: str) -> str:
    """Chat form: the column ``prompt.<side>`` names ({column}, checked by runner.recipe.checks.check_method)."""
    return template_fields(recipe["prompt"][side], f"prompt.{side}")[0]


def _where(role: str, i: int, row_id) -> str:
    return f"{role} row {i}" + (f" (id {row_id})" if row_id is not None else "")


def check_pair(chosen, rejected, where: str) -> None:
    """An empty side, or two sides that say the same, teach nothing: refused, naming the row."""
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        content = value if isinstance(value, str) else " ".join(t["content"] for t in value)
        if not content.strip():
            raise RecipeError(f"prompt.{side}", f"{where}: the {side} answer is empty",
                              "every pair needs two non-empty answers; fix or drop that row")
    if chosen == rejected:
        raise RecipeError("prompt.rejected", f"{where}: the chosen and rejected answers are identical",
                          "a pair must differ to say which answer is preferred; fix or drop that row")


def _assistant_turn(value, where: str, side: str) -> list[dict]:
    """One final assistant turn, from text, a {role, content} turn, or a list of one such turn."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    turns = value if isinstance(value, list) else [value]
    if len(turns) != 1 or not isinstance(turns[0], dict) or turns[0].get("role") != "assistant":
        raise RecipeError(f"prompt.{side}", f"{where}: is not one assistant turn",
                          "give text, {role: assistant, content: ...}, or a list of one such turn")
    return [{"role": "assistant", "content": turns[0].get("content") or ""}]


def _count(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) + 1 for ids in tokenizer(texts)["input_ids"]]  # + EOS, which TRL appends to each side


def fit_batch(rows: dict, recipe: dict, tokenizer, role: str) -> dict:
    """Template form: render each pair; shorten ``prompt.truncate`` (in tokens) until prompt + the longer side + EOS
    fits max_length. Columns: prompt, chosen, rejected, n_chosen, n_rejected, n_tokens (the longer), truncated, id."""
    cfg = recipe["prompt"]
    sep, max_length = cfg["list_separator"], cfg["max_length"]
    n = len(next(iter(rows.values())))
    ids = rows.get("id") or [None] * n
    cap = data_mod.char_cap(tokenizer, max_length)
    examples = [{k: data_mod.cap_text(rows[k][i], cap, sep) for k in rows} for i in range(n)]
    prompts = [render(cfg["template"], ex, sep) for ex in examples]
    sides = {side: [render(cfg[side], ex, sep) for ex in examples] for side in SIDES}
    for i in range(n):
        check_pair(sides["chosen"][i], sides["rejected"][i], _where(role, i, ids[i]))
    counts = {side: _count(tokenizer, [p + s for p, s in zip(prompts, sides[side], strict=True)]) for side in SIDES}
    truncated = [False] * n
    for i in range(n):
        longer = max(SIDES, key=lambda s: counts[s][i])
        if counts[longer][i] <= max_length or cfg["truncate"] is None:
            continue
        cut, _ = data_mod.shorten(examples[i], cfg, tokenizer, counts[longer][i], max_length,
                                  completion=sides[longer][i])
        if cut is not None:
            prompts[i], truncated[i] = cut, True
            for side in SIDES:
                counts[side][i] = _count(tokenizer, [cut + sides[side][i]])[0]
    return {"prompt": prompts, **sides, "n_chosen": counts["chosen"], "n_rejected": counts["rejected"],
            "n_tokens": [max(a, b) for a, b in zip(counts["chosen"], counts["rejected"], strict=True)],
            "truncated": truncated, "id": [str(x) if x is not None else None for x in ids]}


def chat_batch(rows: dict, recipe: dict, tokenizer, role: str) -> dict:
    """Chat form: the conversation so far (ending with a user turn) and one assistant turn per side, counted as
    TRL tokenizes them (the chat template over prompt + side); chat data is never truncated."""
    column = recipe["prompt"]["messages"]
    n = len(rows[column])
    ids = rows.get("id") or [None] * n
    out = {"prompt": [], "chosen": [], "rejected": [], "n_chosen": [], "n_rejected": []}
    for i in range(n):
        where = _where(role, i, ids[i])
        prompt = chat.check_turns(rows[column][i], where, final_assistant=False)
        if prompt[-1]["role"] != "user":
            raise RecipeError("prompt.messages", f"{where}: the conversation ends with a {prompt[-1]['role']} turn",
                              "a preference prompt ends with the user turn that the two answers reply to")
        pair = [_assistant_turn(rows[side_column(recipe, s)][i], where, s) for s in SIDES]
        check_pair(*pair, where)
        out["prompt"].append(prompt)
        for side, turn in zip(SIDES, pair, strict=True):
            out[side].append(turn)
            out[f"n_{side}"].append(len(tokenizer.apply_chat_template(prompt + turn, tokenize=True,
                                                                      return_dict=True)["input_ids"]))
    return {**out, "n_tokens": [max(a, b) for a, b in zip(out["n_chosen"], out["n_rejected"], strict=True)],
            "truncated": [False] * n, "id": [str(x) if x is not None else None for x in ids]}


def render_split(ds, recipe: dict, tokenizer, role: str):
    """One pair role's rows rendered and fitted (columns of fit_batch), before any filtering."""
    data_mod.check_columns(ds, recipe, role)
    return ds.map(chat_batch if chat.is_chat(recipe) else fit_batch, batched=True, batch_size=256,
                  remove_columns=ds.column_names, fn_kwargs={"recipe": recipe, "tokenizer": tokenizer, "role": role},
                  keep_in_memory=True, load_from_cache_file=False)


def prepare(recipe: dict, tokenizer, roles=data_mod.ROLES) -> data_mod.Prepared:
    """data.prepare for a preference recipe: the pair roles rendered here (pairs that do not fit dropped and
    counted), the others (the evaluation split) as for sft; one fingerprint over both."""
    raw = data_mod.sample(data_mod.load_raw(recipe), recipe)
    pairs = [r for r in roles if r in pair_roles(recipe) and raw.get(r) is not None]
    rest = [r for r in roles if r not in pairs]
    out = data_mod.prepare(recipe, tokenizer, roles=tuple(rest), raw={r: raw[r] for r in rest if r in raw}) \
        if rest else data_mod.Prepared()
    limit = recipe["data"]["max_tokens"] or recipe["prompt"]["max_length"]
    digest = out.fingerprint
    for role in pairs:
        rendered = render_split(data_mod.name_labels(raw[role], recipe), recipe, tokenizer, role)
        kept = rendered.filter(lambda n: n <= limit, input_columns="n_tokens", keep_in_memory=True)
        out.splits[role] = kept
        out.stats[role] = {"rows": len(rendered), "kept": len(kept), "truncated": sum(rendered["truncated"]),
                           "dropped_too_long": len(rendered) - len(kept), "dropped_empty_completion": 0, "pairs": True}
        if not len(kept):
            raise RecipeError(f"data.splits.{role}", f"no {role} pair is left after filtering ({out.stats[role]})",
                              "raise prompt.max_length / data.max_tokens or set prompt.truncate")
        digest = _digest(digest, role, kept)
    out.fingerprint = digest
    out.splits = {role: out.splits[role] for role in roles if role in out.splits}  # in the order asked
    out.stats = {role: out.stats[role] for role in roles if role in out.stats}
    return out


def _digest(previous: str, role: str, kept) -> str:
    import hashlib
    import json

    h = hashlib.sha256(previous.encode() + role.encode())
    for row in kept.select_columns(["prompt", *SIDES]).to_list():
        h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()[:16]


def pair_lengths(ds, recipe: dict, tokenizer, role: str) -> tuple[dict, np.ndarray, int]:
    """`runner inspect` of a pair role: token counts per series (the prompt and each side alone in template form,
    and prompt + each side + EOS, what prompt.max_length bounds), the longer side's count per pair, and how many
    prompts training would truncate."""
    rendered = render_split(ds, recipe, tokenizer, role)
    series = {}
    if not chat.is_chat(recipe):
        for name in ("prompt", *SIDES):
            series[name] = np.asarray([len(x) for x in tokenizer(list(rendered[name]))["input_ids"]], dtype=int)
    for side in SIDES:
        series[f"prompt+{side}+EOS"] = np.asarray(rendered[f"n_{side}"], dtype=int)
    return series, np.asarray(rendered["n_tokens"], dtype=int), int(sum(rendered["truncated"]))


def unpaired(ds):
    """KTO's unpaired form (TRL's KTOTrainer): each pair as two rows, the chosen side desirable (label True) and the
    rejected side undesirable (label False)."""
    from trl.data_utils import unpair_preference_dataset

    return unpair_preference_dataset(ds.select_columns(["prompt", *SIDES]))
