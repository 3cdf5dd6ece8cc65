"""The rank report as a rich table (terminal) or a Markdown table (TensorBoard text, docs)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _shape(row: dict[str, Any]) -> str:
    return "(" + ",".join(str(v) for v in row["shape"]) + ")"


def _energy(row: dict[str, Any]) -> str:
    return f"{100 * row['energy_kept']:.1f}%" if row.get("total_energy") else "-"


def rich_table(report: dict[str, Any], title: str = "SoKA rank report") -> Table:
    """One row per module (name, shape (m,n,p,q), rank, energy kept, criterion, parameters) and a totals row."""
    table = Table(title=title, show_footer=True)
    totals = report["totals"]
    table.add_column(
        "module", no_wrap=True, footer=f"{totals['adapted_modules']}/{totals['modules']} adapted"
    )
    table.add_column("shape (m,n,p,q)")
    table.add_column(
        "rank", justify="right", footer=f"Σ {totals['total_terms']} (mean {totals['mean_rank']:.2f})"
    )
    table.add_column("energy kept", justify="right")
    table.add_column("criterion")
    table.add_column("params", justify="right", footer=f"{totals['trainable_params']:,}")
    for row in report["modules"]:
        table.add_row(
            row["module"],
            _shape(row),
            str(row["rank"]),
            _energy(row),
            row["decided_by"],
            f"{row['trainable_params']:,}",
        )
    return table


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the table and a one-line summary of the totals."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough for full module names
            longest = max((len(m["module"]) for m in report["modules"]), default=20)
            console = Console(width=max(100, longest + 75))
    console.print(rich_table(report))
    totals = report["totals"]
    console.print(
        f"SoKA: {totals['trainable_params']:,} trainable parameters in {totals['adapted_modules']} modules "
        f"({100 * totals['trainable_share']:.3f}% of their {totals['base_params_adapted']:,} weights), "
        f"ranks {totals['min_rank']}..{totals['max_rank']}, {totals['total_terms']} terms in all"
    )


def markdown_table(report: dict[str, Any]) -> str:
    """The same table in Markdown."""
    lines = [
        "| module | shape (m,n,p,q) | rank | energy kept | criterion | params |",
        "|---|---|---:|---:|---|---:|",
    ]
    for row in report["modules"]:
        lines.append(
            f"| {row['module']} | {_shape(row)} | {row['rank']} | {_energy(row)} | {row['decided_by']} "
            f"| {row['trainable_params']:,} |"
        )
    totals = report["totals"]
    lines.append(
        f"| **total** ({totals['adapted_modules']}/{totals['modules']} adapted) | | {totals['total_terms']} "
        f"| | | {totals['trainable_params']:,} |"
    )
    return "\n".join(lines)
