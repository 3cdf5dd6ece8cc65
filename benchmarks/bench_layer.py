"""Layer benchmark: SoKA vs PEFT LoRA at equal trainable parameters, against the frozen base layer.

For each layer size, times forward+backward over ``--tokens`` tokens (the input requires grad, as inside a
network), counts the bytes autograd saves for backward (activation memory) and, on CUDA, the peak memory. The
models are timed in interleaved rounds and each round's extra time is taken against that round's base, so a
shared machine whose speed drifts does not favour any model; the table gives medians over the rounds, and beside them a
"best" estimate from each model's fastest round (other work on the machine only ever adds time). A
reference row runs the same SoKA factors through plain autograd ops (the intermediate kept for backward), and
a "dense forward" row runs the same SoKA layer with ``forward_mode="dense"`` (one GEMM on ``W + ΔW``, formed
per call; its FLOP share is still counted as the factored product's, so the two rows compare directly), and
a last row is SoKA with the LoRA-like shape ``(out, 1, 1, in)`` at LoRA's rank (LoRA's FLOPs). It also times
KPSVD initialisation of one matrix, full vs lowrank. Prints markdown tables.

    python benchmarks/bench_layer.py                       # fp32 on CPU
    python benchmarks/bench_layer.py --device cuda --dtype bf16
    python benchmarks/bench_layer.py --only layers --bias      # biased layers on 3-d input
    python benchmarks/bench_layer.py --only layers --compile   # every model through torch.compile

FLOP model (multiply-adds per token): base ``out·in`` forward and ``out·in`` backward (input grad only; the
base is frozen). SoKA term, cheaper contraction order: ``c = min(n·p·(q+m), m·q·(n+p))`` forward and
``2c`` backward (input and factor grads; SoKA's autograd function recomputes the first product in backward,
``n·p·q`` or ``m·q·n`` more, which the share does not count; LoRA-like shapes keep it instead). LoRA rank:
``in + out`` forward, ``2(in + out)`` backward.

The FLOP share above is what an adapter that keeps its ``r·n·p``-per-token intermediate for backward needs.
Keeping nothing, as SoKA's factored forward does, needs at least one more first product per term and token:
the backward then takes five products, whichever order it runs them in (``dX = Aᵀ·dY·B`` takes two, ``dA`` one
more on either of its intermediates, ``dB`` two that share nothing with them). The "executed" columns count
those FLOPs, which are the ones SoKA runs; they answer how efficiently its products run, where the share above
also charges the choice to keep no activations.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

import axolotl_soka  # noqa: E402,F401  (registers SoKA with PEFT)
from axolotl_soka import SokaConfig  # noqa: E402
from axolotl_soka.kron import balanced_shape, contraction_costs, kpsvd, lora_shape  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYERS = [(4096, 4096), (11008, 4096)]
LORA_RANK = 8


class OneLinear(nn.Module):
    """A model holding one linear layer named ``proj`` (bias-free unless ``bias``)."""

    def __init__(self, out_features: int, in_features: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: set[int]) -> tuple[torch.Tensor, int]:
    """Run ``fn`` and count the bytes of tensors autograd saves for backward (deduplicated by storage),
    leaving out the storages in ``exclude`` (the model's parameters and the input: not extra memory)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def plain_autograd_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The factored apply written with plain autograd ops (B first), as SoKA ran before its autograd
    function: the ``r·n·p``-per-token intermediate is kept for backward. A reference row, not library code."""
    r, m, n = A.shape
    _, p, q = B.shape
    tokens = x.reshape(-1, n, q)
    N = tokens.shape[0]
    t = (tokens.reshape(N * n, q) @ B.reshape(r * p, q).T).reshape(N, n, r, p)
    t = t.permute(0, 3, 2, 1).reshape(N * p, r * n)
    y = (t @ A.permute(1, 0, 2).reshape(m, r * n).T).reshape(N, p, m).transpose(1, 2)
    return y.reshape(*x.shape[:-1], m * p)


class PlainSoka(nn.Module):
    """``base(x) + x·(Σ_k A_k ⊗ B_k)ᵀ`` through :func:`plain_autograd_apply`, factors taken from a SoKA model."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + plain_autograd_apply(x, self.A.to(x.dtype), self.B.to(x.dtype))


def make_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], int]:
    """One forward+backward; returns the bytes autograd saved for backward besides parameters and input."""
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}

    def step() -> int:
        x.grad = None
        for param in model.parameters():
            param.grad = None
        out, nbytes = saved_bytes(lambda: model(x), exclude)
        out.backward(grad)
        return nbytes

    return step


