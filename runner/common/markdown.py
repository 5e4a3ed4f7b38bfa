"""Markdown tables for the files people read (report.md, comparison.md, samples.md, sweep.md): one way to put text
into a table cell. A leaf module."""

from __future__ import annotations


def cell(text, limit: int | None = None) -> str:
    """``text`` on one line, its pipes escaped; longer than ``limit`` characters, its middle cut out."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        half = (limit - 5) // 2
        text = f"{text[:half]} [...] {text[-half:]}"
    return text.replace("|", "\\|") or " "


def table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a table; every value goes through ``cell``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
