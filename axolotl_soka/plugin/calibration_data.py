"""Calibration batches for ``soka_init_source: gradient``, drawn from Axolotl's prepared training dataset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def pad_batch(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad tokenized rows to one ``(batch, longest)`` batch.

    ``input_ids`` are padded with 0 (masked out), ``labels`` with ``-100`` (rows without labels learn every
    token), ``attention_mask`` marks the real tokens.
    """
    longest = max(len(row["input_ids"]) for row in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.as_tensor(row["input_ids"])
        labels[i, :n] = torch.as_tensor(row.get("labels", row["input_ids"]))
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def calibration_batches(
    dataset: Sequence[dict[str, Any]], batches: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> list[dict[str, torch.Tensor]]:
    """This process's share of ``batches`` batches of ``batch_size`` rows drawn without replacement (seeded).

    Every process gets ``max(1, batches // world)`` batches, the same count (the calibration reduces each batch's
    gradient across processes), taken from disjoint rows of one seeded permutation.
    """
    if len(dataset) == 0:
        raise ValueError("soka_calibration_batches: the training dataset is empty")
    per_process = max(1, batches // world)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    needed = per_process * world * batch_size
    order = (order * (needed // len(order) + 1))[:needed]  # a small dataset is cycled
    out = []
    for b in range(per_process):
        start = (b * world + rank) * batch_size
        out.append(pad_batch([dataset[i] for i in order[start : start + batch_size]]))
    return out
