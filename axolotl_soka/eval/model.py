"""Which model to evaluate (from flags or an Axolotl YAML) and loading it with transformers/PEFT."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EvalInputError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """A base model, an optional PEFT adapter directory and where the tokenizer comes from."""

    base_model: str
    adapter: str | None = None
    adapter_type: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None


def adapter_type(adapter_dir: str) -> str:
    """The ``peft_type`` of an adapter directory (e.g. ``LORA``), from its ``adapter_config.json``."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("peft_type", "unknown"))


def _check_adapter(adapter: str, flag: str) -> None:
    if not Path(adapter).is_dir():
        raise EvalInputError(f"{flag}: adapter directory not found: {adapter} (or pass --adapter none)")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise EvalInputError(
            f"{flag}: {adapter} has no adapter_config.json; give a PEFT adapter directory (SoKA or LoRA) "
            "or --adapter none"
        )


def _from_config(path: str) -> tuple[str, str | None, str | None]:
    """``(base_model, adapter_dir, tokenizer)`` from an Axolotl YAML (``lora_model_dir`` before ``output_dir``)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise EvalInputError(f"--config: file not found: {path}")
    try:
        cfg = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise EvalInputError(f"--config: {path} is not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict) or not cfg.get("base_model"):
        raise EvalInputError(f"--config: {path} has no 'base_model' key")
    adapter = cfg.get("lora_model_dir") or cfg.get("output_dir")
    if adapter is None:
        raise EvalInputError(
            f"--config: {path} has neither 'lora_model_dir' nor 'output_dir' for the adapter"
        )
    return str(cfg["base_model"]), str(adapter), cfg.get("tokenizer_config")


def resolve(
    *,
    config: str | None,
    base_model: str | None,
    adapter: str | None,
    gguf_file: str | None,
) -> ModelSpec:
    """Check the model flags and return what to load; raises :class:`EvalInputError` on bad input.

    ``adapter`` is a directory, ``"none"``, or ``None`` (the YAML's adapter with ``--config``, none
    without it).
    """
    if (config is None) == (base_model is None):
        raise EvalInputError("give exactly one of --config AXOLOTL_YAML or --base-model PATH")
    tokenizer = None
    adapter_flag = "--adapter"
    if config is not None:
        base_model, config_adapter, tokenizer = _from_config(config)
        if adapter is None:
            adapter, adapter_flag = config_adapter, "--config (lora_model_dir/output_dir)"
    assert base_model is not None
    if adapter is not None and adapter.lower() == "none":
        adapter = None
    base_path = Path(base_model)
    looks_local = base_path.exists() or base_model.startswith((".", "/", "~")) or base_model.count("/") > 1
    if looks_local and not base_path.exists():
        raise EvalInputError(f"--base-model: not found: {base_model} (a local directory or a Hub model id)")
    if gguf_file is not None and base_path.is_dir() and not (base_path / gguf_file).is_file():
        raise EvalInputError(f"--gguf-file: {gguf_file} not found in {base_model}")
    kind = None
    if adapter is not None:
        _check_adapter(adapter, adapter_flag)
        kind = adapter_type(adapter)
        if tokenizer is None and (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer = adapter
    return ModelSpec(base_model, adapter, kind, gguf_file, tokenizer)


def torch_dtype(name: str) -> Any:
    """The torch dtype for ``--dtype`` (``auto``: bfloat16 on a CUDA GPU that supports it, else float32)."""
    import torch

    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def load(spec: ModelSpec, dtype: str = "auto") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: the base model, then the adapter through ``PeftModel.from_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    # GGUF files carry a tokenizer, but a tokenizer.json next to them keeps the special tokens intact.
    has_tokenizer_files = (Path(spec.base_model) / "tokenizer.json").is_file()
    tok_extra = extra if spec.tokenizer is None and not has_tokenizer_files else {}
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.base_model, **tok_extra)
    model = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=torch_dtype(dtype), **extra)
    if spec.adapter is not None:
        from peft import PeftModel

        import axolotl_soka  # noqa: F401  (registers the SoKA method with PEFT)

        model = PeftModel.from_pretrained(model, spec.adapter)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    return model, tokenizer
