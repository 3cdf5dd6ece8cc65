"""``SokaLayer``: a SoKA adapter on an ``nn.Linear``.

Per adapter: ``soka_A: (r, m, n)``, ``soka_B: (r, p, q)`` and, with ``sigma_mode="separate"``, ``soka_s: (r,)``.
The update is ``ΔW = alpha · Σ_k s_k A_k ⊗ B_k`` (``s ≡ 1`` in ``sqrt`` mode), applied in the forward pass as two
matrix products without forming ``ΔW`` (``forward_mode="factored"``), or, with ``forward_mode="dense"`` on
calls with enough tokens, as one GEMM on ``W + ΔW`` formed transiently (``axolotl_soka.kron.dense_forward``).
With ``init="kpsvd"`` the initial factors are kept as persistent buffers ``soka_A0`` (σ folded in) and
``soka_B0`` and the frozen base weight holds the residual ``W − alpha · Σ A0_k ⊗ B0_k``; loading an adapter
re-residualises the base from the stored buffers (no SVD). The residual is applied while its adapter is
active; ``peft.get_base_model_state_dict`` therefore returns it, not the original weight (the base weight
itself is the residual, as with LoRA's PiSSA init, and that function reads the state dict as it is):
``unload()`` or ``delete_adapter`` restores ``W``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..kron.apply import kron_apply, kron_delta
from ..kron.dense_forward import dense_forward_pays, kron_linear
from ..kron.kpsvd import KPSVDResult
from ..kron.shapes import KronShape
from .distributed import gathered


def _is_zero3_hook(hook: Any) -> bool:
    """Whether a module hook is one of DeepSpeed ZeRO-3's (``deepspeed.runtime.zero.parameter_offload``). They
    fetch and release the weight, and wrap the inputs and the output in pass-through autograd functions for the
    backward's fetch: they keep no reference to the output and do not depend on the input's shape. Some of them
    come wrapped by DeepSpeed's NVTX decorator, which does not use ``functools.wraps``: the wrapped function is
    found in its closure."""
    func = inspect.unwrap(hook)
    if getattr(func, "__module__", None) == "deepspeed.utils.nvtx":
        inner = [cell.cell_contents for cell in func.__closure__ or () if callable(cell.cell_contents)]
        func = inner[0] if len(inner) == 1 else func
    return (getattr(func, "__module__", None) or "").startswith("deepspeed.runtime.zero.")


def _keeps_no_output(module: nn.Module) -> bool:
    """Whether no forward hook can keep ``module``'s output: every forward hook on it is ZeRO-3's (or there
    are none) and no global forward hook is set."""
    return (
        all(_is_zero3_hook(hook) for hook in module._forward_hooks.values())
        and not nn.modules.module._global_forward_hooks
    )


def _only_zero3_hooks(module: nn.Module) -> bool:
    """Whether, besides :func:`_keeps_no_output`, every forward pre-hook on ``module`` is ZeRO-3's and no global
    one is set: then calling it on a reshaped input changes nothing but the output's shape."""
    return (
        _keeps_no_output(module)
        and all(_is_zero3_hook(hook) for hook in module._forward_pre_hooks.values())
        and not nn.modules.module._global_forward_pre_hooks
    )


