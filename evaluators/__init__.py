"""Pluggable evaluators: each turns records (the runner's predictions and scores per example) into metrics (and maybe
files in the run folder).

A recipe names a built-in (``rouge``, ``samples``, ``classification``, ``multilabel``, ``loss``,
``multiple_choice``) or its own class as ``package.module:ClassName``. Built-ins are registered here and nowhere
else: each declares its recipe keys in ``params_schema``, exactly as a user's evaluator does.

May import: common (its stats, labels, safeio and markdown: nothing else of the runner).
"""

from __future__ import annotations

import importlib

BUILTINS = {
    "rouge": "evaluators.rouge:Rouge",
    "samples": "evaluators.samples:Samples",
    "classification": "evaluators.classification:Classification",
    "multilabel": "evaluators.multilabel:Multilabel",
    "loss": "evaluators.loss:Loss",
    "multiple_choice": "evaluators.multiple_choice:MultipleChoice",
}


def builtin(name: str) -> type:
    """The class of the built-in evaluator ``name`` (a key of BUILTINS), imported on first use."""
    module, _, cls_name = BUILTINS[name].partition(":")
    return getattr(importlib.import_module(module), cls_name)
