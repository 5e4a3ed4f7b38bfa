"""A readable markdown table of examples: input (shortened), reference and prediction."""

from __future__ import annotations

from pathlib import Path

from evaluators.base import Evaluator, Record
from runner.common import safeio
from runner.common.markdown import cell


class Samples(Evaluator):
    """A markdown table (samples.md) of input, reference and prediction."""

    name = "samples"
    metrics = ()  # a table to read, no numbers
    params_schema = {"properties": {
        "count": {"type": "integer", "minimum": 1, "default": 8, "description": "How many examples samples.md shows."},
        "input_chars": {"type": "integer", "minimum": 20, "default": 300,
                        "description": "Inputs longer than this are shortened in the table."}}}

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
