"""Training: TRL's SFTTrainer set up from the recipe, one ``_setup_*`` per section, checkpoints, divergence
checks, experiment trackers.

May import: common, evaluators, recipe, store, data, model, speed, evaluate.
"""
