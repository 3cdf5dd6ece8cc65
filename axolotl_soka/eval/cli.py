"""``python -m axolotl_soka.eval``: score a model (base, base + SoKA/LoRA adapter) on GSM8K, MATH or MBPP.

Examples::

    python -m axolotl_soka.eval --task gsm8k --config example_configs/demo-smollm2-gsm8k.yml --limit 100
    python -m axolotl_soka.eval --task mbpp --base-model ./model --adapter ./outputs/soka --output mbpp.json

Prompts are :func:`axolotl_soka.prompts.build_prompt` (the training format); decoding is greedy and
stops at the task's stop strings. All input is checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..prompts import STOP_STRINGS, TASKS, build_prompt
from . import data as data_mod
from . import model as model_mod
from . import sandbox
from .errors import EvalInputError
from .results import ResultWriter, print_summary
from .scoring import score_many

BACKENDS = ("auto", "hf", "vllm")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="python -m axolotl_soka.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    src = p.add_argument_group("model (exactly one of --config / --base-model)")
    src.add_argument(
        "--config", help="Axolotl YAML: base_model, and lora_model_dir or output_dir for the adapter"
    )
    src.add_argument("--base-model", help="base model directory or Hub id")
    src.add_argument("--adapter", help="PEFT adapter directory (SoKA or LoRA) or 'none'")
    src.add_argument("--gguf-file", help="GGUF file name inside --base-model")
    p.add_argument(
        "--data", help="local .jsonl/.json file or Hub dataset name (default: the shipped data/ file)"
    )
    p.add_argument(
        "--mbpp-split", default="test", help=f"MBPP task_id split: {', '.join(data_mod.MBPP_SPLITS)}"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--output", help="results JSON path (default: results_<task>.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help=f"one of: {', '.join(model_mod.DTYPES)}")
    p.add_argument(
        "--backend", default="auto", help="auto (vLLM when importable with a CUDA GPU), hf or vllm"
    )
    p.add_argument("--workers", type=int, default=4, help="parallel MBPP test processes")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per MBPP program")
    p.add_argument(
        "--unsafe-exec",
        action="store_true",
        help="run MBPP programs even without bubblewrap (no OS isolation: only for trusted models)",
    )
    return p


def validate(args: argparse.Namespace) -> tuple[model_mod.ModelSpec, data_mod.Dataset]:
    """Check every flag, load the data and resolve the model; raises :class:`EvalInputError`."""
    if args.task not in TASKS:
        raise EvalInputError(f"--task: unknown task {args.task!r}; allowed: {', '.join(TASKS)}")
    for flag, value in (
        ("--limit", args.limit),
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
        ("--workers", args.workers),
    ):
        if value is not None and value < 1:
            raise EvalInputError(f"{flag}: must be an integer >= 1, got {value}")
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise EvalInputError(f"--timeout: must be a finite number of seconds > 0, got {args.timeout}")
    output = Path(output_path(args))
    if output.is_dir():
        # Checked up front: the results are first written only after the first generated batch.
        raise EvalInputError(
            f"--output: {output} is an existing directory; allowed: a file path, "
            f"e.g. --output {output / f'results_{args.task}.json'}"
        )
    if args.dtype not in model_mod.DTYPES:
        raise EvalInputError(f"--dtype: unknown dtype {args.dtype!r}; allowed: {', '.join(model_mod.DTYPES)}")
    if args.backend not in BACKENDS:
        raise EvalInputError(f"--backend: unknown backend {args.backend!r}; allowed: {', '.join(BACKENDS)}")
    spec = model_mod.resolve(
        config=args.config, base_model=args.base_model, adapter=args.adapter, gguf_file=args.gguf_file
    )
    dataset = data_mod.load(args.task, args.data, args.limit, args.mbpp_split)
    if args.backend == "vllm" and not _vllm_possible(spec):
        raise EvalInputError(
            "--backend vllm: needs vllm, a CUDA GPU, no --gguf-file and no adapter or a LoRA one"
        )
    # Last, so that other bad flags are named first; still before any model is loaded (in run()).
    if args.task == "mbpp" and not args.unsafe_exec and (problem := sandbox.isolation_error(sandbox.BWRAP)):
        raise EvalInputError(
            f"--task mbpp: {problem}; or pass --unsafe-exec to run the generated programs without OS "
            "isolation (only for trusted models)"
        )
    return spec, dataset


def output_path(args: argparse.Namespace) -> str:
    """``--output``, else ``results_<task>.json``."""
    return args.output or f"results_{args.task}.json"


def _vllm_possible(spec: model_mod.ModelSpec) -> bool:
    from .generate import vllm_usable

    return spec.gguf_file is None and spec.adapter_type in (None, "LORA") and vllm_usable()


def _completions(args: argparse.Namespace, spec: model_mod.ModelSpec, prompts: list[str], backend: str):
    """Generator of ``(indices, completions)`` batches for the chosen backend."""
    from . import generate

    stops = STOP_STRINGS[args.task]
    if backend == "vllm":
        return generate.vllm_generate(
            spec.base_model,
            prompts,
            max_new_tokens=args.max_new_tokens,
            stop_strings=stops,
            batch_size=args.batch_size,
            dtype=args.dtype,
            seed=args.seed,
            lora_path=spec.adapter,
            tokenizer_path=spec.tokenizer,
        )
    model, tokenizer = model_mod.load(spec, args.dtype)
    return generate.hf_generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        stop_strings=stops,
        batch_size=args.batch_size,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as described by ``args``; returns the final summary."""
    from tqdm import tqdm
    from transformers import set_seed

    spec, dataset = validate(args)
    set_seed(args.seed)
    backend = args.backend
    if backend == "auto":
        backend = "vllm" if _vllm_possible(spec) else "hf"
    prompts = [build_prompt(args.task, r) for r in dataset.records]
    summary = {
        "task": args.task,
        "model": spec.base_model,
        "gguf_file": spec.gguf_file,
        "adapter": spec.adapter,
        "adapter_type": spec.adapter_type,
        "data": dataset.source,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "generation": {
            "backend": backend,
            "greedy": True,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "stop_strings": list(STOP_STRINGS[args.task]),
            "dtype": args.dtype,
            "seed": args.seed,
        },
    }
    writer = ResultWriter(output_path(args), summary, total=len(prompts))
    batches = _completions(args, spec, prompts, backend)
    try:
        with tqdm(total=len(prompts), desc=args.task, unit="item", file=sys.stderr) as bar:
            for indices, completions in batches:
                records = [dataset.records[i] for i in indices]
                verdicts = score_many(
                    args.task,
                    completions,
                    records,
                    workers=args.workers,
                    timeout=args.timeout,
                    unsafe_exec=args.unsafe_exec,
                )
                for i, completion, verdict in zip(indices, completions, verdicts, strict=True):
                    item = {"id": dataset.ids[i], "prompt": prompts[i], "completion": completion}
                    writer.add(i, {**item, **verdict.to_dict()})
                writer.write("running")
                bar.update(len(indices))
                bar.set_postfix(acc=f"{writer.summarise('running')['accuracy']:.3f}")
    except KeyboardInterrupt:
        writer.write("interrupted")
        raise
    except Exception:
        writer.write("failed")
        raise
    final = writer.write("complete")
    print_summary(final)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except EvalInputError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
