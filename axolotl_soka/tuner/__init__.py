"""SoKA as a PEFT method: ``SokaConfig``, ``SokaModel`` and ``SokaLayer`` (the layout of PEFT's own tuners)."""

from .calibration import GradientCalibration, calibrate_gradients
from .config import FORWARD_MODES, INIT_MODES, INIT_SOURCES, SIGMA_MODES, SokaConfig
from .export import export_delta_adapter
from .layer import SokaLayer, SokaLinear
from .lora_export import LoraExport, ModuleExport, export_lora
from .model import SokaModel
from .peft_type import SOKA_PEFT_TYPE
from .register import register
from .save import save_adapter
from .selection import ModuleSelection

__all__ = [
    "FORWARD_MODES",
    "INIT_MODES",
    "INIT_SOURCES",
    "GradientCalibration",
    "LoraExport",
    "ModuleExport",
    "SIGMA_MODES",
    "SOKA_PEFT_TYPE",
    "ModuleSelection",
    "SokaConfig",
    "SokaLayer",
    "SokaLinear",
    "SokaModel",
    "calibrate_gradients",
    "export_delta_adapter",
    "export_lora",
    "register",
    "save_adapter",
]
