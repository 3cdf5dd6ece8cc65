"""``results.json`` (summary plus one record per item, rewritten atomically as work completes) and the
summary table printed at the end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class ResultWriter:
    """Collects per-item records and rewrites ``path`` after every :meth:`add`, so no finished work is lost.

    ``summary`` is the run's fixed description (task, model, generation settings); accuracy, counts,
    elapsed time and ``status`` (``running``, ``complete`` or ``interrupted``) are filled in on write.
    """

    def __init__(self, path: str | os.PathLike[str] | None, summary: dict[str, Any], total: int) -> None:
        self.path = Path(path) if path is not None else None
        self.summary = dict(summary)
        self.total = total
        self.items: dict[int, dict[str, Any]] = {}
        self.start = time.perf_counter()

    def add(self, position: int, item: dict[str, Any]) -> None:
        """Record the item at ``position`` (its index in the evaluated data)."""
        self.items[position] = item

    def summarise(self, status: str) -> dict[str, Any]:
        """The summary with current counts: ``accuracy = correct / scored``."""
        correct = sum(bool(i["correct"]) for i in self.items.values())
        scored = len(self.items)
        return {
            **self.summary,
            "status": status,
            "accuracy": correct / scored if scored else 0.0,
            "correct": correct,
            "total": scored,
            "expected_total": self.total,
            "elapsed_s": round(time.perf_counter() - self.start, 2),
        }

    def write(self, status: str = "running") -> dict[str, Any]:
        """Write ``results.json`` atomically (temp file + rename) and return the summary."""
        summary = self.summarise(status)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"summary": summary, "records": [self.items[k] for k in sorted(self.items)]}
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        return summary


def print_summary(summary: dict[str, Any]) -> None:
    """A rich table with the run's score and settings."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['task']} evaluation", show_header=True)
    table.add_column("metric")
    table.add_column("value", overflow="fold")
    gen = summary.get("generation", {})
    rows = [
        ("accuracy", f"{summary['accuracy']:.4f}"),
        ("correct / total", f"{summary['correct']} / {summary['total']}"),
        ("status", summary["status"]),
        ("elapsed", f"{summary['elapsed_s']:.1f} s"),
        ("model", str(summary.get("model"))),
        ("adapter", f"{summary.get('adapter')} ({summary.get('adapter_type')})"),
        ("data", str(summary.get("data"))),
        ("backend", str(gen.get("backend"))),
        ("batch size / max new tokens", f"{gen.get('batch_size')} / {gen.get('max_new_tokens')}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
