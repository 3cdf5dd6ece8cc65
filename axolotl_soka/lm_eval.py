"""Run EleutherAI's lm-evaluation-harness with SoKA adapters loadable: ``python -m axolotl_soka.lm_eval ...``.

Importing :mod:`axolotl_soka` registers the ``SOKA`` PEFT type, so lm-eval's
``--model hf --model_args pretrained=BASE,peft=SOKA_ADAPTER`` can load a SoKA adapter. Every argument is
passed to lm-eval's own command line unchanged.
"""

from __future__ import annotations

import sys

INSTALL_HINT = "lm-eval is not installed: pip install 'axolotl-soka[lm-eval]'"


def main(argv: list[str] | None = None) -> int:
    """Register SoKA with PEFT, then run lm-eval's CLI with ``argv`` (default: this process's arguments)."""
    import axolotl_soka  # noqa: F401  (registers the SOKA peft type)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
