"""The model: tokenizer, quantized base model, LoRA adapters, the attention kernels a phase runs, LoRA merged into
a dequantized copy, and the tiny offline twins built with the real architecture.

May import: common, recipe, data.
"""
