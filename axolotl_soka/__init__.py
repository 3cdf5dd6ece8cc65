"""axolotl-soka: SoKA (SVD on Kronecker Adaptation) as a PEFT method and an Axolotl plugin.

``import axolotl_soka`` registers the ``soka`` method with PEFT, so ``peft.get_peft_model(model, SokaConfig(...))``
and ``PeftModel.from_pretrained(model, adapter_dir)`` work.
"""

from .tuner import (
    GradientCalibration,
    LoraExport,
    SokaConfig,
    SokaLayer,
    SokaLinear,
    SokaModel,
    calibrate_gradients,
    export_delta_adapter,
    export_lora,
    register,
    save_adapter,
)

register()

__all__ = [
    "GradientCalibration",
    "LoraExport",
    "SokaConfig",
    "SokaLayer",
    "SokaLinear",
    "SokaModel",
    "SokaPlugin",
    "calibrate_gradients",
    "export_delta_adapter",
    "export_lora",
    "register",
    "save_adapter",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``axolotl_soka.SokaPlugin`` is imported lazily so that the PEFT method works without Axolotl installed."""
    if name == "SokaPlugin":
        from .plugin import SokaPlugin

        return SokaPlugin
    raise AttributeError(f"module 'axolotl_soka' has no attribute {name!r}")
