"""report.md for a run, made from the run folder's own files: the recipe in brief, data statistics, training
curves, metrics with their baselines, samples.

May import: common, evaluators, recipe, store, data, model, speed, evaluate.
"""
