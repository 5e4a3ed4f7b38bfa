"""Speed and memory: the memory model (peak GPU memory from the config alone), the speed profiles that lay out the
work on the card at hand, the training time predicted from measured throughput, and ``runner plan``.

May import: common, recipe, model.
"""
