"""The recipe: YAML in, a validated recipe (a plain dict) out. Safe loading, ``extends:`` and ``key.path=value``
overrides, the JSON Schema (schema/recipe.schema.json, the one place recipe keys are defined), its errors in the
recipe's words, the evaluators a recipe names, and prompt templates.

The bottom of the runner: ``runner validate`` answers without torch or transformers.

May import: common, evaluators.
"""
