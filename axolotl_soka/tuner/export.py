"""Export a trained ``kpsvd`` (or ``gradient``) SoKA adapter as a residual-free adapter for the untouched model.

A ``kpsvd`` or ``gradient`` adapter trains on the residual base ``W − ΔW0``. Its effect on the original ``W`` is
``ΔW_trained − ΔW0 = alpha · (Σ A_eff_k ⊗ B_k − Σ A0_k ⊗ B0_k) = alpha · Σ [A_eff; A0]_k ⊗ [B; −B0]_k``: itself a
SoKA adapter with ``2r`` terms and zero init semantics (no residual), the Kronecker analogue of PEFT's
PiSSA-to-LoRA conversion.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .layer import SokaLayer

SAFETENSORS_NAME = "adapter_model.safetensors"


def export_delta_adapter(
    peft_model: PeftModel, output_dir: str | os.PathLike, adapter_name: str = "default"
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of the ``2r``-term delta adapter.

    Load the result with ``PeftModel.from_pretrained(original_model, output_dir)``.
    """
    config = peft_model.peft_config[adapter_name]
    if getattr(config, "init", None) not in ("kpsvd", "gradient"):
        raise ValueError(
            f"adapter {adapter_name!r} has init={getattr(config, 'init', None)!r}: only kpsvd and gradient adapters "
            "change the base weight, a zero-init adapter already loads on the original model as it is"
        )
    saved_keys = get_peft_model_state_dict(peft_model, adapter_name=adapter_name).keys()
    prefixes = [k.removesuffix("soka_A") for k in saved_keys if k.endswith(".soka_A")]
    state: dict[str, torch.Tensor] = {}
    ranks = dict(config.rank_pattern)
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, SokaLayer) or adapter_name not in module.soka_A:
            continue
        prefix = next((p for p in prefixes if p.endswith(f"{name}.")), None)
        if prefix is None:
            raise RuntimeError(f"no saved SoKA tensors found for module {name!r}")
        a_eff, b = module.effective_factors(adapter_name)
        a0, b0 = module.soka_A0[adapter_name], module.soka_B0[adapter_name]
        state[prefix + "soka_A"] = torch.cat([a_eff.detach().float(), a0.float()]).contiguous().cpu()
        state[prefix + "soka_B"] = torch.cat([b.detach().float(), -b0.float()]).contiguous().cpu()
        ranks[name] = int(state[prefix + "soka_A"].shape[0])
    delta_config = copy.deepcopy(config)
    delta_config.init = "zero"
    delta_config.init_source = "weight"
    delta_config.sigma_mode = "sqrt"
    delta_config.rank_pattern = ranks
    delta_config.resolved = True
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    delta_config.save_pretrained(str(out))
    save_file(state, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
    return out
