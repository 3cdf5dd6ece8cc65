"""The YAML key table of ``docs/plugin.md``, rendered from the plugin's key list (:data:`args.KEYS`)."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from .args import KEYS, KeySpec

START = "<!-- keys:start -->"
END = "<!-- keys:end -->"
COMMAND = "python scripts/gen_config_docs.py"


def type_text(annotation: Any) -> str:
    """A key's type, e.g. ``list[str] or str`` (``None``, i.e. unset, left out)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    names = [m.__name__ if isinstance(m, type) else str(m) for m in members if m is not type(None)]
    return " or ".join(names).replace("typing.", "")


def default_text(spec: KeySpec) -> str:
    """A key's default: its words, ``unset``, or the value as YAML writes it."""
    if spec.default_text:
        return spec.default_text
    if spec.default is None:
        return "unset"
    return f"`{spec.default if isinstance(spec.default, str) else json.dumps(spec.default)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare pipe would end the table cell


def render_table(keys: list[KeySpec] = KEYS) -> str:
    """The markdown table: YAML key, type, default, meaning."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for spec in keys:
        cells = (f"`{spec.key}`", type_text(spec.annotation), default_text(spec), spec.help)
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def sync(text: str, keys: list[KeySpec] = KEYS) -> str:
    """``text`` with the part between ``START`` and ``END`` replaced by the rendered table."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the key table's markers {START} and {END} are missing")
    note = f"<!-- generated from SokaConfig's fields and axolotl_soka/plugin/args.py by {COMMAND}; edit those -->"
    return f"{head}{START}\n{note}\n\n{render_table(keys)}\n\n{END}{tail}"
