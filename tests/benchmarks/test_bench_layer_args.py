"""``bench_layer.py --layers``: sizes parse, and a malformed one stops with a message naming the option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def bench_layer_module() -> ModuleType:
    """``benchmarks/bench_layer.py`` imported as a module."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_layer
    finally:
        sys.path.pop(0)
    return bench_layer


def test_bad_layers_value_stops_with_a_message() -> None:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_layer.py"),
        "--only",
        "layers",
        "--layers",
        "4096x40a6",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert (
        "--layers: expected OUTxIN items separated by commas (e.g. 4096x4096), got '4096x40a6'" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_layers_parse_in_order() -> None:
    parse_layers = bench_layer_module().parse_layers
    assert parse_layers("576x576, 1536x576") == [(576, 576), (1536, 576)]


def test_layer_rows_on_a_small_layer() -> None:
    """Every row runs; the dense-forward row has the factored row's parameters and FLOPs, and neither keeps
    activations besides the input."""
    import torch

    bench_layers = bench_layer_module().bench_layers
    rows = {r["method"]: r for r in bench_layers(64, torch.float32, torch.device("cpu"), 1, [(96, 64)], 2)}
    factored = next(r for name, r in rows.items() if name.startswith("SoKA") and name.endswith("]"))
    dense = rows[f"{factored['method']}, dense forward"]
    assert dense["trainable"] == factored["trainable"] > 0
    assert dense["extra_flops"] == factored["extra_flops"] > 0
    assert dense["saved_mib"] < 0.01 and factored["saved_mib"] < 0.01
    assert rows["frozen base"]["extra_time"] == 0.0


def test_best_round_estimate_uses_each_models_fastest_round(monkeypatch) -> None:
    """The "best" columns divide each model's fastest round by the base's fastest round, whichever rounds
    those are; the median columns pair rounds."""
    import torch

    bench_layer = bench_layer_module()
    rounds = iter([1.0, 3.0, 2.0] + [2.5, 2.0, 5.0] * 5)  # base rounds, then every other model's

    def fake_time_models(models, x, grad, repeats):
        assert repeats == 3
        return {name: ([next(rounds) for _ in range(3)], 0, 0.0) for name in models}

    monkeypatch.setattr(bench_layer, "time_models", fake_time_models)
    rows = bench_layer.bench_layers(64, torch.float32, torch.device("cpu"), 3, [(96, 64)], 2)
    base, lora = rows[0], rows[1]
    assert base["best_ms"] == 1000.0 and base["extra_time_best"] == 0.0
    assert lora["best_ms"] == 2000.0
    assert lora["extra_time_best"] == pytest.approx(1.0)  # 2.0 / 1.0 - 1
    assert lora["extra_time"] == pytest.approx(1.5)  # median of 2.5/1, 2/3, 5/2 minus 1: 1.5
    assert lora["ratio_best"] == pytest.approx(1.0 / lora["extra_flops"])


def small_layer_soka_rows(**options: bool) -> list[dict]:
    """SoKA's three rows (factored, dense forward, LoRA-like) of the table for one 96×64 layer over 64 tokens,
    with ``bench_layers``' keyword ``options``."""
    import torch

    bench_layers = bench_layer_module().bench_layers
    rows = bench_layers(64, torch.float32, torch.device("cpu"), 1, [(96, 64)], 2, **options)
    assert len(rows) == 6
    soka = [r for r in rows if r["method"].startswith("SoKA") and "plain autograd" not in r["method"]]
    assert len(soka) == 3 and all(r["trainable"] > 0 for r in soka)
    return soka


@pytest.mark.parametrize(
    ("options", "bound_mib"),
    [({"bias": True}, 0.01), ({"compile_models": True}, 96 * 64 * 4 / 2**20)],
    ids=["bias", "compile"],
)
def test_option_rows_run_and_bound_saved_memory(options, bound_mib) -> None:
    """``--bias`` (every row on a ``(2, tokens/2, in)`` input): SoKA's rows keep no activations besides the
    input, as without a bias. ``--compile`` (every model through ``torch.compile``): they keep less than one
    weight-sized tensor (after other compilations in the same process the compiled graph may keep an
    input-sized copy, so not 0); that the compiled dense mode keeps no ``W + ΔW`` is tested on the layer."""
    soka = small_layer_soka_rows(**options)
    assert all(r["saved_mib"] < bound_mib for r in soka), [(r["method"], r["saved_mib"]) for r in soka]


def test_executed_flops_count_the_recomputed_first_product(monkeypatch) -> None:
    """On a 64x64 layer (shape [8, 8, 8, 8], r = 2 at LoRA r = 2's parameters) a SoKA term costs
    c = 8·8·(8 + 8) = 1024 multiply-adds per token each way and 2c in backward, plus the recomputed first
    product 8·8·8 = 512, against the base's 2·64·64 = 8192: shares 3·2·1024/8192 = 0.75 counted and
    2·(3·1024 + 512)/8192 = 0.875 executed. Rows that keep their intermediate execute what is counted."""
    import torch

    bench_layer = bench_layer_module()

    def fake_time_models(models, x, grad, repeats):
        return {name: ([1.0 if name == "frozen base" else 2.0], 0, 0.0) for name in models}

    monkeypatch.setattr(bench_layer, "time_models", fake_time_models)
    rows = {
        r["method"]: r
        for r in bench_layer.bench_layers(64, torch.float32, torch.device("cpu"), 1, [(64, 64)], 2)
    }
    factored = rows["SoKA r=2 [8, 8, 8, 8]"]
    assert factored["extra_flops"] == 0.75
    assert factored["executed_flops"] == 0.875
    assert factored["ratio_executed"] == pytest.approx(1.0 / 0.875)
    plain = rows["SoKA r=2 [8, 8, 8, 8], plain autograd"]
    assert plain["executed_flops"] == plain["extra_flops"] == 0.75
    assert rows["SoKA r=2 [8, 8, 8, 8], dense forward"]["executed_flops"] == 0
    lora = rows["LoRA r=2"]
    assert lora["executed_flops"] == lora["extra_flops"] == 3 * 2 * 128 / 8192
