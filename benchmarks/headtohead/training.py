"""One benchmark run: build the adapter, train on GSM8K in a fixed order, then measure.

Measured: trainable parameters, init seconds (gradient calibration included for the calibrated methods), loss and gradient norm per step (the norm of all trainable
gradients before clipping at 1.0), seconds per step, peak memory (CUDA allocator peak, or the process's peak
RSS on the CPU, since each run is its own process), validation loss (token mean over held-out training rows)
and GSM8K accuracy on a fixed test subset (greedy, scored by ``axolotl_soka.eval``).
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_soka.eval.generate import hf_generate
from axolotl_soka.eval.scoring import score
from axolotl_soka.prompts import build_prompt, build_target

from .methods import CALIBRATED, CALIBRATION_BATCHES, MethodSpec, build, make_config, tier_budget, trainable

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "gsm8k"
STOP = ["\nQuestion:", "\n\n\n"]


@dataclass
class TrainSettings:
    """What every run of one benchmark size shares: steps, batch, sequence length, data and test sizes."""

    steps: int
    batch_size: int
    max_len: int
    n_train: int
    n_val: int
    n_test: int
    max_new_tokens: int


@dataclass
class RunConfig(TrainSettings):
    """One run: the shared settings plus model, method, budget, learning rate and seed."""

    model_dir: str
    method: str
    lora_rank: int
    fraction: float
    lr: float
    seed: int
    tier: str = "lora"  # "lora": LoRA's count at lora_rank; "kron": one Kronecker term per module
    threads: int = 0  # torch threads of the run (0: torch's default); not part of the key

    @property
    def spec(self) -> MethodSpec:
        return MethodSpec(self.method, self.lora_rank, self.fraction, self.tier)

    @property
    def key(self) -> str:
        return f"{self.spec.name}-lr{self.lr:g}-s{self.seed}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def encode(tokenizer: Any, record: dict[str, Any], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + EOS and labels with the prompt masked (-100), at most ``max_len``.

    A long prompt loses its beginning, so the answer always keeps at least half of the window.
    """
    prompt = tokenizer(build_prompt("gsm8k", record), add_special_tokens=False)["input_ids"]
    answer = tokenizer(build_target("gsm8k", record), add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    prompt = prompt[-max(max_len - len(answer), max_len // 2) :]
    ids = (prompt + answer)[:max_len]
    labels = ([-100] * len(prompt) + answer)[:max_len]
    return ids, labels


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (i, lab) in enumerate(pairs):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(i)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 10 % of steps, then linear decay to zero."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def validation_loss(model: Any, pairs: list, pad_id: int, batch_size: int, device: torch.device) -> float:
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in collate(pairs[start : start + batch_size], pad_id).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    model.train()
    return total / max(tokens, 1)


def run(cfg: RunConfig) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_dir = REPO / cfg.model_dir  # a relative folder is taken from the repository root
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    budget = tier_budget(model, cfg.spec)
    config = make_config(model, cfg.spec, cfg.seed)
    rows = read_jsonl(DATA / "train.jsonl")
    train = [encode(tokenizer, r, cfg.max_len) for r in rows[: cfg.n_train]]
    val = [encode(tokenizer, r, cfg.max_len) for r in rows[len(rows) - cfg.n_val :]]
    calibration = None
    if cfg.method in CALIBRATED:  # the run's own first training batches
        calibration = [
            collate([train[(b * cfg.batch_size + i) % len(train)] for i in range(cfg.batch_size)], pad_id)
            for b in range(CALIBRATION_BATCHES)
        ]
    start = time.perf_counter()
    model = build(model, config, calibration)
    init_seconds = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses, grad_norms, step_seconds = [], [], []
    model.train()
    for step in range(cfg.steps):
        begin = (step * cfg.batch_size) % len(train)
        chunk = [train[(begin + i) % len(train)] for i in range(cfg.batch_size)]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
        grad_norms.append(float(norm))
        if not math.isfinite(losses[-1]):
            break
    val_loss = validation_loss(model, val, pad_id, cfg.batch_size * 2, device)

    tests = read_jsonl(DATA / "test.jsonl")[: cfg.n_test]
    prompts = [build_prompt("gsm8k", r) for r in tests]
    completions = [""] * len(prompts)
    for indices, texts in hf_generate(
        model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, stop_strings=STOP, batch_size=16
    ):
        for i, text in zip(indices, texts, strict=True):
            completions[i] = text
    correct = sum(score("gsm8k", c, r).correct for c, r in zip(completions, tests, strict=True))
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    norms = torch.tensor(grad_norms)
    return {
        "config": asdict(cfg),
        "key": cfg.key,
        "name": cfg.spec.name,
        "budget": budget,
        "trainable": trainable(model),
        "init_seconds": init_seconds,
        "seconds_per_step": sum(step_seconds[1:]) / max(1, len(step_seconds) - 1),
        "peak_mib": peak_mib,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "losses": losses,
        "grad_norms": grad_norms,
        "grad_norm_mean": float(norms.mean()),
        "grad_norm_std": float(norms.std()) if len(norms) > 1 else 0.0,
        "grad_norm_max": float(norms.max()),
        "val_loss": val_loss,
        "accuracy": correct / max(1, len(tests)),
        "correct": correct,
        "n_test": len(tests),
    }
