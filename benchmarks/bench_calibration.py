"""Gradient calibration on a real model: its cost, and how concentrated the gradient's Kronecker spectrum is.

On SmolLM2-135M-Instruct (the demo model) with GSM8K training rows: calibrates the mean training-loss
gradient Ḡ of every q, k, v, o, gate, up and down projection over ``--batches`` batches (time, tokens, the CPU
memory of the fp32 sums), then per module type compares the energy share held by the top Kronecker terms of
the weight W and of Ḡ (balanced shapes, lowrank KPSVD), and for a few layers runs the ``auto`` shape search on
Ḡ at LoRA r=4's per-module parameter count against the balanced shape at the same count. Prints markdown tables.

    python benchmarks/bench_calibration.py --model outputs/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from headtohead.methods import TARGETS  # noqa: E402
from headtohead.training import DATA, REPO, collate, encode, read_jsonl  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from axolotl_soka import SokaConfig, calibrate_gradients  # noqa: E402
from axolotl_soka.kron import balanced_shape, energy_kept, kpsvd, search_shape  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/models/smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=160)
    parser.add_argument("--terms", type=int, default=8, help="top Kronecker terms compared")
    parser.add_argument("--search-layers", type=int, nargs="*", default=[0, 15, 29])
    args = parser.parse_args()

    model_dir = REPO / args.model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = read_jsonl(DATA / "train.jsonl")[: args.batches * args.batch_size]
    pairs = [encode(tokenizer, r, args.max_len) for r in rows]
    batches = [
        collate(pairs[b * args.batch_size : (b + 1) * args.batch_size], pad_id) for b in range(args.batches)
    ]
    config = SokaConfig(target_modules=TARGETS, init="gradient")
    calibration = calibrate_gradients(model, config, batches, attach=False)
    sums_mib = sum(g.numel() for g in calibration.gradients.values()) * 4 / 2**20
    print(f"\nmodel {args.model}, {len(calibration.gradients)} target matrices\n")
    print("| batches | tokens with a label | mean loss | calibration s | fp32 sums MiB |")
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {calibration.batches} | {calibration.tokens:,} | {calibration.mean_loss:.3f} | "
        f"{calibration.seconds:.1f} | {sums_mib:.0f} |"
    )

    modules = dict(model.named_modules())
    shares: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    k = args.terms
    for name, grad in tqdm(calibration.gradients.items(), desc="KPSVD of W and Ḡ", unit="module"):
        weight = modules[name].weight.detach()
        shape = balanced_shape(*weight.shape)
        kind = name.rsplit(".", 1)[-1]
        for label, matrix in (("W", weight), ("G", grad)):
            result = kpsvd(matrix, shape, k, method="lowrank", niter=8, seed=0)
            shares[kind][f"{label}1"].append(energy_kept(result.S, result.total_energy, 1))
            shares[kind][f"{label}{k}"].append(energy_kept(result.S, result.total_energy, k))
    print("\nEnergy share held by the top Kronecker terms (balanced shape), mean over layers:\n")
    print(f"| module | shape | W: top 1 | W: top {k} | Ḡ: top 1 | Ḡ: top {k} |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in TARGETS:
        s = shares[kind]
        name = next(n for n in calibration.gradients if n.endswith(kind))
        shape = balanced_shape(*modules[name].weight.shape).as_list()
        mean = {key: sum(v) / len(v) for key, v in s.items()}
        print(
            f"| {kind} | {shape} | {mean['W1']:.4f} | {mean[f'W{k}']:.4f} | {mean['G1']:.4f} | "
            f"{mean[f'G{k}']:.4f} |"
        )

    print("\n`auto` shape search on Ḡ at LoRA r=4's parameter count per module:\n")
    print("| module | out×in | budget | balanced: terms, energy | auto: shape, terms, energy | search s |")
    print("|---|---|---:|---|---|---:|")
    for layer in args.search_layers:
        for kind in TARGETS:
            name = next(
                (n for n in calibration.gradients if f"layers.{layer}." in n and n.endswith(kind)), None
            )
            if name is None:
                continue
            grad = calibration.gradients[name]
            out_f, in_f = grad.shape
            budget = 4 * (out_f + in_f)
            shape = balanced_shape(out_f, in_f)
            terms = budget // (shape.params_per_term + 1)
            base = kpsvd(grad, shape, terms, method="lowrank", niter=8, seed=0)
            t0 = time.perf_counter()
            choice = search_shape(grad, budget, max_terms=64, niter=8, seed=0, module_name=name)
            seconds = time.perf_counter() - t0
            best = choice.best
            print(
                f"| {name.replace('model.', '')} | {out_f}×{in_f} | {budget:,} | {terms}, "
                f"{energy_kept(base.S, base.total_energy, terms):.4f} | {best.shape.as_list()}, {best.terms}, "
                f"{best.energy_kept:.4f} | {seconds:.1f} |"
            )


if __name__ == "__main__":
    main()
