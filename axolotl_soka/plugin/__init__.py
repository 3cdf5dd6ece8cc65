"""Axolotl plugin for SoKA: ``plugins: [axolotl_soka.SokaPlugin]`` with ``adapter: soka`` (see docs/plugin.md)."""

from .args import SokaArgs
from .plugin import SokaPlugin

__all__ = ["SokaArgs", "SokaPlugin"]
