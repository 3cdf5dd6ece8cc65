"""What only a GPU can tell: layer cost, training-step cost and KPSVD init time of SoKA, in one bounded run.

One script, one JSON, markdown tables on stdout. It imports only the standard library, torch, transformers,
peft and ``axolotl_soka`` (from the repository it lives in), so it runs on a bare GPU image. A global deadline
(``--budget-s``, counted from the start of the process) bounds the whole run: each part is skipped, with the
reason recorded, when the time left cannot hold it, and a part that runs over is interrupted and recorded as
timed out. The JSON is rewritten after every part (and every model of the step parts), so a kill loses at
most the part in flight.

    python benchmarks/gpu_check.py                                      # one GPU, bf16, default --out
    python benchmarks/gpu_check.py --dry-run --out gpu_check_dry.json   # toy sizes on the CPU, fp32
    python benchmarks/gpu_check.py --with-compare --compare-model DIR   # also resume compare.py --size full

Parts, in the order they run (the compiled step runs last but one: compiling is the slowest and least
predictable part, and the cheaper measurements should not wait on it):

- ``layer``: forward+backward of one ``(out, in)`` linear layer over ``T`` tokens (the input requires grad, as
  inside a network): the frozen base alone, PEFT LoRA, PEFT LoKr and SoKA at equal parameters (one balanced
  Kronecker term; and LoRA r=8's count through ``param_budget``). Timed with CUDA events after warm-up, in
  interleaved rounds (each round's extra time is taken against that round's base).
- ``step``: optimiser steps (forward, backward, gradient clipping, AdamW on the adapter) of a LLaMA-shaped
  model with random weights (TinyLlama's shapes, about 1.1B parameters), SoKA with one balanced term per
  module vs LoRA at the same parameter count vs LoRA r=16. ``step_compiled``: the same through
  ``torch.compile`` (a failing compile is recorded, not raised).
- ``init``: ``get_peft_model`` with the default SoKA config (``init="kpsvd"``) on each of LLaMA2-7B's 224
  target shapes (32 layers × q, k, v, o 4096×4096, gate, up 11008×4096, down 4096×11008), one random weight
  at a time, on the GPU.
- ``compare``: with ``--with-compare``, ``benchmarks/compare.py --size full --model DIR`` as a subprocess
  bounded by the time left (it resumes finished runs).

FLOP model (multiply-adds per token, as ``benchmarks/bench_layer.py``): the frozen base costs ``2·out·in``
(forward and input gradient). An adapter costs three times its forward (forward, input gradient, its own
gradient): LoRA ``3·r·(in + out)``; a Kronecker term of shape ``(m, n, p, q)`` in its cheaper contraction
order ``3·min(n·p·(q + m), m·q·(n + p))``. The FLOP share is adapter / base. PEFT LoKr is given the share of
its Kronecker structure, though it forms ``ΔW`` and runs a dense product (``3·out·in``, recorded as
``executed_flop_share``).

On the GPU the models are bf16 and run under bf16 autocast, as a trainer with ``bf16: true`` runs them (the
adapters keep fp32 master weights); the dry run is fp32 without autocast.

Targets: SoKA's layer extra time ≤ 1.1× its FLOP share; SoKA's step ≤ 1.05× LoRA's at the same parameter
count; the 224-matrix init ≤ 10 s.
"""

from __future__ import annotations

import time

START = time.monotonic()  # the deadline counts the imports too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # axolotl_soka from this working tree, installed or not
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from table_format import significant  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu-check" / "gpu_check.json"
TARGETS = {"layer_time_per_flop_share": 1.1, "step_vs_lora_same_params": 1.05, "init_seconds": 10.0}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAPER_SHARE = 990_000 / 6_738_415_616  # the paper's 0.99M trainable parameters on LLaMA2-7B
#: modules a bare GPU image may lack; recorded so that a missing one is known before it is needed
PROBED_MODULES = [
    "tqdm", "safetensors", "numpy", "accelerate", "triton", "deepspeed", "matplotlib", "rich", "kneed",
    "pydantic", "axolotl",
]  # fmt: skip


@dataclass
class Sizes:
    """Problem sizes: the real ones on a GPU, toy ones for ``--dry-run``."""

    layers: list[tuple[int, int]]  # (out, in)
    tokens: int
    warmup: int
    rounds: int
    iters: int  # calls per timed round
    llama: dict[str, int]
    batch: int
    seq: int
    step_warmup: int
    step_iters: int
    init_layers: int  # LLaMA2-7B has 32
    init_dims: tuple[int, int]  # (hidden, intermediate): (4096, 11008)
    estimates: dict[str, float]  # seconds a part needs at least, to decide whether it still fits


