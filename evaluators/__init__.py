"""Pluggable evaluators: each turns prediction records into metrics (and maybe files in the run folder).

A recipe names a built-in (``rouge``, ``samples``, ``classification``, ``multilabel``, ...) or its own class as
``package.module:ClassName``.
"""

BUILTINS = {
    "rouge": "evaluators.rouge:Rouge",
    "samples": "evaluators.samples:Samples",
    "classification": "evaluators.classification:Classification",
    "multilabel": "evaluators.multilabel:Multilabel",
    "loss": "evaluators.loss:Loss",
}
