"""Head-to-head benchmark: SoKA vs LoRA, PiSSA and LoKr on the same model, data, order, steps and budget.

    python benchmarks/compare.py --size cpu --model outputs/models/smollm2-135m-instruct --docs

Tier by tier (a budget: one Kronecker term per module, or LoRA's count at rank r), stage 1 trains every method
over its learning-rate grid and picks the rate with the lowest validation loss (with ``extend``, the grid grows
until that rate is interior); stage 2 runs each method at its rate (SoKA also at 0.75× the tier) for every
seed. A tier without a grid of its own takes the rates of the size's first grid tier. Each run is a separate process writing ``runs/<key>.json``; finished runs are skipped, so an
interrupted benchmark resumes where it stopped. A run of a measured size starts a fresh interpreter, so its peak
RSS is that of a whole process; the quick size's runs are forked from a server that imported the libraries
once, which saves about 15 s of imports per run on a 2-core CPU (see ``run_processes``). The report (markdown
table and PNG plots) is written to the output folder and, with ``--docs``, into ``docs/benchmarks.md`` and
``docs/img/``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from headtohead.plan import SIZES, extension, final_runs, grid_runs  # noqa: E402
from headtohead.report import choose_rates, write_report  # noqa: E402
from headtohead.training import REPO as ROOT  # noqa: E402
from headtohead.training import RunConfig  # noqa: E402

#: what the fork server imports once for every run: the installed packages the training module uses. (Not the
#: training module itself: Python 3.11's forkserver preloads without the parent's ``sys.path`` and ``__main__``,
#: and ``headtohead`` is only importable through this script's ``sys.path`` entry.)
PRELOAD = [
    "torch",
    "transformers",
    "peft",
    "axolotl_soka",
    "axolotl_soka.eval.generate",
    "axolotl_soka.eval.scoring",
]


def run_processes() -> multiprocessing.context.BaseContext:
    """A ``multiprocessing`` context whose processes fork from a server that imported :data:`PRELOAD` once.
    The server runs no torch operation, so a forked run starts single-threaded with untouched state and gives
    the same losses as a fresh interpreter. Its peak RSS is lower, though: it leaves out the library pages the
    run never touches (about 180 MiB less on the quick size's tiny model), hence fresh interpreters wherever
    memory is reported."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def launch(cfg: RunConfig, result: Path, processes: multiprocessing.context.BaseContext | None) -> None:
    """Run ``cfg`` in its own process, writing ``result``: forked from ``processes``'s server, or, without one,
    a fresh interpreter running this script with ``--run-one``. A failed run stops the benchmark."""
    spec = json.dumps(asdict(cfg))
    if processes is None:
        exitcode = subprocess.run(
            [sys.executable, __file__, "--run-one", spec, "--result", str(result)]
        ).returncode
    else:
        process = processes.Process(target=run_one, args=(spec, result), name=cfg.key)
        process.start()
        process.join()
        exitcode = process.exitcode
    if exitcode != 0:
        raise SystemExit(f"run {cfg.key} failed (exit code {exitcode}); see its output above")


def run_all(configs: list[RunConfig], out: Path, fork: bool = False, jobs: int = 1) -> list[dict]:
    """Run each config in its own process (forked from a preloaded server with ``fork``, else a fresh
    interpreter; ``jobs`` at a time) unless its result exists; return all results in ``configs``' order."""
    processes = run_processes() if fork else None
    paths = [out / "runs" / f"{cfg.key}.json" for cfg in configs]
    todo = []
    for i, (cfg, path) in enumerate(zip(configs, paths, strict=True), 1):
        print(f"[{i}/{len(configs)}] {cfg.key}" + (" (done)" if path.exists() else ""), flush=True)
        if not path.exists() and all(p != path for _, p in todo):
            todo.append((cfg, path))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(launch, cfg, path, processes) for cfg, path in todo]:
            future.result()
    return [json.loads(path.read_text()) for path in paths]


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
    grids: dict[str, list[dict]] = {}
    best: dict[str, dict[str, float]] = {}
    final: list[dict] = []
    for tier in [*size.grid_tiers, *(t for t in size.final_tiers if t not in size.grid_tiers)]:
        if tier in size.grid_tiers:
            grid = run_all(grid_runs(size, args.model, tier), out, size.fork_runs, size.jobs)
            while size.extend and (more := extension(size, args.model, tier, grid)):
                grid += run_all(more, out, size.fork_runs, size.jobs)
            grids[tier] = grid
            best[tier] = choose_rates(grid, size.tier_methods(tier))
        if tier in size.final_tiers:
            rates = best.get(tier, best[size.grid_tiers[0]])
            final += run_all(final_runs(size, args.model, tier, rates), out, size.fork_runs, size.jobs)
        # the report after every tier: a benchmark that spans sessions has its partial tables at each stop
        command = f"python benchmarks/compare.py --size {args.size}" + (" --docs" if args.docs else "")
        write_report(grids, final, best, size, out, command, docs=ROOT / "docs" if args.docs else None)


if __name__ == "__main__":
    main()