GPU_SIZES = Sizes(
    layers=[(4096, 4096), (11008, 4096)],
    tokens=8192,
    warmup=5,
    rounds=9,
    iters=25,
    llama=dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
    batch=4,
    seq=2048,
    step_warmup=3,
    step_iters=10,
    init_layers=32,
    init_dims=(4096, 11008),
    estimates={"layer": 40, "step": 60, "init": 20, "compile": 120, "compare": 60},
)
# the toy shapes keep LLaMA2-7B's MLP ratio (11008 / 4096 = 688 / 256)
DRY_SIZES = Sizes(
    layers=[(256, 256), (688, 256)],
    tokens=256,
    warmup=1,
    rounds=3,
    iters=2,
    llama=dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    batch=2,
    seq=32,
    step_warmup=1,
    step_iters=2,
    init_layers=1,
    init_dims=(256, 688),
    estimates={"layer": 5, "step": 5, "init": 5, "compile": 10, "compare": 60},
)


# ---------------------------------------------------------------------------------------------- deadline
class PartTimeout(BaseException):
    """Raised by the alarm when a part runs past the deadline. A ``BaseException`` so that no library's
    ``except Exception`` (a compiler's fallback, say) swallows it."""


class Deadline:
    """Seconds left of ``budget_s`` since :data:`START`, and an alarm that interrupts a part at the end."""

    def __init__(self, budget_s: float, reserve_s: float) -> None:
        self.budget_s = budget_s
        self.reserve_s = reserve_s  # kept back for writing the JSON and the tables

    def elapsed(self) -> float:
        return time.monotonic() - START

    def left(self) -> float:
        """Seconds a part may still use (the reserve excluded)."""
        return self.budget_s - self.elapsed() - self.reserve_s

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Raise :class:`PartTimeout` inside the block when the time left runs out."""

        def expire(signum: int, frame: Any) -> None:
            raise PartTimeout(f"interrupted at the deadline ({self.budget_s:.0f} s budget)")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.left()))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


class Report:
    """The JSON document, written atomically to ``path`` on every :meth:`save`."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path = path
        self.data = data

    def save(self, deadline: Deadline) -> None:
        self.data["elapsed_s"] = deadline.elapsed()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(clean(self.data), indent=1))
        tmp.replace(self.path)  # a kill mid-write leaves the previous version


