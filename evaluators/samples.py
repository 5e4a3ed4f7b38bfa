"""A readable markdown table of examples: input (shortened), reference and prediction."""

from __future__ import annotations

from pathlib import Path

from evaluators.base import Evaluator, Record
from runner import safeio


def cell(text: str, limit: int | None = None) -> str:
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        half = (limit - 5) // 2
        text = f"{text[:half]} [...] {text[-half:]}"
    return text.replace("|", "\\|") or " "


class Samples(Evaluator):
    name = "samples"

    def __init__(self, count=8, input_chars=300, **kw):
        super().__init__(**kw)
        self.count = count
        self.input_chars = input_chars

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        shown = sorted(records, key=lambda r: r.index)[: self.count]
        lines = ["| # | input | reference | prediction |", "|---|---|---|---|"]
        for r in shown:
            lines.append(f"| {r.index} | {cell(r.prompt, self.input_chars)} | {cell(r.reference)} | "
                         f"{cell(r.prediction)} |")
        safeio.write_text(out_dir / "samples.md", "# Samples\n\n" + "\n".join(lines) + "\n")
        return {"count": len(shown), "file": "samples.md"}