class SokaLayer(BaseTunerLayer):
    """State and math shared by SoKA layers; see the module docstring for the tensors and formula."""

    adapter_layer_names = ("soka_A", "soka_B", "soka_s")
    other_param_names = (
        "soka_A0", "soka_B0", "soka_dropout", "r", "kshape", "scaling", "sigma_mode", "chunk_tokens",
        "forward_mode",
    )  # fmt: skip

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.soka_A = nn.ParameterDict({})
        self.soka_B = nn.ParameterDict({})
        self.soka_s = nn.ParameterDict({})
        self.soka_A0 = BufferDict({}, persistent=True)
        self.soka_B0 = BufferDict({}, persistent=True)
        self.soka_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.kshape: dict[str, KronShape] = {}
        self.scaling: dict[str, float] = {}
        self.sigma_mode: dict[str, str] = {}
        self.chunk_tokens: dict[str, int | None] = {}  # tokens per chunk of the product (None: by device)
        self.forward_mode: dict[str, str] = {}  # "factored" or "dense" (see SokaLinear.forward)
        # adapter -> whether alpha·Σ A0⊗B0 is currently subtracted from the base weight (kpsvd adapters only);
        # it is while the adapter is active, so an inactive adapter leaves the layer's output unchanged
        self.soka_residual: dict[str, bool] = {}
        self._soka_pending: set[str] = set()  # kpsvd placeholders whose factors must come from a checkpoint
        self._soka_incoming: set[str] = set()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.kwargs = kwargs

    # ------------------------------------------------------------------ creation
    def update_layer(
        self,
        adapter_name: str,
        shape: KronShape,
        rank: int,
        *,
        init: str,
        sigma_mode: str,
        alpha: float,
        dropout: float,
        chunk_tokens: int | None = None,
        forward_mode: str = "factored",
        factors: KPSVDResult | None = None,
        seed: int = 0,
    ) -> None:
        """Create the adapter's tensors.

        ``factors`` (top-``rank`` KPSVD of the base weight) given and ``init="kpsvd"``: principal components,
        base becomes the residual. ``init="zero"``: random ``A`` and zero ``B`` (ΔW = 0), base untouched.
        ``factors`` missing with ``init="kpsvd"``: zero placeholders to be filled by loading a saved adapter;
        the residual is applied when the stored ``soka_A0``/``soka_B0`` arrive.
        """
        if rank < 1:
            raise ValueError(f"rank must be positive to create an adapter, got {rank}")
        m, n, p, q = shape.m, shape.n, shape.p, shape.q
        self.r[adapter_name] = rank
        self.kshape[adapter_name] = shape
        self.scaling[adapter_name] = float(alpha)
        self.sigma_mode[adapter_name] = sigma_mode
        self.soka_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.chunk_tokens[adapter_name] = chunk_tokens
        self.forward_mode[adapter_name] = forward_mode

        sigma: torch.Tensor | None = None
        if init == "kpsvd" and factors is not None:
            coeff = factors.S[:rank].to(torch.float32) / float(alpha)  # ΔW0 = alpha·Σ coeff_k U_k ⊗ V_k
            a, b = factors.A[:rank].to(torch.float32), factors.B[:rank].to(torch.float32)
            if sigma_mode == "separate":
                sigma = coeff
            else:
                root = coeff.abs().sqrt()
                a = a * (root * torch.sign(coeff + (coeff == 0).float()))[:, None, None]
                b = b * root[:, None, None]
        elif init == "zero":
            generator = torch.Generator().manual_seed(seed)
            a = torch.randn(rank, m, n, generator=generator) / math.sqrt(n)
            b = torch.zeros(rank, p, q)
            sigma = torch.ones(rank) if sigma_mode == "separate" else None
        else:  # kpsvd placeholders, filled by load_state_dict
            a, b = torch.zeros(rank, m, n), torch.zeros(rank, p, q)
            sigma = torch.zeros(rank) if sigma_mode == "separate" else None

        self.soka_A[adapter_name] = nn.Parameter(a)
        self.soka_B[adapter_name] = nn.Parameter(b)
        if sigma is not None:
            self.soka_s[adapter_name] = nn.Parameter(sigma)
        if init == "kpsvd":
            a0 = a * sigma[:, None, None] if sigma is not None else a
            self.soka_A0[adapter_name] = a0.detach().clone()
            self.soka_B0[adapter_name] = b.detach().clone()
            self.soka_residual[adapter_name] = False
            if factors is None:
                self._soka_pending.add(adapter_name)
        self._place_adapter(adapter_name)
        if init == "kpsvd" and factors is not None:
            self.apply_residual(adapter_name, sign=-1.0)
        self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; each kpsvd adapter's ``ΔW0`` is subtracted from the base weight exactly
        while it is active (added back when it is not), so adapters that are not active never change the
        output, as with PEFT's other methods."""
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        for adapter, applied in list(self.soka_residual.items()):
            active = adapter in self.active_adapters
            if active != applied and adapter not in self._soka_pending:
                self.apply_residual(adapter, sign=-1.0 if active else +1.0)

    def _place_adapter(self, adapter_name: str) -> None:
        """Move the adapter's tensors to the base layer's device, in fp32 (master weights; the forward casts
        them to the input dtype). PEFT's ``_move_adapter_to_device_of_base_layer`` would also cast them to the
        base dtype, rounding the factors to bf16 on a bf16 base. Meta tensors (empty-weight loading) stay."""
        device = self.get_base_layer().weight.device
        for container in (self.soka_A, self.soka_B, self.soka_s):
            if adapter_name in container and container[adapter_name].device.type != "meta":
                container[adapter_name].data = container[adapter_name].data.to(device, torch.float32)
        for buffers in (self.soka_A0, self.soka_B0):
            if adapter_name in buffers and buffers[adapter_name].device.type != "meta":
                buffers[adapter_name] = buffers[adapter_name].to(device, torch.float32)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Any = None) -> None:
        """PEFT calls this after loading (e.g. with ``low_cpu_mem_usage=True``); its own version would also
        cast the factors and ``soka_A0``/``soka_B0`` to the base dtype. SoKA keeps them in fp32 on the base
        weight's device (:meth:`_place_adapter`)."""
        self._place_adapter(adapter_name)

    # ------------------------------------------------------------------ residual
    def init_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``alpha · Σ A0_k ⊗ B0_k`` in fp32: ``(out, in)``."""
        a0, b0 = self.soka_A0[adapter_name], self.soka_B0[adapter_name]
        return self.scaling[adapter_name] * kron_delta(a0.to(torch.float32), b0.to(torch.float32))

    def apply_residual(self, adapter_name: str, sign: float) -> None:
        """Add ``sign · alpha · Σ A0⊗B0`` to the base weight in fp32 (``sign=-1`` residualises, ``+1`` restores)."""
        weight = self.get_base_layer().weight
        with gathered([weight], modifier_rank=0):
            delta = self.init_delta_weight(adapter_name).to(weight.device)
            weight.data.copy_((weight.data.to(torch.float32) + sign * delta).to(weight.dtype))
        self.soka_residual[adapter_name] = sign < 0

    def _soka_pre_load(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Before loading: note adapters whose stored init factors arrive; restore the base if they differ."""
        for adapter in list(self.soka_A0.keys()):
            key_a, key_b = f"{prefix}soka_A0.{adapter}", f"{prefix}soka_B0.{adapter}"
            if key_a not in state_dict or key_b not in state_dict:
                continue
            if self.soka_residual.get(adapter, False):
                cur_a, cur_b = self.soka_A0[adapter], self.soka_B0[adapter]
                new_a, new_b = state_dict[key_a], state_dict[key_b]
                if (
                    new_a.shape == cur_a.shape
                    and new_b.shape == cur_b.shape
                    and torch.equal(new_a.to(cur_a.device, cur_a.dtype), cur_a)
                    and torch.equal(new_b.to(cur_b.device, cur_b.dtype), cur_b)
                ):
                    continue  # same init (e.g. resuming): the base already holds this residual
                self.apply_residual(adapter, sign=+1.0)
            self._soka_incoming.add(adapter)

    def _soka_post_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        """After loading: residualise the base with the stored init factors that just arrived (for an active
        adapter; :meth:`set_adapter` does it for the others once activated)."""
        for adapter in sorted(self._soka_incoming):
            self._place_adapter(
                adapter
            )  # loaded tensors (possibly assigned as saved) back to fp32 on the device
            self._soka_pending.discard(adapter)
            if adapter in self.active_adapters:
                self.apply_residual(adapter, sign=-1.0)
        self._soka_incoming.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete the adapter's tensors; a kpsvd adapter first adds its ``ΔW0`` back, so the base weight is
        the original ``W`` again (otherwise the model would silently keep the residual)."""
        if self.soka_residual.get(adapter_name, False):
            self.apply_residual(adapter_name, sign=+1.0)
        self.soka_residual.pop(adapter_name, None)
        self._soka_incoming.discard(adapter_name)
        self._soka_pending.discard(adapter_name)
        super().delete_adapter(adapter_name)

    def check_loaded(self) -> None:
        """Fail loudly when a kpsvd adapter built from a saved (resolved) config never received its weights."""
        for adapter in self.active_adapters:
            if adapter in self._soka_pending:
                raise RuntimeError(
                    f"SoKA adapter {adapter!r} was created from a saved config (resolved=True), so it expects its "
                    "weights from a checkpoint, but none were loaded. Load it with "
                    "peft.PeftModel.from_pretrained(model, adapter_dir), or build a new adapter from a config "
                    "with resolved=False."
                )

    # ------------------------------------------------------------------ math
    def effective_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_eff, B)`` with ``A_eff = s_k · A_k`` (separate σ) so that ``ΔW = alpha · Σ A_eff_k ⊗ B_k``."""
        a, b = self.soka_A[adapter_name], self.soka_B[adapter_name]
        if adapter_name in self.soka_s:
            a = a * self.soka_s[adapter_name][:, None, None]
        return a, b

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = alpha · Σ A_eff_k ⊗ B_k``, built in fp32 and cast to the base weight's dtype: ``(out, in)``."""
        weight = self.get_base_layer().weight
        a, b = self.effective_factors(adapter_name)
        delta = self.scaling[adapter_name] * kron_delta(a.to(torch.float32), b.to(torch.float32))
        return delta.to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' ``ΔW`` to the base weight (after merging: plain ``nn.Linear`` cost)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.soka_A:
                continue
            weight = self.get_base_layer().weight
            merged = weight.data + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights; the adapter {adapter!r} seems to be broken"
                )
            weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.soka_A:
                weight = self.get_base_layer().weight
                weight.data -= self.get_delta_weight(adapter)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True


