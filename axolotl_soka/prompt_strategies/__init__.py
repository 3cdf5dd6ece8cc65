"""Axolotl dataset strategies (``type: axolotl_soka.prompt_strategies.<task>``) with the evaluation prompts.

Each one tokenizes :func:`axolotl_soka.prompts.build_prompt` (masked unless ``train_on_inputs``) followed by
:func:`axolotl_soka.prompts.build_target` and EOS, so training text is byte-identical to evaluation prompts.
"""
