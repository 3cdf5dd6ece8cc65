"""Batched greedy generation: transformers (left padding, stop strings) or, on CUDA, vLLM."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from typing import Any


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        pos = text.find(stop)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def prepare_tokenizer(tokenizer: Any, fallback_pad_id: int | None = None) -> Any:
    """Left padding (decoder-only batched generation) and a pad token.

    Without a pad token, the EOS token pads, else the token ``fallback_pad_id`` (e.g. the model's
    ``generation_config.pad_token_id``).
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif fallback_pad_id is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(fallback_pad_id)
        else:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return tokenizer


def length_order(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    """Prompt indices, longest first: less padding per batch, and memory errors show up early."""
    lengths = [len(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    return sorted(range(len(prompts)), key=lambda i: -lengths[i])


def hf_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str],
    batch_size: int,
) -> Iterator[tuple[list[int], list[str]]]:
    """Greedy completions with ``model.generate``, one batch at a time.

    Yields ``(indices, completions)`` per batch (indices into ``prompts``; batches are formed longest
    prompt first). Completions are cut before the first stop string.
    """
    import torch
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None)
    pad = getattr(model.generation_config, "pad_token_id", None)
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    prepare_tokenizer(tokenizer, pad if pad is not None else first_eos)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        stop_strings=list(stop_strings) or None,
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = length_order(tokenizer, prompts)
    try:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True).to(device)
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=config, tokenizer=tokenizer)
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            yield indices, [truncate_at_stop(t, stop_strings) for t in texts]
    finally:
        if was_training:
            model.train()


def vllm_usable() -> bool:
    """vLLM is importable and a CUDA GPU is present."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def vllm_generate(
    model_path: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str],
    batch_size: int,
    dtype: str,
    seed: int,
    lora_path: str | None = None,
    tokenizer_path: str | None = None,
) -> Iterator[tuple[list[int], list[str]]]:
    """Greedy completions with vLLM (base model, optionally a LoRA adapter), in chunks of prompts.

    Chunks are ``max(batch_size, 64)`` prompts so results can be written as they come; vLLM batches
    inside a chunk itself. Only LoRA adapters are supported here; other adapters use transformers.
    """
    import json
    from pathlib import Path

    from vllm import LLM, SamplingParams

    lora_request = None
    kwargs: dict[str, Any] = {}
    if lora_path is not None:
        from vllm.lora.request import LoRARequest

        rank = json.loads((Path(lora_path) / "adapter_config.json").read_text()).get("r", 16)
        kwargs.update(enable_lora=True, max_lora_rank=max(16, int(rank)))
        lora_request = LoRARequest("adapter", 1, lora_path)
    llm = LLM(model=model_path, tokenizer=tokenizer_path or model_path, dtype=dtype, seed=seed, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop_strings) or None)
    chunk = max(batch_size, 64)
    for start in range(0, len(prompts), chunk):
        indices = list(range(start, min(start + chunk, len(prompts))))
        outputs = llm.generate(
            [prompts[i] for i in indices], params, lora_request=lora_request, use_tqdm=False
        )
        yield indices, [truncate_at_stop(o.outputs[0].text, stop_strings) for o in outputs]
