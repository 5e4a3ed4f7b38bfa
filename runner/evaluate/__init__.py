"""Evaluation: predictions (generated or ranked) through a backend, the recipe's evaluators over them, metrics in
one shape, trivial baselines, base-vs-adapter comparison, and inference on a user's own inputs.

May import: common, evaluators, recipe, store, data, model, speed.
"""
