"""Shipping a finished run: the adapter merged into the dequantized base, written as a plain transformers model
folder.

May import: common, recipe, store, data, model, evaluate.
"""
