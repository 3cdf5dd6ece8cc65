"""``python -m axolotl_soka.eval``: see :mod:`axolotl_soka.eval.cli`."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