class SokaLinear(nn.Module, SokaLayer):
    """SoKA on ``nn.Linear``: ``y = base(x) + alpha · x·(Σ_k A_eff_k ⊗ B_k)ᵀ`` for ``x: (..., in)``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, shape: KronShape, rank: int, **kwargs: Any):
        super().__init__()
        SokaLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, shape, rank, **kwargs)
        self._register_load_state_dict_pre_hook(self._soka_pre_load)
        self.register_load_state_dict_post_hook(self._soka_post_load)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.check_loaded()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        dense = None if args or kwargs else self._dense_adapter(x)
        if dense is not None:  # one GEMM on W + ΔW instead of the base GEMM plus the factored product
            a, b = self.effective_factors(dense)
            base = self.get_base_layer()
            a = a * self.scaling[dense]
            return kron_linear(x, base.weight, base.bias, a, b, chunk_tokens=self.chunk_tokens.get(dense))
        lead = None
        if self._flattens_input(x, args, kwargs):  # (..., in) → (N, in): the biased output is then no view
            lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.soka_A:
                continue
            a, b = self.effective_factors(adapter)
            a = a * self.scaling[adapter]  # alpha folded into the (r, m, n) factor, not the (..., out) output
            h = self.soka_dropout[adapter](x)
            compute_dtype = h.dtype if h.is_floating_point() else a.dtype
            h, a, b = h.to(compute_dtype), a.to(compute_dtype), b.to(compute_dtype)
            chunk = self.chunk_tokens.get(adapter)
            if self._adds_in_place(result, compute_dtype):
                result = kron_apply(h, a, b, chunk_tokens=chunk, add_to=result)
            else:
                result = result + kron_apply(h, a, b, chunk_tokens=chunk).to(out_dtype)
        return result if lead is None else result.reshape(*lead, result.shape[-1])

    def _flattens_input(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether the factored forward runs on ``x`` flattened to ``(N, in)`` and reshapes the output back.
        ``nn.Linear`` with a bias returns a *view* for input with more than two dimensions (``addmm`` on the
        flattened input, viewed back), which rules out the in-place sum (:meth:`_adds_in_place`); on 2-d input
        it returns a fresh tensor. Only for a plain biased ``nn.Linear`` without hooks other than ZeRO-3's
        (which do not depend on the input's shape), called without extra arguments."""
        base = self.get_base_layer()
        return (
            x.dim() > 2
            and not args
            and not kwargs
            and type(base) is nn.Linear
            and base.bias is not None
            and _only_zero3_hooks(base)
        )

    def _dense_adapter(self, x: torch.Tensor) -> str | None:
        """The adapter to run through the dense forward (:func:`~axolotl_soka.kron.kron_linear`), or ``None``
        for the factored one. Dense needs ``forward_mode="dense"`` on the single active adapter; a plain
        ``nn.Linear`` base without any hooks or replaced ``forward`` (so skipping its forward skips nothing:
        not under DeepSpeed ZeRO-3 or accelerate's offloading, whose hooks fetch the weight), with a frozen
        weight and bias; no active dropout (the base and the adapter must see the same input); an input of the
        weight's dtype (or autocast); and enough tokens that it is the cheaper order
        (:func:`~axolotl_soka.kron.dense_forward_pays`). Under ``torch.compile`` it runs as an opaque operator
        (:mod:`~axolotl_soka.kron.dense_forward_op`), which keeps no ``W + ΔW`` for backward."""
        adapters = [name for name in self.active_adapters if name in self.soka_A]
        if len(adapters) != 1 or self.forward_mode.get(adapters[0]) != "dense":
            return None
        adapter = adapters[0]
        base = self.get_base_layer()
        dropout = self.soka_dropout[adapter]
        hooks = nn.modules.module
        if (
            type(base) is not nn.Linear
            or "forward" in base.__dict__  # a per-instance forward, e.g. accelerate's device-map offload hook
            or base._forward_hooks
            or base._forward_pre_hooks
            or base._backward_hooks
            or base._backward_pre_hooks
            or hooks._global_forward_hooks
            or hooks._global_forward_pre_hooks
            or hooks._global_backward_hooks
            or hooks._global_backward_pre_hooks
            or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            or (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0)
            or not x.is_floating_point()
            or (x.dtype != base.weight.dtype and not torch.is_autocast_enabled(x.device.type))
        ):
            return None
        shape = self.kshape[adapter]
        tokens = x.numel() // max(1, self.in_features)
        pays = dense_forward_pays(tokens, self.r[adapter], shape.m, shape.n, shape.p, shape.q)
        return adapter if pays else None

    def _adds_in_place(self, result: torch.Tensor, compute_dtype: torch.dtype) -> bool:
        """Whether the adapter's product can be added into the base output in place (no output-sized
        temporary, no extra pass over memory): the base is a plain ``nn.Linear`` without forward hooks other
        than DeepSpeed ZeRO-3's (so neither its backward nor a hook keeps the output), and the output is a
        contiguous non-view tensor of the dtype the product runs in (the autocast dtype under autocast). A
        biased layer returns a view on 3-d input, which :meth:`_flattens_input` avoids where it can."""
        base = self.get_base_layer()
        device_type = result.device.type
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        return (
            type(base) is nn.Linear
            and _keeps_no_output(base)
            and result.dtype == compute_dtype
            and result.is_contiguous()
            and result._base is None
        )

    def __repr__(self) -> str:
        return "soka." + super().__repr__()
