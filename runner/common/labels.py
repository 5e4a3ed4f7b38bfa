"""Label names matched as evaluation matches them: case and runs of whitespace ignored (" sci/tech " is "Sci/Tech").

One place for the runner (the recipe's label lists checked against the data, the trivial baselines) and the
labelled evaluators alike. A leaf: it imports nothing of the project.
"""

from __future__ import annotations


def normalize(text: str) -> str:
    """The form two label names are compared in: whitespace runs collapsed, case folded."""
    return " ".join(text.split()).casefold()


def label_lookup(labels: list[str]) -> dict[str, str]:
    """{normalized name: the label as listed}; two labels that normalize alike are a ValueError."""
    lookup = {}
    for label in labels:
        key = normalize(label)
        if key in lookup:
            raise ValueError(f"labels {lookup[key]!r} and {label!r} are the same once case and spaces are ignored")
        lookup[key] = label
    return lookup


def with_unlisted(labels: list[str] | None, gold_names) -> tuple[list[str], list[str]]:
    """(classes, gold names outside ``labels``): the recipe's labels and then, sorted, every gold name they miss
    (a row each, and reported: the list is probably incomplete); without a list, the gold names alone."""
    known = label_lookup(labels) if labels else {}
    seen = {}
    for name in gold_names:
        seen.setdefault(normalize(name), " ".join(name.split()))
    extra = sorted(v for k, v in seen.items() if k not in known)
    return (labels + extra, extra) if labels else (extra, [])
