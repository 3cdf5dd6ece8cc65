"""``python -m axolotl_soka.export_lora --base BASE --adapter SOKA_DIR --out OUT (--rank R | --max-error E)``.

Convert a saved SoKA adapter into a plain PEFT LoRA adapter for the original base model (to serve with vLLM or
load with PEFT alone), print the per-module error table and write it to ``OUT/export_report.json``. Bad
arguments exit with status 2 before any weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

from .tuner.lora_export import REPORT_NAME, VLLM_MAX_LORA_RANKS, export_lora

PROG = "python -m axolotl_soka.export_lora"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1])
    parser.add_argument("--base", required=True, help="the original base model: a folder or a hub id")
    parser.add_argument("--adapter", required=True, help="folder of the saved SoKA adapter")
    parser.add_argument("--out", required=True, help="folder to write the LoRA adapter to")
    parser.add_argument("--rank", type=int, help="LoRA rank r of every module (an integer >= 1)")
    parser.add_argument(
        "--max-error",
        type=float,
        help="largest relative Frobenius error per module, in (0, 1): r is the smallest rank that meets it "
        "in every module",
    )
    parser.add_argument("--adapter-name", default="default", help="adapter name inside the model")
    parser.add_argument("--device", default=None, help="device for the SVDs (default: cpu)")
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad arguments (``parser.error``: exit status 2) without loading any weights."""
    if (args.rank is None) == (args.max_error is None):
        parser.error("give exactly one of --rank R (an integer >= 1) and --max-error E (a float in (0, 1))")
    if args.rank is not None and args.rank < 1:
        parser.error(f"--rank must be an integer >= 1, got {args.rank}")
    if args.max_error is not None and not 0.0 < args.max_error < 1.0:
        parser.error(f"--max-error must be in the open interval (0, 1), got {args.max_error}")
    adapter = Path(args.adapter)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        parser.error(f"--adapter {args.adapter}: not a SoKA adapter folder (no adapter_config.json)")
    try:
        peft_type = json.loads(config_path.read_text()).get("peft_type")
    except (json.JSONDecodeError, AttributeError) as error:
        parser.error(f"--adapter {args.adapter}: adapter_config.json is not a JSON object ({error})")
    if peft_type != "SOKA":
        parser.error(
            f"--adapter {args.adapter}: peft_type is {peft_type!r}, expected 'SOKA' (a SoKA adapter)"
        )
    if not any((adapter / name).is_file() for name in WEIGHT_NAMES):
        parser.error(f"--adapter {args.adapter}: no adapter weights ({' or '.join(WEIGHT_NAMES)})")
    base = Path(args.base)
    if base.exists():
        if not (base / "config.json").is_file():
            parser.error(f"--base {args.base}: not a model folder (no config.json)")
    elif HUB_ID.fullmatch(args.base) is None:
        parser.error(f"--base {args.base}: no such folder, and not a hub id (org/name)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    if out.resolve() == adapter.resolve():
        parser.error("--out must differ from --adapter (it would overwrite the SoKA adapter)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import axolotl_soka  # noqa: F401  (registers the SoKA method with PEFT)

    # the base weights only shape the layers: D comes from the adapter's fp32 factors, so the stored dtype will do
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype="auto")
    model = PeftModel.from_pretrained(base, args.adapter, adapter_name=args.adapter_name)
    report = export_lora(
        model,
        args.out,
        rank=args.rank,
        max_error=args.max_error,
        adapter_name=args.adapter_name,
        device=args.device,
    )
    print(report.to_markdown())
    hint = report.vllm_max_lora_rank
    print(
        f"\nwrote a LoRA adapter with r = {report.r} (lora_alpha = {report.r}) to {report.output_dir}; largest "
        f"relative error {report.max_module_error:.3e}; report: {report.output_dir / REPORT_NAME}"
    )
    if hint is not None:
        print(
            f"serve with vLLM: --enable-lora --lora-modules NAME={report.output_dir} --max-lora-rank {hint}"
        )
    else:
        print(
            f"r = {report.r} exceeds {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM accepts: export a "
            "smaller --rank, or serve the merged model (merge_and_unload) instead",
            file=sys.stderr,
        )
    return 0


class _CallableModule(types.ModuleType):
    """Importing this module makes ``axolotl_soka.export_lora`` this module, shadowing the function of the same
    name exported by the package: calling the module calls that function, so both spellings keep working."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return export_lora(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    raise SystemExit(main())