def run_part(
    report: Report,
    deadline: Deadline,
    name: str,
    needs_s: float,
    body: Callable[[dict], None],
    render: Callable[[dict], str],
    skip: str | None = None,
) -> dict:
    """Run ``body(record)`` as part ``name`` unless ``skip`` (a reason) or fewer than ``needs_s`` seconds
    are left. ``body`` fills ``record`` as it goes, so a timeout or an error keeps what was measured;
    ``render(record)`` (the part's markdown) is printed at once, whatever the outcome. Status: done, partial
    (set by the body), skipped, timed_out or failed."""
    record: dict = {"status": "running"}
    report.data["parts"][name] = record
    left = deadline.left()
    if skip is None and left < needs_s:
        skip = f"needs about {needs_s:.0f} s, {max(0.0, left):.1f} s left of the {deadline.budget_s:.0f} s budget"
    if skip is not None:
        record.update(status="skipped", reason=skip)
        print(f"\n[{name}] skipped: {skip}", flush=True)
        report.save(deadline)
        return record
    print(f"\n[{name}] running ({left:.0f} s left)", flush=True)
    start = time.monotonic()
    try:
        with deadline.guard():
            body(record)
        if record["status"] == "running":
            record["status"] = "done"
    except PartTimeout as exc:
        record.update(status="timed_out", reason=str(exc))
    except Exception as exc:  # one broken part must not cost the others
        record.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:2000])
        record["traceback"] = traceback.format_exc()[-4000:]
    record["seconds"] = time.monotonic() - start
    free_memory()
    report.save(deadline)
    if record["status"] != "done":
        print(f"[{name}] {record['status']}: {record.get('reason', '')}", flush=True)
    if record.get("rows") or name == "compare":
        try:
            print(render(record), flush=True)
        except Exception as exc:  # a partial record may lack what a table needs; the JSON has it all
            print(f"[{name}] no table: {type(exc).__name__}: {exc}", flush=True)
    return record


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def quiet_stderr() -> Iterator[io.StringIO]:
    """Keep SoKA's per-call init progress bar (and library warnings) out of the output; the tables must stay
    in the last lines that a bounded log keeps."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        yield buffer


# ---------------------------------------------------------------------------------------------- environment
def module_available(name: str) -> bool:
    """Whether ``name`` can be imported (found, not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-installed package counts as missing
        return False


def environment(device: torch.device) -> dict:
    """Versions and hardware, which optional modules exist, and what importing ``axolotl_soka`` adds."""
    import peft
    import transformers

    stdlib = set(sys.stdlib_module_names)
    before = {name.split(".")[0] for name in sys.modules}
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "modules_available": {name: module_available(name) for name in PROBED_MODULES},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            gpu_capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
    try:
        import axolotl_soka

        env["axolotl_soka"] = axolotl_soka.__version__
        env["axolotl_soka_path"] = str(Path(axolotl_soka.__file__).resolve().parent.relative_to(REPO))
    except Exception as exc:  # recorded; every part that needs it then fails with the same error
        env["axolotl_soka_error"] = f"{type(exc).__name__}: {exc}"
    after = {name.split(".")[0] for name in sys.modules}
    # third-party modules that axolotl_soka's PEFT part imports beyond what torch, transformers and peft did
    env["imported_by_axolotl_soka"] = sorted(after - before - stdlib - {"axolotl_soka"})
    return env


def environment_markdown(env: dict) -> str:
    gpu = env.get("gpu", "none")
    return "\n".join(
        [
            "\n### Environment\n",
            "| python | torch | CUDA | GPU | transformers | peft | axolotl_soka |",
            "|---|---|---|---|---|---|---|",
            f"| {env['python']} | {env['torch']} | {env['cuda']} | {gpu} | {env['transformers']} | "
            f"{env['peft']} | {env.get('axolotl_soka', env.get('axolotl_soka_error', '?'))} |",
        ]
    )


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """Seconds per call of ``fn``: CUDA events on a GPU (no host sync inside the timed calls), else the
    wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn: Callable[[], Any], calls: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - begin) / calls


def peak_extra_mib(fn: Callable[[], Any], device: torch.device) -> tuple[float | None, float | None]:
    """``(peak MiB allocated during fn, that peak minus what was allocated before)``; ``None`` off CUDA."""
    if device.type != "cuda":
        fn()
        return None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - before) / 2**20


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU, as a trainer with ``bf16: true`` runs the model (the adapters' fp32 master
    weights then compute in bf16 too); nothing in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------- FLOPs
def base_flops(out_f: int, in_f: int) -> int:
    """Frozen base per token: forward ``out·in`` plus input gradient ``out·in``."""
    return 2 * out_f * in_f


def lora_flops(rank: int, out_f: int, in_f: int) -> int:
    """LoRA per token: ``3·r·(in + out)`` (forward, input gradient, factor gradients)."""
    return 3 * rank * (in_f + out_f)


def kron_flops(rank: int, shape: list[int]) -> int:
    """``rank`` Kronecker terms of shape ``[m, n, p, q]`` per token: ``3·r·min(n·p·(q+m), m·q·(n+p))``."""
    m, n, p, q = shape
    return 3 * rank * min(n * p * (q + m), m * q * (n + p))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class OneLinear(nn.Module):
    """A model holding one bias-free linear layer named ``proj``, with the given ``(out, in)`` weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        self.proj = nn.Linear(in_f, out_f, bias=False, device="meta")
        self.proj.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def soka_selections(model: nn.Module) -> dict:
    """Per adapted module: ``(out, in)``, factor shape ``[m, n, p, q]``, rank and trainable parameters."""
    return {
        name: {
            "out": sel.out_features,
            "in": sel.in_features,
            "shape": sel.shape.as_list(),
            "rank": sel.rank,
            "trainable": sel.trainable_params,
        }
        for name, sel in model.base_model.soka_selections["default"].items()
    }


# ---------------------------------------------------------------------------------------------- part 1
def layer_models(weight: torch.Tensor) -> dict[str, tuple[nn.Module, dict]]:
    """The models of one layer size, each on its own copy of ``weight: (out, in)``, with their facts."""
    from peft import LoKrConfig, LoraConfig, get_peft_model

    from axolotl_soka import SokaConfig

    out_f, in_f = weight.shape
    base = OneLinear(weight.clone())
    models: dict[str, tuple[nn.Module, dict]] = {
        "frozen base": (base, {"kind": "base", "flops": 0, "formula_params": 0})
    }

    def soka(label: str, config: SokaConfig) -> None:
        with quiet_stderr():
            model = get_peft_model(OneLinear(weight.clone()), config)
        sel = soka_selections(model)["proj"]
        # one σ per term with sigma_mode="separate" (the default)
        formula = sel["rank"] * (sel["shape"][0] * sel["shape"][1] + sel["shape"][2] * sel["shape"][3] + 1)
        name = f"SoKA {label} r={sel['rank']} {sel['shape']}"
        facts = {"kind": "soka", "rank": sel["rank"], "shape": sel["shape"], "formula_params": formula}
        models[name] = (model, {**facts, "flops": kron_flops(sel["rank"], sel["shape"])})

    def lora(rank: int, label: str) -> None:
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], lora_dropout=0.0)
        model = get_peft_model(OneLinear(weight.clone()), config)
        facts = {"kind": "lora", "rank": rank, "formula_params": rank * (in_f + out_f)}
        models[f"LoRA r={rank}{label}"] = (model, {**facts, "flops": lora_flops(rank, out_f, in_f)})

    lora(8, "")
    soka("one term", SokaConfig(target_modules=["proj"], rank_pattern={"proj": 1}))
    one_term = models[next(name for name in models if name.startswith("SoKA one term"))][1]["formula_params"]
    lora(max(1, round(one_term / (in_f + out_f))), " (≈ one Kronecker term)")
    # r at least the larger second factor side: LoKr then keeps both factors full (one Kronecker term)
    lokr = get_peft_model(
        OneLinear(weight.clone()),
        LoKrConfig(r=max(out_f, in_f), alpha=1, target_modules=["proj"], decompose_both=False),
    )
    layer = lokr.base_model.model.proj
    (m, n), (p, q) = layer.lokr_w1["default"].shape, layer.lokr_w2["default"].shape
    models[f"LoKr one term {[m, n, p, q]}"] = (
        lokr,
        {
            "kind": "lokr",
            "rank": 1,
            "shape": [m, n, p, q],
            "formula_params": m * n + p * q,
            "flops": kron_flops(1, [m, n, p, q]),
            "executed_flops": 3 * out_f * in_f,  # ΔW formed, then one dense product each way
        },
    )
    # LoRA r=8's count shared by the budget: selection settings that never stop below it (random weights'
    # flat spectrum has no elbow worth keeping), so the budget alone sets the number of terms
    soka(
        "LoRA r=8 budget",
        SokaConfig(
            target_modules=["proj"],
            param_budget=8 * (in_f + out_f),
            energy_threshold=1.0,
            elbow_mode="none",
            rank_combine="energy",
            max_rank=64,
        ),
    )
    return models


