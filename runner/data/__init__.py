"""Examples: datasets loaded from the hub or local files, mixtures of them, chat conversations and their template,
rendering into prompt + completion within ``prompt.max_length``, and ``runner inspect``'s statistics.

May import: common, recipe.
"""
