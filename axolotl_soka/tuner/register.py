"""Register SoKA with PEFT (``get_peft_model``, ``PeftModel.from_pretrained``, save and merge) on peft 0.20 and 0.21."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import SokaConfig
from .model import SokaModel
from .peft_type import SOKA_PEFT_TYPE


def register() -> None:
    """Idempotent: importing ``axolotl_soka`` calls it; every process that loads a SoKA adapter must import it."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(SOKA_PEFT_TYPE) is SokaModel:
        return
    register_peft_method(name="soka", config_cls=SokaConfig, model_cls=SokaModel)
