"""Prompt templates: ``{field}`` text filled from a data row. The one place templates are parsed, rendered and read
back; a leaf module (it imports only the error type), so recipe checks, data, rank mode, inference and baselines
share it without importing one another.
"""

from __future__ import annotations

import re
import string

from runner.common.errors import RecipeError


def _parse(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    """(literal text, field name or None, format spec, conversion) pieces, as ``str.format`` reads them."""
    return list(string.Formatter().parse(template))


def template_fields(template: str, key_path: str) -> list[str]:
    """Field names used by a ``{field}`` template, in order of first use; a malformed template is the recipe's
    mistake at ``key_path``."""
    try:
        parsed = _parse(template)
    except ValueError as exc:
        raise RecipeError(key_path, f"bad template: {exc}", "write {field} for a column and {{ }} for braces") from None
    fields = []
    for _, field, spec, conv in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise RecipeError(key_path, f"bad template field {{{field}}}",
                              "use a plain column name like {document}; {{ }} for literal braces")
        if spec or conv:
            raise RecipeError(key_path, f"template field {{{field}}} has a format spec or conversion",
                              "write plain {field}")
        if field not in fields:
            fields.append(field)
    return fields


def text(value, separator: str) -> str:
    """A row's value as a template writes it: a list joined by ``separator``, None as nothing."""
    if value is None:
        return ""
    if isinstance(value, list):
        return separator.join(text(v, separator) for v in value)
    return str(value)


def render(template: str, row: dict, separator: str = ", ") -> str:
    fields = {name: text(row.get(name), separator) for _, name, _, _ in _parse(template) if name is not None}
    return template.format(**fields)


def unrender(template: str, prompt: str) -> dict[str, str] | None:
    """The field values that ``template`` was filled with to give ``prompt``; None when it does not match."""
    pattern, seen = "", set()
    for literal, field, _, _ in _parse(template):
        pattern += re.escape(literal)
        if field is None:
            continue
        pattern += f"(?P={field})" if field in seen else f"(?P<{field}>.*?)"
        seen.add(field)
    match = re.fullmatch(pattern, prompt, flags=re.DOTALL)
    return match.groupdict() if match else None
