"""Write the YAML key table of docs/plugin.md from SokaConfig and the plugin's keys (``--check``: only compare)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from axolotl_soka.plugin.keys_doc import COMMAND, sync

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugin.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/plugin.md is out of date")
    args = parser.parse_args(argv)
    text = DOCS.read_text(encoding="utf-8")
    new = sync(text)
    if args.check:
        if new != text:
            print(f"{DOCS.name}: the key table is out of date; run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        DOCS.write_text(new, encoding="utf-8")
        print(f"updated {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
