"""``gpu_check.py --dry-run`` runs every part at toy sizes on the CPU and writes the JSON a GPU run writes.

The counts and FLOP shares in the JSON are checked against formulas computed here from the recorded shapes;
timings only for being finite and positive (their values are whatever the host manages).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "benchmarks" / "gpu_check.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
PARTS = ["layer", "step", "init", "step_compiled", "compare"]
LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def strict_json(path: Path) -> dict:
    """The JSON, refusing NaN and infinities (strict JSON has none)."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-finite number {name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def run_script(out: Path, *extra: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    cmd = [sys.executable, SCRIPT, "--out", str(out), *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    # a budget no slow host reaches: every part must run, whatever the machine's speed
    proc = run_script(out, "--dry-run", "--budget-s", "3000")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return strict_json(out), proc.stdout


def divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


def cheapest_term(out_f: int, in_f: int) -> int:
    """The fewest parameters ``m·n + p·q`` of one Kronecker term over all ``m·p = out``, ``n·q = in``."""
    return min(m * n + (out_f // m) * (in_f // n) for m in divisors(out_f) for n in divisors(in_f))


def kron_share(rank: int, shape: list[int], out_f: int, in_f: int) -> float:
    m, n, p, q = shape
    return 3 * rank * min(n * p * (q + m), m * q * (n + p)) / (2 * out_f * in_f)


def check_kron_shape(shape: list[int], out_f: int, in_f: int) -> None:
    m, n, p, q = shape
    assert m * p == out_f and n * q == in_f


def positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_part_is_recorded_and_the_versions_are_the_interpreters(dry_run: tuple[dict, str]) -> None:
    data, _ = dry_run
    assert data["dry_run"] is True and data["finished"] is True and data["device"] == "cpu"
    assert list(data["parts"]) == PARTS
    for name in PARTS[:-1]:
        assert data["parts"][name]["status"] == "done", data["parts"][name].get("reason")
        assert positive(data["parts"][name]["seconds"])
    assert data["parts"]["compare"] == {"status": "skipped", "reason": "dry run"}
    import peft
    import transformers

    env = data["environment"]
    assert env["python"] == platform.python_version()
    assert (env["torch"], env["transformers"], env["peft"]) == (
        torch.__version__,
        transformers.__version__,
        peft.__version__,
    )
    assert env["axolotl_soka"] and "axolotl_soka_error" not in env
    # SoKA's PEFT part brings no module of its own beyond torch, transformers and peft
    assert not {"kneed", "matplotlib", "rich", "pydantic", "axolotl"} & set(env["imported_by_axolotl_soka"])
    assert set(env["modules_available"]) >= {"tqdm", "kneed", "matplotlib", "rich", "pydantic", "axolotl"}


def test_layer_rows_have_the_real_counts_and_shares_of_their_shapes(dry_run: tuple[dict, str]) -> None:
    part = dry_run[0]["parts"]["layer"]
    sizes = sorted({(r["out"], r["in"]) for r in part["rows"]})
    assert len(sizes) == 2
    for out_f, in_f in sizes:
        rows = [r for r in part["rows"] if (r["out"], r["in"]) == (out_f, in_f)]
        kinds = sorted(r["kind"] for r in rows)
        assert kinds == ["base", "lokr", "lora", "lora", "soka", "soka"]
        for r in rows:
            assert positive(r["ms"]) and all(positive(t) for t in r["ms_rounds"])
            assert len(r["ms_rounds"]) == part["rounds"]
            assert r["trainable"] == r["formula_params"]
            assert r["peak_extra_mib"] is None  # CUDA only
        base = next(r for r in rows if r["kind"] == "base")
        assert base["trainable"] == 0 and base["flop_share"] == 0 and base["extra_time"] == 0
        for r in (r for r in rows if r["kind"] == "lora"):
            assert r["trainable"] == r["rank"] * (in_f + out_f)
            assert r["flop_share"] == pytest.approx(3 * r["rank"] * (in_f + out_f) / (2 * out_f * in_f))
        one, budget = sorted((r for r in rows if r["kind"] == "soka"), key=lambda r: r["rank"])
        # one balanced term: the cheapest shape there is, plus its σ
        check_kron_shape(one["shape"], out_f, in_f)
        term = one["shape"][0] * one["shape"][1] + one["shape"][2] * one["shape"][3]
        assert one["rank"] == 1 and term == cheapest_term(out_f, in_f) and one["trainable"] == term + 1
        # LoRA r=8's count: as many balanced terms as fit, so one more would not
        lora8 = 8 * (in_f + out_f)
        assert budget["shape"] == one["shape"]
        assert budget["trainable"] == budget["rank"] * (term + 1) <= lora8 < budget["trainable"] + term + 1
        lokr = next(r for r in rows if r["kind"] == "lokr")
        check_kron_shape(lokr["shape"], out_f, in_f)
        m, n, p, q = lokr["shape"]
        assert lokr["trainable"] == m * n + p * q
        assert lokr["executed_flop_share"] == pytest.approx(1.5)
        for r in (one, budget, lokr):
            assert r["flop_share"] == pytest.approx(kron_share(r["rank"], r["shape"], out_f, in_f))
        for r in rows:
            if r["kind"] != "base":
                assert r["time_per_flop_share"] == pytest.approx(r["extra_time"] / r["flop_share"])
        for r in (one, budget):
            assert r["target_pass"] == (r["time_per_flop_share"] <= 1.1)


@pytest.mark.parametrize("name", ["step", "step_compiled"])
def test_step_rows_compare_soka_with_lora_at_its_real_count(dry_run: tuple[dict, str], name: str) -> None:
    part = dry_run[0]["parts"][name]
    assert part["compile_backend"] == (None if name == "step" else "eager")
    layers = part["llama"]["num_hidden_layers"]
    targets = part["targets"]
    assert len(targets) == part["target_modules"] == 7 * layers
    assert {t["module"].split(".")[-1] for t in targets} == LLAMA_TARGETS
    io_sum = sum(t["in"] + t["out"] for t in targets)
    assert part["sum_in_plus_out"] == io_sum
    soka, same, lora16 = part["rows"]
    assert [soka["run"], same["run"], lora16["run"]] == ["soka", "lora-same", "lora-r16"]
    # one balanced term (and its σ) on every target module
    by_name = {t["module"]: t for t in targets}
    assert set(soka["modules"]) == set(by_name)
    total = 0
    for module, sel in soka["modules"].items():
        out_f, in_f = by_name[module]["out"], by_name[module]["in"]
        check_kron_shape(sel["shape"], out_f, in_f)
        term = sel["shape"][0] * sel["shape"][1] + sel["shape"][2] * sel["shape"][3]
        assert sel["rank"] == 1 and term == cheapest_term(out_f, in_f) and sel["trainable"] == term + 1
        total += term + 1
    assert soka["trainable"] == soka["formula_params"] == total
    assert same["rank"] == max(1, round(total / io_sum))
    assert same["trainable"] == same["formula_params"] == same["rank"] * io_sum
    assert lora16["rank"] == 16 and lora16["trainable"] == 16 * io_sum
    for row in part["rows"]:
        if name == "step":
            assert "error" not in row
        if "error" not in row:  # a compile may fail; the error is then the result
            assert positive(row["s_per_step"]) and positive(row["first_step_s"])
            assert all(positive(t) for t in row["step_seconds"])
            assert row["peak_mib"] is None
    if "error" not in soka and "error" not in same:
        assert soka["vs_lora_same_params"] == pytest.approx(soka["s_per_step"] / same["s_per_step"])
        assert soka["target_pass"] == (soka["vs_lora_same_params"] <= 1.05)


def test_init_covers_every_shape_it_counts(dry_run: tuple[dict, str]) -> None:
    part = dry_run[0]["parts"]["init"]
    rows = part["rows"]
    assert part["covered"] == part["shapes_total"] == len(rows) > 0
    assert len(rows) % 7 == 0  # seven targets per LLaMA layer
    hidden = rows[0]["in"]
    inter = next(r["out"] for r in rows if r["module"].endswith("gate_proj"))
    for r in rows:
        expected = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        assert (r["out"], r["in"]) == expected.get(r["module"].split(".")[-1], (hidden, hidden))
        check_kron_shape(r["shape"], r["out"], r["in"])
        assert positive(r["seconds"]) and 1 <= r["rank"] <= part["config"]["max_rank"]
        term = r["shape"][0] * r["shape"][1] + r["shape"][2] * r["shape"][3]
        assert r["trainable"] == r["rank"] * (term + 1)
    assert part["seconds_total"] == pytest.approx(sum(r["seconds"] for r in rows))
    assert part["target_pass"] == (part["seconds_total"] <= 10.0)
    assert part["config"]["init"] == "kpsvd" and positive(part["warmup_s"])


def test_the_markdown_has_every_table(dry_run: tuple[dict, str]) -> None:
    stdout = dry_run[1]
    for header in [
        "| python | torch | CUDA | GPU | transformers | peft |",
        "| layer | method | trainable | ms | extra time vs base | FLOP share | time / FLOP share | target ≤ 1.1× |",
        "| run | compile | trainable | share of base | s/step | vs LoRA same params | target ≤ 1.05× |",
        "| shape (out×in) | matrices | seconds | ms each |",
        "| matrices | total s | target ≤ 10 s |",
        "| check | measured | target | result |",
    ]:
        assert header in stdout
    assert stdout.count("### 2. Training step") == 2
    assert "[compare] skipped: dry run" in stdout


def test_a_spent_budget_skips_every_part_with_its_reason(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = run_script(out, "--dry-run", "--budget-s", "1", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = strict_json(out)
    assert list(data["parts"]) == PARTS and data["finished"] is True
    for name in PARTS[:-1]:
        part = data["parts"][name]
        assert part["status"] == "skipped" and "left of the 1 s budget" in part["reason"]
    assert data["environment"]["torch"] == torch.__version__


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_asks_for_the_dry_run(tmp_path: Path) -> None:
    proc = run_script(tmp_path / "gpu_check.json", timeout=600)
    assert proc.returncode == 2
    assert "no CUDA device: run with --dry-run" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()