def layer_step(
    model: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype
) -> Callable[[], None]:
    """One forward+backward of ``model`` on ``x: (T, in)`` with output gradient ``grad: (T, out)``."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        for param in params:
            param.grad = None
        with autocast(x.device, dtype):
            out = model(x)
        out.backward(grad)

    return step


def part_layer(record: dict, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> None:
    """Forward+backward of each layer model over ``sizes.tokens`` tokens (see the module docstring)."""
    timer = Timer(device)
    record.update(tokens=sizes.tokens, dtype=str(dtype), rounds=sizes.rounds, iters=sizes.iters, rows=[])
    record["autocast"] = dtype != torch.float32
    for out_f, in_f in sizes.layers:
        generator = torch.Generator(device=device).manual_seed(0)
        weight = torch.randn(out_f, in_f, generator=generator, device=device, dtype=torch.float32)
        weight = (weight / math.sqrt(in_f)).to(dtype)
        models = layer_models(weight)
        del weight
        x = torch.randn(sizes.tokens, in_f, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(sizes.tokens, out_f, device=device, dtype=dtype)

        steps = {name: layer_step(model, x, grad, dtype) for name, (model, _) in models.items()}
        peaks = {}
        for name, step in steps.items():
            for _ in range(sizes.warmup):
                step()
            peaks[name] = peak_extra_mib(step, device)[1]
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(sizes.rounds):  # interleaved: a drifting machine slows a whole round alike
            for name, step in steps.items():
                seconds[name].append(timer.per_call(step, sizes.iters))
        base_rounds = seconds["frozen base"]
        for name, (model, facts) in models.items():
            rounds = seconds[name]
            extra = statistics.median(t / tb - 1.0 for t, tb in zip(rounds, base_rounds, strict=True))
            share = facts["flops"] / base_flops(out_f, in_f)
            ratio = extra / share if share > 0 else None
            row = {
                "layer": f"{out_f}x{in_f}",
                "out": out_f,
                "in": in_f,
                "method": name,
                **{k: v for k, v in facts.items() if k not in ("flops", "executed_flops")},
                "trainable": trainable(model),
                "ms": statistics.median(rounds) * 1e3,
                "ms_rounds": [t * 1e3 for t in rounds],
                "extra_time": extra if facts["kind"] != "base" else 0.0,
                "flop_share": share,
                "time_per_flop_share": ratio,
                "peak_extra_mib": peaks[name],
            }
            if "executed_flops" in facts:
                row["executed_flop_share"] = facts["executed_flops"] / base_flops(out_f, in_f)
            if facts["kind"] == "soka":
                row["target_pass"] = ratio is not None and ratio <= TARGETS["layer_time_per_flop_share"]
            record["rows"].append(row)
        del models, steps
        free_memory()


def layer_markdown(record: dict) -> str:
    lines = [
        f"\n### 1. Layer cost: forward+backward, {record['tokens']} tokens, {record['dtype']}, "
        f"{record['rounds']} interleaved rounds of {record['iters']} calls\n",
        "| layer | method | trainable | ms | extra time vs base | FLOP share | time / FLOP share | "
        f"target ≤ {TARGETS['layer_time_per_flop_share']}× | peak extra MiB |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in record["rows"]:
        ratio = r["time_per_flop_share"]
        verdict = {True: "pass", False: "FAIL"}.get(r.get("target_pass"), "–")
        peak = "–" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        lines.append(
            f"| {r['layer']} | {r['method']} | {r['trainable']:,} | {significant(r['ms'])} | "
            f"{r['extra_time']:+.1%} | {r['flop_share']:.2%} | {'–' if ratio is None else f'{ratio:.2f}'} | "
            f"{verdict} | {peak} |"
        )
    lines.append(
        "\nLoKr (PEFT) forms ΔW and runs a dense product, about 150 % of the base's FLOPs, whatever its share."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- part 2
class StepBench:
    """A LLaMA-shaped model with random weights, built once and copied for each adapter."""

    def __init__(self, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> None:
        self.sizes, self.device, self.dtype = sizes, device, dtype
        self._base: nn.Module | None = None
        self.facts: dict[str, Any] = {}

    def release(self) -> None:
        """Drop the base model (the GPU memory is needed by what runs next)."""
        self._base = None

    def base(self) -> nn.Module:
        if self._base is None:
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(**self.sizes.llama, max_position_embeddings=self.sizes.seq, use_cache=False)
            torch.manual_seed(0)
            with self.device:  # initialised where it runs: no host copy of a 1B model
                model = LlamaForCausalLM(config)
            self._base = model.to(self.dtype).train()
            self.targets = [
                (name, mod.out_features, mod.in_features)
                for name, mod in self._base.named_modules()
                if isinstance(mod, nn.Linear) and name.split(".")[-1] in LLAMA_TARGETS
            ]
            self.facts = {
                "llama": self.sizes.llama,
                "base_params": sum(p.numel() for p in self._base.parameters()),
                "attn_implementation": getattr(config, "_attn_implementation", None),
                "target_modules": len(self.targets),
                "sum_in_plus_out": sum(o + i for _, o, i in self.targets),
                "batch": self.sizes.batch,
                "seq": self.sizes.seq,
            }
            self.facts["paper_share_params"] = round(PAPER_SHARE * self.facts["base_params"])
            generator = torch.Generator(device=self.device).manual_seed(1)
            self.ids = torch.randint(
                0,
                self.sizes.llama["vocab_size"],
                (self.sizes.batch, self.sizes.seq),
                generator=generator,
                device=self.device,
            )
        return self._base

    def build(self, method: str, rank: int | None = None) -> tuple[nn.Module, dict]:
        """A copy of the base with ``soka`` (one balanced term per module) or LoRA of ``rank``."""
        from peft import LoraConfig, get_peft_model

        from axolotl_soka import SokaConfig

        model = copy.deepcopy(self.base())
        if method == "soka":
            with quiet_stderr():
                model = get_peft_model(
                    model, SokaConfig(target_modules=LLAMA_TARGETS, min_rank=1, max_rank=1)
                )
            modules = soka_selections(model)
            formula = sum(
                s["rank"] * (s["shape"][0] * s["shape"][1] + s["shape"][2] * s["shape"][3] + 1)
                for s in modules.values()
            )
            return model, {"method": "soka", "formula_params": formula, "modules": modules}
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LLAMA_TARGETS, lora_dropout=0.0)
        model = get_peft_model(model, config)
        return model, {"method": "lora", "rank": rank, "formula_params": rank * self.facts["sum_in_plus_out"]}

    def run(self, model: nn.Module, compile_backend: str | None, deadline: Deadline) -> dict:
        """Warm-up and timed optimiser steps; with ``compile_backend`` the model runs through torch.compile."""
        timer = Timer(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **fused)
        forward = model
        result: dict[str, Any] = {}
        if compile_backend is not None:
            torch._dynamo.reset()  # each model compiles from scratch, none reuses another's graphs
            forward = torch.compile(model, backend=compile_backend)

        def step() -> None:
            with autocast(self.device, self.dtype):
                loss = forward(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        begin = time.monotonic()
        step()  # the first step compiles
        timer.sync()
        result["first_step_s"] = time.monotonic() - begin
        for _ in range(self.sizes.step_warmup):
            step()
        result["peak_mib"], result["peak_extra_mib"] = peak_extra_mib(step, self.device)
        seconds = []
        for _ in range(self.sizes.step_iters):
            if deadline.left() < 2 * max(seconds, default=0.0):
                break  # keep what was measured rather than run into the alarm
            seconds.append(timer.per_call(step, 1))
        result["step_seconds"] = seconds
        result["s_per_step"] = statistics.median(seconds) if seconds else None
        result["tokens_per_s"] = self.sizes.batch * self.sizes.seq / result["s_per_step"] if seconds else None
        return result


def part_step(
    record: dict,
    bench: StepBench,
    deadline: Deadline,
    report: Report,
    compile_backend: str | None,
    compile_estimate_s: float,
) -> None:
    """SoKA (one term per module) vs LoRA at the same count vs LoRA r=16, eager or compiled."""
    bench.base()
    record.update(bench.facts, compile_backend=compile_backend, dtype=str(bench.dtype), rows=[])
    record["targets"] = [{"module": n, "out": o, "in": i} for n, o, i in bench.targets]
    record["autocast"] = bench.dtype != torch.float32
    plan: list[tuple[str, int | None]] = [("soka", None), ("lora-same", None), ("lora", 16)]
    estimate = compile_estimate_s
    for label, rank in plan:
        if compile_backend is not None and deadline.left() < estimate:
            record["status"] = "partial"
            record["reason"] = f"stopped before {label}: a compile needs about {estimate:.0f} s"
            break
        if label == "lora-same":  # LoRA's uniform rank nearest to SoKA's real count
            soka_params = record["rows"][0]["trainable"]
            rank = max(1, round(soka_params / bench.facts["sum_in_plus_out"]))
        model, facts = bench.build("soka" if label == "soka" else "lora", rank)
        row = {"run": label if label != "lora" else f"lora-r{rank}", **facts, "trainable": trainable(model)}
        record["rows"].append(row)  # before running: a timeout keeps the model's facts
        try:
            row.update(bench.run(model, compile_backend, deadline))
        except Exception as exc:  # a failing compile is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        if compile_backend is not None and "first_step_s" in row:
            estimate = max(estimate, 1.25 * row["first_step_s"])
        del model
        free_memory()
        report.save(deadline)
    rows = {r["run"]: r for r in record["rows"]}
    soka, same = rows.get("soka"), rows.get("lora-same")
    if soka and same and soka.get("s_per_step") and same.get("s_per_step"):
        ratio = soka["s_per_step"] / same["s_per_step"]
        soka["vs_lora_same_params"] = ratio
        soka["target_pass"] = ratio <= TARGETS["step_vs_lora_same_params"]


def step_markdown(record: dict) -> str:
    mode = f"torch.compile ({record['compile_backend']})" if record["compile_backend"] else "eager"
    lines = [
        f"\n### 2. Training step, {mode}: LLaMA-shaped, {significant(record['base_params'] / 1e6)}M parameters, "
        f"{record['batch']}×{record['seq']} tokens, {record['dtype']}, AdamW on the adapter\n",
        f"| run | compile | trainable | share of base | s/step | vs LoRA same params | "
        f"target ≤ {TARGETS['step_vs_lora_same_params']}× | peak MiB | first step s | error |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in record["rows"]:
        ratio = r.get("vs_lora_same_params")
        verdict = {True: "pass", False: "FAIL"}.get(r.get("target_pass"), "–")
        sps = r.get("s_per_step")
        peak, first = r.get("peak_mib"), r.get("first_step_s")
        lines.append(
            f"| {r['run']} | {mode} | {r['trainable']:,} | {r['trainable'] / record['base_params']:.4%} | "
            f"{'–' if sps is None else significant(sps)} | {'–' if ratio is None else f'{ratio:.3f}×'} | "
            f"{verdict} | {'–' if peak is None else f'{peak:.0f}'} | "
            f"{'–' if first is None else significant(first)} | {r.get('error', '')[:120]} |"
        )
    lines.append(
        f"\nThe paper's share (0.99M of LLaMA2-7B's parameters) would be {record['paper_share_params']:,} "
        "parameters here."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- part 3
def init_shapes(sizes: Sizes) -> list[tuple[str, int, int]]:
    """LLaMA's seven targets per layer: ``(name, out, in)``, ``init_layers`` layers."""
    hidden, inter = sizes.init_dims
    per_layer = [
        *((f"self_attn.{p}", hidden, hidden) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp.gate_proj", inter, hidden),
        ("mlp.up_proj", inter, hidden),
        ("mlp.down_proj", hidden, inter),
    ]
    return [(f"layers.{i}.{n}", o, k) for i in range(sizes.init_layers) for n, o, k in per_layer]


def part_init(
    record: dict, sizes: Sizes, device: torch.device, dtype: torch.dtype, deadline: Deadline
) -> None:
    """``get_peft_model`` (default SoKA config, kpsvd init) on each target shape, one random weight at a time;
    only the call is timed, not the weight's generation."""
    from peft import get_peft_model

    from axolotl_soka import SokaConfig

    timer = Timer(device)
    config = SokaConfig(target_modules=["proj"])
    shapes = init_shapes(sizes)
    record.update(
        shapes_total=len(shapes),
        weight_dtype=str(dtype),
        config={k: getattr(config, k) for k in ("init", "svd", "svd_niter", "max_rank", "search_window")},
        rows=[],
    )
    generator = torch.Generator(device=device).manual_seed(0)

    def one(out_f: int, in_f: int) -> tuple[float, dict]:
        weight = torch.randn(out_f, in_f, generator=generator, device=device, dtype=dtype)
        model = OneLinear(weight)
        timer.sync()
        begin = time.perf_counter()
        with quiet_stderr():
            model = get_peft_model(model, config)
        timer.sync()
        return time.perf_counter() - begin, soka_selections(model)["proj"]

    record["warmup_s"] = one(sizes.init_dims[0], sizes.init_dims[0])[0]  # kernels and solver handles
    for name, out_f, in_f in shapes:
        slowest = max((r["seconds"] for r in record["rows"]), default=record["warmup_s"])
        if deadline.left() < 2 * slowest:
            record["status"] = "partial"
            record["reason"] = f"stopped after {len(record['rows'])} of {len(shapes)} shapes at the deadline"
            break
        seconds, sel = one(out_f, in_f)
        record["rows"].append({"module": name, "out": out_f, "in": in_f, "seconds": seconds, **sel})
    record["covered"] = len(record["rows"])
    record["seconds_total"] = sum(r["seconds"] for r in record["rows"])
    if record["covered"]:
        record["estimated_total_s"] = record["seconds_total"] * len(shapes) / record["covered"]
    if record["covered"] == len(shapes):
        record["target_pass"] = record["seconds_total"] <= TARGETS["init_seconds"]


def init_markdown(record: dict) -> str:
    lines = [
        f"\n### 3. KPSVD init of LLaMA2-7B's target shapes ({record['weight_dtype']} weights, "
        f"svd={record['config']['svd']}, max_rank={record['config']['max_rank']})\n",
        "| shape (out×in) | matrices | seconds | ms each | ranks | factor shape |",
        "|---|---:|---:|---:|---|---|",
    ]
    kinds: dict[tuple[int, int], list[dict]] = {}
    for r in record["rows"]:
        kinds.setdefault((r["out"], r["in"]), []).append(r)
    for (out_f, in_f), rows in kinds.items():
        total = sum(r["seconds"] for r in rows)
        ranks = sorted({r["rank"] for r in rows})
        lines.append(
            f"| {out_f}×{in_f} | {len(rows)} | {significant(total)} | {significant(1e3 * total / len(rows))} | "
            f"{', '.join(map(str, ranks))} | {rows[0]['shape']} |"
        )
    verdict = {True: "pass", False: "FAIL"}.get(record.get("target_pass"), "–")
    lines += [
        "",
        f"| matrices | total s | target ≤ {TARGETS['init_seconds']:.0f} s |",
        "|---:|---:|---|",
        f"| {len(record['rows'])} of {record['shapes_total']} | "
        f"{significant(sum(r['seconds'] for r in record['rows']))} | {verdict} |",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- part 4
def compare_skip_reason(args: argparse.Namespace) -> str | None:
    """Why ``compare.py`` cannot run here, or ``None``."""
    if args.dry_run:
        return "dry run"
    if not args.with_compare:
        return "not requested (--with-compare)"
    if args.compare_model is None or not (Path(args.compare_model) / "config.json").exists():
        return f"--compare-model {args.compare_model!r} is not a local model folder with config.json"
    if not module_available("matplotlib"):
        return "benchmarks/compare.py imports matplotlib (its report's plots), which this environment lacks"
    return None


def part_compare(record: dict, args: argparse.Namespace, deadline: Deadline) -> None:
    """``compare.py --size full`` in a subprocess, stopped before the deadline (finished runs are kept; a
    later call resumes). It runs in its own process group, so stopping it also stops the training run it
    started; its output goes to ``compare.log`` beside the JSON."""
    timeout = max(1.0, deadline.left() - 5)
    cmd = [sys.executable, str(REPO / "benchmarks" / "compare.py"), "--size", "full"]
    cmd += ["--model", str(Path(args.compare_model).resolve())]
    log = args.out.with_name("compare.log")
    record.update(command=" ".join(cmd[1:]), timeout_s=timeout, log=log.name)
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            record["returncode"] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            record.update(status="partial", reason=f"stopped after {timeout:.0f} s; rerun to resume")
        finally:  # also on the deadline's alarm
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            record["output_tail"] = log.read_text(errors="replace")[-4000:]
    if record.get("returncode") not in (None, 0):
        record.update(status="failed", reason=f"exit code {record['returncode']}")


def compare_markdown(record: dict) -> str:
    return f"\n### 4. compare.py --size full: {record['status']}\n\n{record.get('output_tail', '')[-1500:]}"


# ---------------------------------------------------------------------------------------------- summary
def summary_markdown(parts: dict) -> str:
    lines = ["\n### Targets\n", "| check | measured | target | result |", "|---|---|---|---|"]
    for r in parts.get("layer", {}).get("rows", []):
        if r.get("kind") == "soka":
            ratio = r["time_per_flop_share"]
            lines.append(
                f"| layer {r['layer']} {r['method']} | {'–' if ratio is None else f'{ratio:.2f}'}× FLOP share | "
                f"≤ {TARGETS['layer_time_per_flop_share']}× | {'pass' if r['target_pass'] else 'FAIL'} |"
            )
    for key in ("step", "step_compiled"):
        for r in parts.get(key, {}).get("rows", []):
            if "target_pass" in r:
                lines.append(
                    f"| {key} soka vs lora-same | {r['vs_lora_same_params']:.3f}× | "
                    f"≤ {TARGETS['step_vs_lora_same_params']}× | {'pass' if r['target_pass'] else 'FAIL'} |"
                )
    init = parts.get("init", {})
    if "target_pass" in init:
        lines.append(
            f"| init {init['covered']} matrices | {init['seconds_total']:.2f} s | ≤ {TARGETS['init_seconds']:.0f} s | "
            f"{'pass' if init['target_pass'] else 'FAIL'} |"
        )
    statuses = ", ".join(f"{name}: {part['status']}" for name, part in parts.items())
    return "\n".join([*lines, f"\nParts: {statuses}"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON to write")
    parser.add_argument("--budget-s", type=float, default=450.0, help="global deadline from process start")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU in fp32")
    parser.add_argument(
        "--compile-backend",
        help="torch.compile backend (default: inductor; eager in a dry run, where compiling C++ is too slow)",
    )
    parser.add_argument(
        "--compile-estimate-s",
        type=float,
        help="seconds one model's compile is assumed to need before the first one is measured",
    )
    parser.add_argument("--with-compare", action="store_true", help="also run compare.py --size full")
    parser.add_argument("--compare-model", help="local model folder for compare.py")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run for the CPU check of this script")
    return args


def main() -> int:
    args = parse_args()
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    compile_estimate = args.compile_estimate_s or sizes.estimates["compile"]
    deadline = Deadline(args.budget_s, reserve_s=2.0 if args.dry_run else 10.0)
    env = environment(device)
    report = Report(
        args.out,
        {
            "script": "benchmarks/gpu_check.py",
            "dry_run": args.dry_run,
            "budget_s": args.budget_s,
            "device": str(device),
            "dtype": str(dtype),
            "targets": TARGETS,
            "environment": env,
            "parts": {},
            "finished": False,
        },
    )
    report.save(deadline)
    print(environment_markdown(env), flush=True)
    bench = StepBench(sizes, device, dtype)
    est = sizes.estimates
    run_part(
        report, deadline, "layer", est["layer"], lambda r: part_layer(r, sizes, device, dtype), layer_markdown
    )
    run_part(
        report,
        deadline,
        "step",
        est["step"],
        lambda r: part_step(r, bench, deadline, report, None, 0.0),
        step_markdown,
    )
    run_part(
        report,
        deadline,
        "init",
        est["init"],
        lambda r: part_init(r, sizes, device, dtype, deadline),
        init_markdown,
    )
    run_part(
        report,
        deadline,
        "step_compiled",
        compile_estimate,
        lambda r: part_step(r, bench, deadline, report, backend, compile_estimate),
        step_markdown,
    )
    bench.release()
    free_memory()
    run_part(
        report,
        deadline,
        "compare",
        est["compare"],
        lambda r: part_compare(r, args, deadline),
        compare_markdown,
        skip=compare_skip_reason(args),
    )
    report.data["finished"] = True
    report.save(deadline)
    print(summary_markdown(report.data["parts"]))
    print(f"\nwrote {args.out} after {deadline.elapsed():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip the interpreter's teardown (compile worker pools, the CUDA context): the deadline holds to the end
    os._exit(code)
