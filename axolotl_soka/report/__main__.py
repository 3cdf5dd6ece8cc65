"""``python -m axolotl_soka.report OUTPUT_DIR [--png]``: print a saved rank report (and redraw its PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import PNG_NAME, draw_report, load_report, print_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m axolotl_soka.report", description=__doc__)
    parser.add_argument("path", help="output_dir of a SoKA run, or its soka_rank_report.json")
    parser.add_argument("--png", action="store_true", help="redraw soka_rank_report.png next to the JSON")
    args = parser.parse_args(argv)
    report = load_report(args.path)
    print_report(report)
    if args.png:
        target = Path(args.path)
        print(draw_report(report, (target if target.is_dir() else target.parent) / PNG_NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
