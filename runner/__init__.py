"""Declarative QLoRA recipe runner: a YAML recipe in, a trained adapter, metrics and samples out."""

__version__ = "0.1.0"
