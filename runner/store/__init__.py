"""The run folder: ``<output_dir>/<name>/<timestamp>/``, its saved recipe and env.json, and checkpoints that count
only when complete.

May import: common, recipe.
"""
