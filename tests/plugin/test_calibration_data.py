"""Calibration batches from a tokenized training dataset."""

import pytest
import torch

from axolotl_soka.plugin.calibration_data import calibration_batches, pad_batch

ROWS = [
    {"input_ids": list(range(1, 2 + i % 4)), "labels": [-100] + list(range(2, 2 + i % 4))} for i in range(10)
]


def test_pad_batch_masks_padding():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def first_ids(batches):
    return [tuple(row[row != 0].tolist()) for b in batches for row in b["input_ids"]]


def test_processes_get_equal_disjoint_shares_of_one_seeded_draw():
    single = calibration_batches(ROWS, 4, 2, seed=3)
    rank0 = calibration_batches(ROWS, 4, 2, seed=3, rank=0, world=2)
    rank1 = calibration_batches(ROWS, 4, 2, seed=3, rank=1, world=2)
    assert len(single) == 4 and len(rank0) == len(rank1) == 2
    assert all(b["input_ids"].shape[0] == 2 for b in rank0 + rank1)
    # the same 8 rows as one process draws, split between the processes
    assert sorted(first_ids(rank0) + first_ids(rank1)) == sorted(first_ids(single))
    assert calibration_batches(ROWS, 4, 2, seed=3)[0]["input_ids"].equal(single[0]["input_ids"])
    assert not calibration_batches(ROWS, 4, 2, seed=4)[0]["input_ids"].equal(single[0]["input_ids"]) or not (
        calibration_batches(ROWS, 4, 2, seed=4)[1]["input_ids"].equal(single[1]["input_ids"])
    )


def test_small_dataset_is_cycled_and_empty_is_refused():
    batches = calibration_batches(ROWS[:3], 4, 2, seed=0)
    assert len(batches) == 4 and sum(int(b["attention_mask"].sum() > 0) for b in batches) == 4
    with pytest.raises(ValueError, match="training dataset is empty"):
        calibration_batches([], 2, 2, seed=0)


def test_rows_without_labels_learn_every_token():
    batch = calibration_batches([{"input_ids": [4, 5]}], 1, 1, seed=0)[0]
    assert torch.equal(batch["labels"], torch.tensor([[4, 5]]))
