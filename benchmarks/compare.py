"""Head-to-head benchmark: SoKA vs LoRA, PiSSA and LoKr on the same model, data, order, steps and budget.

    python benchmarks/compare.py --size cpu --model outputs/models/smollm2-135m-instruct --docs

Stage 1 trains every method over its learning-rate grid at one budget (LoRA r=4) and picks the rate with the
lowest validation loss; stage 2 runs each method at its rate at LoRA r=4 and r=16 budgets (SoKA also at 0.75×)
for every seed. Each run is a separate process writing ``runs/<key>.json``; finished runs are skipped, so an
interrupted benchmark resumes where it stopped. The report (markdown table and PNG plots) is written to the
output folder and, with ``--docs``, into ``docs/benchmarks.md`` and ``docs/img/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from headtohead.plan import SIZES, final_runs, grid_runs  # noqa: E402
from headtohead.report import choose_rates, write_report  # noqa: E402
from headtohead.training import REPO as ROOT  # noqa: E402
from headtohead.training import RunConfig  # noqa: E402


def run_all(configs: list[RunConfig], out: Path) -> list[dict]:
    """Run each config in its own process unless its result exists; return all results."""
    results = []
    for i, cfg in enumerate(configs, 1):
        path = out / "runs" / f"{cfg.key}.json"
        if not path.exists():
            print(f"[{i}/{len(configs)}] {cfg.key}", flush=True)
            cmd = [sys.executable, __file__, "--run-one", json.dumps(asdict(cfg)), "--result", str(path)]
            subprocess.run(cmd, check=True)
        else:
            print(f"[{i}/{len(configs)}] {cfg.key} (done)", flush=True)
        results.append(json.loads(path.read_text()))
    return results


def run_one(spec: str, result: Path) -> None:
    from headtohead.training import run

    outcome = run(RunConfig(**json.loads(spec)))
    result.parent.mkdir(parents=True, exist_ok=True)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome))
    tmp.replace(result)  # atomic: a killed run leaves no half-written result
    print(
        f"  trainable {outcome['trainable']:,}  val loss {outcome['val_loss']:.4f}  "
        f"accuracy {outcome['accuracy']:.3f}  {outcome['seconds_per_step']:.2f} s/step",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument(
        "--model",
        default="outputs/models/smollm2-135m-instruct",
        help="model folder; a relative path is taken from the repository root",
    )
    parser.add_argument("--out", help="output folder (default: benchmarks/results/compare-<size>)")
    parser.add_argument("--docs", action="store_true", help="write the report into docs/benchmarks.md")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        run_one(args.run_one, args.result)
        return
    if not (ROOT / args.model / "config.json").exists():
        raise SystemExit(
            f"--model {args.model!r} is not a model folder with config.json; prepare the demo model with "
            "`python -m axolotl_soka.demo.prepare_model` or pass a local Hugging Face model folder"
        )
    size = SIZES[args.size]
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"compare-{args.size}"
    out.mkdir(parents=True, exist_ok=True)
    grid = run_all(grid_runs(size, args.model), out)
    best = choose_rates(grid, size.methods)
    final = run_all(final_runs(size, args.model, best), out)
    command = f"python benchmarks/compare.py --size {args.size}" + (" --docs" if args.docs else "")
    write_report(grid, final, best, size, out, command, docs=ROOT / "docs" if args.docs else None)


if __name__ == "__main__":
    main()