def timed(step: Callable[[], int], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_models(
    models: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, repeats: int
) -> dict[str, tuple[list[float], int, float]]:
    """Per model: forward+backward seconds of each round, saved-activation bytes, CUDA peak MiB (0 on CPU).

    Rounds are interleaved (every model once per round, after two warm-ups each), so that a shared machine
    whose speed drifts slows all models of a round alike; callers compare models within a round."""
    device = x.device
    steps = {name: make_step(model, x, grad) for name, model in models.items()}
    saved, peak = {}, {}
    for name, step in steps.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            saved[name] = step()
        peak[name] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            seconds[name].append(timed(step, device))
    return {name: (seconds[name], saved[name], peak[name]) for name in steps}


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bench_layers(
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    layers: list[tuple[int, int]] = LAYERS,
    lora_rank: int = LORA_RANK,
    bias: bool = False,
    compile_models: bool = False,
) -> list[dict]:
    """Rows of the layer table. With ``bias`` the layers have a bias (as Qwen2's q/k/v projections) and the
    input is ``(2, tokens / 2, in)``, the 3-d call a model makes: ``nn.Linear`` then returns a view of its
    output, which SoKA avoids by running the layer on the flattened input. With ``compile_models`` every model
    (the base too) runs through ``torch.compile`` (Axolotl's ``torch_compile: true``)."""
    rows = []
    for out_f, in_f in layers:
        torch.manual_seed(0)
        base = OneLinear(out_f, in_f, bias).to(device, dtype)
        base.requires_grad_(False)
        shape = balanced_shape(out_f, in_f)
        lora_params = lora_rank * (in_f + out_f)
        soka_rank = max(1, round(lora_params / (shape.params_per_term + 1)))
        b_first, a_first = contraction_costs(shape.m, shape.n, shape.p, shape.q)
        cost = min(b_first, a_first)
        # the first product, recomputed in backward: X·B_kᵀ (n·q·p) or A_k·X (m·n·q)
        recompute = shape.m * shape.n * shape.q if a_first < b_first else shape.n * shape.p * shape.q
        base_macs = 2 * out_f * in_f
        soka = get_peft_model(
            OneLinear(out_f, in_f, bias).to(device, dtype),
            SokaConfig(target_modules=["proj"], rank_pattern={"proj": soka_rank}),
        )
        soka_layer = soka.base_model.model.proj
        a, b = soka_layer.effective_factors("default")
        soka_name = f"SoKA r={soka_rank} {shape.as_list()}"
        models = {
            "frozen base": (base, 0),
            f"LoRA r={lora_rank}": (
                get_peft_model(
                    OneLinear(out_f, in_f, bias).to(device, dtype),
                    LoraConfig(r=lora_rank, target_modules=["proj"]),
                ),
                3 * lora_rank * (in_f + out_f),
            ),
            soka_name: (soka, 3 * soka_rank * cost),
            f"{soka_name}, dense forward": (
                get_peft_model(
                    OneLinear(out_f, in_f, bias).to(device, dtype),
                    SokaConfig(
                        target_modules=["proj"], rank_pattern={"proj": soka_rank}, forward_mode="dense"
                    ),
                ),
                3 * soka_rank * cost,
            ),
            f"{soka_name}, plain autograd": (
                PlainSoka(soka_layer.get_base_layer(), a * soka_layer.scaling["default"], b),
                3 * soka_rank * cost,
            ),
            f"SoKA r={lora_rank} LoRA-like {lora_shape(out_f, in_f).as_list()}": (
                get_peft_model(
                    OneLinear(out_f, in_f, bias).to(device, dtype),
                    SokaConfig(
                        target_modules=["proj"], factor_shape="lora", rank_pattern={"proj": lora_rank}
                    ),
                ),
                3 * lora_rank * (in_f + out_f),
            ),
        }
        # FLOPs each model runs where they differ from the share's count: the factored forward recomputes its
        # first product; the dense forward's cost is not per token and has no entry
        executed = {name: macs for name, (_, macs) in models.items()}
        executed[soka_name] = soka_rank * (3 * cost + recompute)
        executed[f"{soka_name}, dense forward"] = 0
        lead = (2, tokens // 2) if bias else (tokens,)
        if compile_models:
            torch._dynamo.reset()
            models = {name: (torch.compile(model), macs) for name, (model, macs) in models.items()}
        x = torch.randn(*lead, in_f, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(*lead, out_f, device=device, dtype=dtype)
        timings = time_models({name: model for name, (model, _) in models.items()}, x, grad, repeats)
        base_rounds = timings["frozen base"][0]
        for name, (model, extra_macs) in models.items():
            rounds, nbytes, peak = timings[name]
            flop_share = extra_macs / base_macs
            shares = sorted(t / tb - 1.0 for t, tb in zip(rounds, base_rounds, strict=True))
            time_share = statistics.median(shares)
            # best rounds: interference from other work only ever adds time, so each model's fastest round is
            # the closest to its own cost (timeit's reasoning); a second estimate beside the paired median
            best_share = min(rounds) / min(base_rounds) - 1.0
            executed_share = executed[name] / base_macs
            rows.append(
                {
                    "layer": f"{out_f}x{in_f}",
                    "method": name,
                    "trainable": trainable(model),
                    "ms": statistics.median(rounds) * 1e3,
                    "extra_time": time_share,
                    "extra_range": (shares[0], shares[-1]),
                    "extra_flops": flop_share,
                    "ratio": (time_share / flop_share) if flop_share > 0 else float("nan"),
                    "best_ms": min(rounds) * 1e3,
                    "extra_time_best": best_share,
                    "ratio_best": (best_share / flop_share) if flop_share > 0 else float("nan"),
                    "executed_flops": executed_share,
                    "ratio_executed": (time_share / executed_share) if executed_share > 0 else float("nan"),
                    "saved_mib": nbytes / 2**20,
                    "peak_mib": peak,
                }
            )
        del models, soka, timings
    return rows


def bench_kpsvd(device: torch.device, full: bool, rank: int = 64) -> list[dict]:
    rows = []
    for out_f, in_f in LAYERS:
        torch.manual_seed(0)
        weight = torch.randn(out_f, in_f, device=device)
        shape = balanced_shape(out_f, in_f)
        methods = ["lowrank", "full"] if full else ["lowrank"]
        for method in methods:
            kpsvd(weight[:64, :64], balanced_shape(64, 64), 4, method=method)  # warm up kernels
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = kpsvd(weight, shape, rank, method=method)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rows.append(
                {
                    "layer": f"{out_f}x{in_f}",
                    "R(W)": f"{shape.m * shape.n}x{shape.p * shape.q}",
                    "method": method,
                    "K": rank,
                    "seconds": time.perf_counter() - start,
                    "sigma1": float(result.S[0]),
                }
            )
    return rows


def parse_layers(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,11008x4096"`` → ``[(4096, 4096), (11008, 4096)]`` (out × in)."""
    layers = []
    for item in text.split(","):
        out_f, sep, in_f = item.strip().partition("x")
        if not sep or not out_f.isdigit() or not in_f.isdigit():
            raise SystemExit(
                f"--layers: expected OUTxIN items separated by commas (e.g. 4096x4096), got {item!r}"
            )
        layers.append((int(out_f), int(in_f)))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--no-full-svd", action="store_true", help="skip the slow full SVDs (minutes on CPU)")
    parser.add_argument("--only", choices=["layers", "kpsvd"], help="run one of the two tables")
    parser.add_argument(
        "--layers",
        default=",".join(f"{o}x{i}" for o, i in LAYERS),
        help="layer sizes OUTxIN for the layer table, comma-separated (default: LLaMA2-7B's two shapes)",
    )
    parser.add_argument(
        "--lora-rank", type=int, default=LORA_RANK, help="LoRA rank that sets the parameter count"
    )
    parser.add_argument(
        "--bias", action="store_true", help="biased layers on a (2, tokens/2, in) input (as Qwen2's q/k/v)"
    )
    parser.add_argument("--compile", action="store_true", help="run every model through torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}"
    )
    if args.only != "kpsvd":
        print_layers(args, device)
    if args.only != "layers":
        print_kpsvd(device, full=not args.no_full_svd)


def print_layers(args: argparse.Namespace, device: torch.device) -> None:
    biased = ", biased layers on (2, tokens/2, in) input" if args.bias else ""
    biased += ", torch.compile" if args.compile else ""
    print(
        f"\n### Forward+backward, {args.tokens} tokens, {args.dtype}, {args.repeats} interleaved rounds{biased}\n"
    )
    print(
        "| layer | method | trainable | ms | extra time vs base | range over rounds | extra FLOPs vs base | time/FLOP share | best ms | best: extra time | best: time/FLOP share | executed extra FLOPs | time/executed-FLOP share | saved activations MiB (besides x) | CUDA peak MiB |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in bench_layers(
        args.tokens,
        DTYPES[args.dtype],
        device,
        args.repeats,
        parse_layers(args.layers),
        args.lora_rank,
        args.bias,
        args.compile,
    ):
        # no ratio for the base itself, nor where the median round was not slower than the base (noise)
        ratio = "–" if math.isnan(r["ratio"]) or r["extra_time"] <= 0 else f"{r['ratio']:.2f}"
        best = "–" if math.isnan(r["ratio_best"]) or r["extra_time_best"] <= 0 else f"{r['ratio_best']:.2f}"
        run = "–" if math.isnan(r["ratio_executed"]) or r["extra_time"] <= 0 else f"{r['ratio_executed']:.2f}"
        executed = f"{r['executed_flops']:.1%}" if r["executed_flops"] > 0 or r["extra_flops"] == 0 else "–"
        print(
            f"| {r['layer']} | {r['method']} | {r['trainable']:,} | {r['ms']:.1f} | {r['extra_time']:+.1%} | "
            f"{r['extra_range'][0]:+.0%} … {r['extra_range'][1]:+.0%} | "
            f"{r['extra_flops']:.1%} | {ratio} | {r['best_ms']:.1f} | {r['extra_time_best']:+.1%} | {best} | "
            f"{executed} | {run} | "
            f"{r['saved_mib']:.0f} | {r['peak_mib']:.0f} |"
        )


def print_kpsvd(device: torch.device, full: bool) -> None:
    print("\n### KPSVD initialisation of one Gaussian matrix (fp32)\n")
    print("| layer | R(W) | method | K | seconds | sigma_1 |")
    print("|---|---|---|---:|---:|---:|")
    for r in bench_kpsvd(device, full=full):
        print(
            f"| {r['layer']} | {r['R(W)']} | {r['method']} | {r['K']} | {r['seconds']:.2f} | {r['sigma1']:.2f} |"
        )


if __name__ == "__main__":
    main()
