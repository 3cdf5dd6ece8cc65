"""The error raised when the plugin's optional dependencies (the ``axolotl`` extra) cannot be imported."""

from __future__ import annotations

INSTALL_COMMAND = "pip install 'axolotl-soka[axolotl]'"


def missing_extra(exc: ImportError, package: str) -> ImportError:
    """An ``ImportError`` naming the package that failed to import (``exc.name``'s top level, else
    ``package``) and the command that installs the plugin with its dependencies; raise it ``from exc``."""
    missing = (exc.name or package).partition(".")[0]
    return ImportError(
        f"The SoKA Axolotl plugin (axolotl_soka.SokaPlugin) cannot be imported: {missing!r} is missing or "
        f"incompatible ({exc}). Install the plugin with its dependencies: {INSTALL_COMMAND}",
        name=missing,
    )
