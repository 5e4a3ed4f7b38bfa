"""The recipe: YAML in, a validated recipe (a plain dict) out. Safe loading, ``extends:`` and ``key.path=value``
overrides, the JSON Schema (schema/recipe.schema.json, the one place recipe keys are defined), its errors in the
recipe's words, the evaluators a recipe names, the rules between its keys (checks), and prompt templates. Rules that
need a stage's knowledge live in that stage; runner.cli.recipes runs them all, in one declared order.

The bottom of the runner: ``runner validate`` answers without torch or transformers, and nothing here imports a
stage above it.

May import: common, evaluators.
"""
