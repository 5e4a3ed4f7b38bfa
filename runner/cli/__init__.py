"""The command line on top: ``runner <command>`` parses arguments and runs one stage or several (``train`` =
train, evaluate, report; ``sweep`` = a grid of such runs).

May import: common, evaluators, recipe, store, data, model, speed, evaluate, train, report, export.
"""
