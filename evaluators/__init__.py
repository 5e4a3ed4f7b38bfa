"""Pluggable evaluators: each turns prediction records into metrics (and maybe files in the run folder).

A recipe names a built-in (``rouge``, ``samples``) or its own class as ``package.module:ClassName``.
"""

BUILTINS = {
    "rouge": "evaluators.rouge:Rouge",
    "samples": "evaluators.samples:Samples",
    "loss": "evaluators.loss:Loss",
}
