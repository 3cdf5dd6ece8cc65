"""``gathered``: ZeRO-3 parameters are gathered together under NCCL and one at a time elsewhere (gloo), where
DeepSpeed's coalesced gather does not wait for all of its transfers."""

import contextlib
import sys
import types

import pytest
import torch

import axolotl_soka.tuner.distributed as distributed


def partitioned(count: int) -> list[torch.Tensor]:
    """Tensors marked as ZeRO-3 parameters (``ds_id``), as DeepSpeed marks them."""
    params = []
    for i in range(count):
        param = torch.zeros(0)
        param.ds_id = i
        params.append(param)
    return params


@pytest.fixture
def calls(monkeypatch):
    """Records each ``deepspeed.zero.GatheredParameters`` context: ``(event, ds_ids, modifier_rank)``, through a
    stand-in ``deepspeed`` module (so this also runs where DeepSpeed is not installed)."""
    events: list[tuple[str, list[int], int | None]] = []

    @contextlib.contextmanager
    def recording(params, modifier_rank=None):
        ids = [p.ds_id for p in params]
        events.append(("enter", ids, modifier_rank))
        yield
        events.append(("exit", ids, modifier_rank))

    stand_in = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=recording))
    monkeypatch.setitem(sys.modules, "deepspeed", stand_in)
    return events


@pytest.mark.parametrize("modifier_rank", [None, 0])
def test_one_coalesced_gather_where_safe(monkeypatch, calls, modifier_rank):
    monkeypatch.setattr(distributed, "coalesced_gather_is_safe", lambda: True)
    with distributed.gathered(partitioned(3), modifier_rank=modifier_rank):
        assert calls == [("enter", [0, 1, 2], modifier_rank)]
    assert calls[-1] == ("exit", [0, 1, 2], modifier_rank)


@pytest.mark.parametrize("modifier_rank", [None, 0])
def test_one_parameter_at_a_time_elsewhere(monkeypatch, calls, modifier_rank):
    monkeypatch.setattr(distributed, "coalesced_gather_is_safe", lambda: False)
    with distributed.gathered(partitioned(3), modifier_rank=modifier_rank):
        assert calls == [("enter", [i], modifier_rank) for i in range(3)]
    assert calls[3:] == [("exit", [i], modifier_rank) for i in (2, 1, 0)]


def test_plain_tensors_are_not_gathered(calls):
    plain = [torch.zeros(2), torch.ones(3)]
    with distributed.gathered(plain + partitioned(1)):
        pass
    assert calls == [("enter", [0], None), ("exit", [0], None)]


def test_single_process_counts_as_safe():
    """Not distributed (one process): nothing to race with."""
    assert not torch.distributed.is_initialized()
    assert distributed.coalesced_gather_is_safe() is True
