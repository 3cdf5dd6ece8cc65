"""Export a trained SoKA adapter as a plain PEFT LoRA adapter for the original base model (e.g. to serve with vLLM).

Per adapted ``(out, in)`` module the update applicable to the *original* base weight ``W`` is

* ``init="kpsvd"`` / ``"gradient"`` (the frozen base is the residual ``W − ΔW0``):
  ``D = alpha · (Σ_k A_eff_k ⊗ B_k − Σ_k A0_k ⊗ B0_k)``;
* ``init="zero"`` (the base is ``W``): ``D = alpha · Σ_k A_eff_k ⊗ B_k``.

``D`` is formed in fp32 and replaced by its truncated SVD ``D_r = U_r diag(σ_r) V_rᵀ``, split as
``lora_B = U_r diag(√σ_r)``: ``(out, r)`` and ``lora_A = diag(√σ_r) V_rᵀ``: ``(r, in)``, so that
``lora_B @ lora_A = D_r``; with ``lora_alpha = r`` PEFT's (and vLLM's) scaling ``lora_alpha / r`` is exactly 1.
By Eckart–Young ``D_r`` is the best rank-``r`` approximation and its relative error is
``‖D − D_r‖_F / ‖D‖_F = √(Σ_{i>r} σ_i²) / √(Σ_i σ_i²)``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from ..kron.apply import kron_delta
from .config import SokaConfig
from .layer import SokaLayer

SAFETENSORS_NAME = "adapter_model.safetensors"
REPORT_NAME = "export_report.json"
# the values vLLM accepts for --max-lora-rank (its LoRA slots are allocated at that rank)
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class ModuleExport:
    """One exported module: ``shape = (out, in)``; ``rank`` singular components stored (the file's ``r``, or
    ``min(out, in)`` where that is smaller, or 0 where ``D == 0``); ``error = ‖D − D_rank‖_F / ‖D‖_F`` (0 where
    ``D == 0``); ``rank_needed``: the smallest rank with error ≤ ``max_error`` (``None`` when exporting a
    fixed rank)."""

    name: str
    shape: tuple[int, int]
    rank: int
    error: float
    rank_needed: int | None


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote: the uniform LoRA rank ``r`` of the file and one row per module."""

    output_dir: Path
    r: int
    max_error: float | None
    modules: list[ModuleExport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_module_error(self) -> float:
        """The largest relative Frobenius error over the modules."""
        return max((m.error for m in self.modules), default=0.0)

    @property
    def vllm_max_lora_rank(self) -> int | None:
        """The smallest ``--max-lora-rank`` vLLM accepts that fits ``r`` (``None`` above its largest)."""
        return next((v for v in VLLM_MAX_LORA_RANKS if v >= self.r), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "r": self.r,
            "lora_alpha": self.r,
            "max_error": self.max_error,
            "max_module_error": self.max_module_error,
            "vllm_max_lora_rank": self.vllm_max_lora_rank,
            "seconds": self.seconds,
            "modules": [{**asdict(m), "shape": list(m.shape)} for m in self.modules],
        }

    def to_markdown(self) -> str:
        """A markdown table: module, shape, rank, relative error, rank needed for ``max_error``."""
        needed = f"rank for error ≤ {self.max_error:g}" if self.max_error is not None else "rank needed"
        lines = [
            f"| module | shape (out, in) | rank | rel. Frobenius error | {needed} |",
            "|---|---|---|---|---|",
        ]
        for m in self.modules:
            rank_needed = "–" if m.rank_needed is None else str(m.rank_needed)
            lines.append(
                f"| {m.name} | {m.shape[0]}×{m.shape[1]} | {m.rank} | {m.error:.3e} | {rank_needed} |"
            )
        return "\n".join(lines)


def check_rank_args(rank: int | None, max_error: float | None) -> None:
    """Exactly one of ``rank`` (an integer ≥ 1) and ``max_error`` (in the open interval (0, 1))."""
    if (rank is None) == (max_error is None):
        raise ValueError("give exactly one of rank (an integer >= 1) and max_error (a float in (0, 1))")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if max_error is not None and not (isinstance(max_error, (int, float)) and 0.0 < max_error < 1.0):
        raise ValueError(f"max_error must be a float in the open interval (0, 1), got {max_error!r}")


def lora_delta(layer: SokaLayer, adapter_name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """``D``, the layer's update relative to the original base weight, in fp32: ``(out, in)`` (module docstring).

    The two Kronecker sums are formed separately (not as one ``2r``-term sum) so that untrained kpsvd factors,
    bitwise equal to their init, give exactly ``D = 0``.
    """
    if adapter_name in layer._soka_pending:
        raise RuntimeError(
            f"SoKA adapter {adapter_name!r} has no loaded weights (created from a saved config)"
        )
    a, b = layer.effective_factors(adapter_name)
    device = a.device if device is None else torch.device(device)
    with torch.no_grad():
        delta = kron_delta(a.detach().to(device, torch.float32), b.detach().to(device, torch.float32))
        if adapter_name in layer.soka_A0:  # kpsvd / gradient: the base was W − ΔW0
            a0, b0 = layer.soka_A0[adapter_name], layer.soka_B0[adapter_name]
            delta = delta - kron_delta(a0.to(device, torch.float32), b0.to(device, torch.float32))
        return layer.scaling[adapter_name] * delta


def tail_errors(sigma: torch.Tensor) -> torch.Tensor:
    """``e[r] = √(Σ_{i≥r} σ_i²) / √(Σ_i σ_i²)`` for ``r = 0 … k`` from ``sigma: (k,)`` (descending), in fp64:
    ``(k + 1,)``, ``e[k] = 0``. The tail sums run from the small end so small errors are not lost to
    cancellation; all zeros where ``σ == 0``."""
    energy = sigma.to(torch.float64).square()
    tails = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    total = tails[0]
    if total == 0:
        return torch.zeros_like(tails)
    return (tails / total).sqrt()


def smallest_rank(errors: torch.Tensor, bound: float) -> int:
    """The smallest ``r`` with ``errors[r] ≤ bound``, for ``errors: (k + 1,)`` from :func:`tail_errors`
    (non-increasing, ``errors[k] = 0``)."""
    return int(torch.nonzero(errors <= bound)[0, 0])


def truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(lora_A: (rank, in), lora_B: (out, rank), kept, error)`` for ``delta: (out, in)``, on the CPU in fp32.

    With ``D = U diag(σ) Vᵀ`` and ``kept = min(rank, min(out, in))``: ``lora_A = diag(√σ) Vᵀ`` and
    ``lora_B = U diag(√σ)`` on the top ``kept`` components (balanced factors: neither carries all of σ's range,
    which matters when a server runs them in 16 bits), zero rows/columns beyond; ``error = ‖D − lora_B·lora_A‖_F
    / ‖D‖_F`` from the singular values. ``D == 0`` gives zero factors, ``kept = 0`` and ``error = 0``.
    """
    out_features, in_features = delta.shape
    lora_a, lora_b = torch.zeros(rank, in_features), torch.zeros(out_features, rank)
    if not torch.any(delta):
        return lora_a, lora_b, 0, 0.0
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    lora_a[:kept] = (root[:, None] * vh[:kept]).cpu()
    lora_b[:, :kept] = (u[:, :kept] * root).cpu()
    return lora_a, lora_b, kept, float(tail_errors(s)[kept])


def _soka_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, SokaLayer]]:
    """``(name in the base model, layer)`` of every module carrying ``adapter_name``."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, SokaLayer) and adapter_name in module.soka_A:
            found.append((name.removeprefix("base_model.model."), module))
    return found


def export_lora(
    model: nn.Module,
    output_dir: str | os.PathLike,
    rank: int | None = None,
    max_error: float | None = None,
    adapter_name: str = "default",
    device: torch.device | str | None = None,
) -> LoraExport:
    """Write the SoKA adapter ``adapter_name`` of ``model`` (a ``PeftModel``) as a plain PEFT LoRA adapter.

    ``output_dir`` receives ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha = r``, the adapted
    modules' full names as ``target_modules``), ``adapter_model.safetensors`` with
    ``base_model.model.<module>.lora_A.weight``: ``(r, in)`` and ``...lora_B.weight``: ``(out, r)`` (fp32) as PEFT
    saves a LoRA, and ``export_report.json`` (:meth:`LoraExport.to_dict`). Load it on the original, untouched
    base model with ``PeftModel.from_pretrained`` (no SoKA import needed) or serve it with vLLM.

    Exactly one of ``rank`` (the same ``r`` for every module) and ``max_error`` (per module the smallest rank
    ``r_i`` with relative Frobenius error ≤ ``max_error``, and ``r = max_i r_i``) is given. ``D`` is computed on
    ``device`` (default: where the factors are).

    Why one uniform ``r`` and no ``rank_pattern``: vLLM versions before its ``rank_pattern`` support read only
    ``r`` and ``lora_alpha`` (scaling ``lora_alpha / r`` for every module), and other LoRA consumers do the same,
    so per-module ranks would load with wrong scales there; a uniform ``r`` with ``lora_alpha = r`` has scaling
    1 everywhere. It costs nothing at serving time, since vLLM runs every module at ``--max-lora-rank`` anyway,
    so each module stores its top ``r`` components (not only ``r_i``): its error is ≤ the bound, often lower.
    Modules with ``min(out, in) < r`` are padded with zero rows/columns; ``D == 0`` gives zero factors.
    """
    check_rank_args(rank, max_error)
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if not isinstance(config, SokaConfig):
        raise ValueError(f"{adapter_name!r} is not a SoKA adapter of this model")
    if config.modules_to_save:
        raise ValueError(
            f"adapter {adapter_name!r} trains whole modules ({config.modules_to_save}); a LoRA adapter for "
            "serving cannot carry them"
        )
    layers = _soka_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"no module carries the SoKA adapter {adapter_name!r}")

    start = time.perf_counter()
    # one module's D and SVD in memory at a time: keeping every module's full U and Vᵀ until r is known would
    # take twice the adapted weights' size in fp32
    needed: dict[str, int] = {}
    if max_error is not None:  # first pass, singular values only (cheaper than vectors), to fix the file's r
        for name, layer in layers:
            delta = lora_delta(layer, adapter_name, device)
            needed[name] = smallest_rank(tail_errors(torch.linalg.svdvals(delta)), max_error)
    r = rank if rank is not None else max(1, *needed.values())  # PEFT and vLLM need r >= 1
    state: dict[str, torch.Tensor] = {}
    rows: list[ModuleExport] = []
    for name, layer in layers:
        delta = lora_delta(layer, adapter_name, device)
        lora_a, lora_b, kept, error = truncated_factors(delta, r)
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = lora_a
        state[f"{prefix}.lora_B.weight"] = lora_b
        rows.append(ModuleExport(name, (lora_b.shape[0], lora_a.shape[1]), kept, error, needed.get(name)))

    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,  # scaling lora_alpha / r = 1: the factors carry the update as it is
        target_modules=[name for name, _ in layers],
        lora_dropout=0.0,
        bias="none",
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(out))
    save_file(state, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
    report = LoraExport(out, r, max_error, rows, seconds=time.perf_counter() - start)
    (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
