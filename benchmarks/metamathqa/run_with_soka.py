"""Run PEFT's MetaMathQA method comparison (``method_comparison/MetaMathQA/run.py``) with SoKA registered.

PEFT's harness reads an experiment folder (``experiments/<method>/<name>/adapter_config.json`` and
``training_params.json``) and builds the adapter with ``get_peft_model``; a ``"peft_type": "SOKA"`` config loads
only in a process that imported ``axolotl_soka``. This wrapper imports it, then runs ``run.py`` unchanged as
``__main__`` from its own folder (it imports ``data`` and ``utils`` from there)::

    cp -r benchmarks/metamathqa/experiments/soka PEFT/method_comparison/MetaMathQA/experiments/
    cd PEFT/method_comparison/MetaMathQA
    python AXOLOTL_SOKA/benchmarks/metamathqa/run_with_soka.py -v experiments/soka/llama-3.2-3B-kron1-lr0.0003

Every argument is passed to ``run.py``; ``--harness DIR`` (first) names its folder when it is not the current one.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import axolotl_soka  # noqa: F401  (registers SoKA with PEFT)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    folder = Path.cwd()
    if args[:1] == ["--harness"]:
        if len(args) < 2:
            raise SystemExit("--harness needs a folder: PEFT's method_comparison/MetaMathQA")
        folder, args = Path(args[1]).resolve(), args[2:]
    run_py = folder / "run.py"
    if not run_py.is_file():
        print(
            f"no run.py in {str(folder)!r}: run this from PEFT's method_comparison/MetaMathQA folder, or pass "
            "--harness PEFT/method_comparison/MetaMathQA first",
            file=sys.stderr,
        )
        raise SystemExit(2)
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    sys.argv = [str(run_py), *args]
    runpy.run_path(str(run_py), run_name="__main__")


if __name__ == "__main__":
    main()
