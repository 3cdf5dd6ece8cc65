"""Benchmark records: the shipped ``data/`` files by default, a local JSON(L) file, or a Hub dataset."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..prompts import TASKS
from .errors import EvalInputError

DATA_DIR = Path(__file__).resolve().parents[2] / "data"

#: Where each task's default test set is shipped with the project.
SHIPPED = {
    "gsm8k": DATA_DIR / "gsm8k" / "test.jsonl",
    "math": DATA_DIR / "math" / "math500_test.jsonl",
    "mbpp": DATA_DIR / "mbpp" / "mbpp.jsonl",
}

#: Hugging Face dataset ``(name, config, split)`` used when no shipped file exists (needs network).
HUB = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "math": ("HuggingFaceH4/MATH-500", None, "test"),
    "mbpp": ("google-research-datasets/mbpp", "full", "test"),
}

#: MBPP splits by ``task_id`` (Austin et al., 2021).
MBPP_SPLITS = {
    "prompt": (1, 10),
    "test": (11, 510),
    "validation": (511, 600),
    "train": (601, 974),
    "all": None,
}

REQUIRED_KEYS = {"gsm8k": ("question", "answer"), "math": ("problem",), "mbpp": ("text", "test_list")}


@dataclass(frozen=True)
class Dataset:
    """Loaded records, their ids and where they came from."""

    task: str
    records: list[dict[str, Any]]
    ids: list[str | int]
    source: str


def default_source(task: str) -> str:
    """The shipped file for ``task`` when it exists, else the Hub dataset name."""
    shipped = SHIPPED[task]
    return str(shipped) if shipped.is_file() else HUB[task][0]


def _looks_local(source: str) -> bool:
    """A path (exists, absolute, relative with ``./``, a ``.json(l)`` name or no ``/``), not ``owner/name``."""
    path = Path(source)
    return (
        path.exists()
        or path.is_absolute()
        or path.suffix in (".jsonl", ".json")
        or "/" not in source
        or source.startswith((".", "~"))
    )


def _read_local(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, Mapping):
            data = next((v for v in data.values() if isinstance(v, list)), [])
        return list(data)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_hub(task: str, name: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    hub_name, config, split = HUB[task] if name == HUB[task][0] else (name, None, "test")
    try:
        return [dict(r) for r in load_dataset(hub_name, config, split=split)]
    except Exception as exc:  # offline, unknown name, no such split, ...
        raise EvalInputError(
            f"--data: could not load the Hub dataset {name!r} ({type(exc).__name__}: {exc})"
        ) from exc


def _normalise_mbpp(record: dict[str, Any]) -> dict[str, Any]:
    """Accept the sanitized MBPP schema too (``prompt`` and ``test_imports`` instead of ``text``)."""
    out = dict(record)
    if "text" not in out and "prompt" in out:
        out["text"] = out["prompt"]
    if not out.get("test_setup_code") and out.get("test_imports"):
        out["test_setup_code"] = "\n".join(out["test_imports"])
    out.setdefault("test_setup_code", "")
    return out


def _record_id(task: str, record: Mapping[str, Any], index: int) -> str | int:
    if task == "mbpp" and "task_id" in record:
        return record["task_id"]
    if task == "math" and record.get("unique_id"):
        return record["unique_id"]
    return index


def load(task: str, source: str | None = None, limit: int | None = None, mbpp_split: str = "test") -> Dataset:
    """Load ``task``'s records from ``source`` (a local ``.jsonl``/``.json`` path or a Hub dataset name).

    MBPP records are filtered to ``mbpp_split`` by ``task_id`` (``all`` keeps every record). ``limit``
    keeps the first records, in file order.
    """
    if task not in TASKS:
        raise EvalInputError(f"--task: unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if mbpp_split not in MBPP_SPLITS:
        raise EvalInputError(f"--mbpp-split: unknown split {mbpp_split!r}; allowed: {', '.join(MBPP_SPLITS)}")
    source = source or default_source(task)
    path = Path(source)
    if _looks_local(source):
        if not path.is_file():
            raise EvalInputError(
                f"--data: file not found: {source} (give a .jsonl/.json file or a Hub dataset name)"
            )
        try:
            records = _read_local(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EvalInputError(f"--data: {source} is not valid JSON lines: {exc}") from exc
    else:
        records = _read_hub(task, source)
    if not records:
        raise EvalInputError(
            f"--data: {source} has no records; allowed: a .jsonl file with one JSON object per line, a .json "
            "list of objects, or a Hub dataset name"
        )
    ids = [_record_id(task, r, i) for i, r in enumerate(records)]
    if task == "mbpp":
        records = [_normalise_mbpp(r) for r in records]
        bounds = MBPP_SPLITS[mbpp_split]
        if bounds is not None:
            keep = [i for i, r in enumerate(records) if bounds[0] <= int(r.get("task_id", -1)) <= bounds[1]]
            if not keep:
                raise EvalInputError(
                    f"--mbpp-split: no record of {source} has a task_id in {bounds[0]}..{bounds[1]} "
                    "(use --mbpp-split all for other files)"
                )
            records, ids = [records[i] for i in keep], [ids[i] for i in keep]
    for key in REQUIRED_KEYS[task]:
        missing = [ids[i] for i, r in enumerate(records) if key not in r]
        if missing:
            raise EvalInputError(
                f"--data: {len(missing)} {task} records lack the key {key!r} (first: {missing[0]})"
            )
    if task == "math":
        missing = [ids[i] for i, r in enumerate(records) if not (r.get("answer") or r.get("solution"))]
        if missing:
            raise EvalInputError(
                f"--data: {len(missing)} math records have neither 'answer' nor 'solution' (first: {missing[0]})"
            )
    if limit is not None:
        records, ids = records[:limit], ids[:limit]
    return Dataset(task, records, ids, source)
