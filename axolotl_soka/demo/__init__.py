"""Offline demo: SmolLM2-135M-Instruct prepared from PyPI, SoKA training on the shipped GSM8K subset."""
