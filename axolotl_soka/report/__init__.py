"""SoKA rank report: per-module shape, rank, energy kept, criterion and parameters.

``write_report`` prints it (rich), writes ``soka_rank_report.json`` and draws ``soka_rank_report.png``;
``python -m axolotl_soka.report OUTPUT_DIR`` prints a saved report again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .build import adapter_stats, build_report, layer_and_kind
from .plot import draw_report
from .table import markdown_table, print_report, rich_table

JSON_NAME = "soka_rank_report.json"
PNG_NAME = "soka_rank_report.png"

__all__ = [
    "JSON_NAME",
    "PNG_NAME",
    "adapter_stats",
    "build_report",
    "draw_report",
    "layer_and_kind",
    "load_report",
    "markdown_table",
    "print_report",
    "rich_table",
    "write_report",
]


def write_report(
    selections: Any, config: Any, output_dir: str | Path, *, show: bool = True, plot: bool = True
) -> dict[str, Any]:
    """Build the report from ``soka_selections[adapter]`` and the config; print, save JSON and PNG."""
    report = build_report(selections, config)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    if plot:
        draw_report(report, out / PNG_NAME)
    if show:
        print_report(report)
    return report


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a saved report: the JSON file itself or the directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no SoKA rank report at {path} (it is written to output_dir after initialisation)"
        )
    return json.loads(path.read_text(encoding="utf-8"))
