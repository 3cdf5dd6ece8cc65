"""``python -m axolotl_soka.lm_eval``: lm-eval's own CLI with SoKA registered, so ``peft=SOKA_ADAPTER`` loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny_model

pytest.importorskip("lm_eval")

pytestmark = pytest.mark.slow

TASK_DIR = Path(__file__).parent / "lm_eval_task"


def _task_dir(tmp: Path) -> Path:
    """The tiny task with its data file given by absolute path (lm-eval resolves it from the cwd)."""
    out = tmp / "task"
    out.mkdir()
    yaml = (TASK_DIR / "soka_tiny.yaml").read_text(encoding="utf-8")
    (out / "soka_tiny.yaml").write_text(
        yaml.replace("soka_tiny.jsonl", str(TASK_DIR / "soka_tiny.jsonl")), encoding="utf-8"
    )
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base model, a SoKA adapter with noised trainable weights, and the merged model."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_soka import SokaConfig

    tmp = tmp_path_factory.mktemp("lm-eval")
    base = build_tiny_model(tmp / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(
        model, SokaConfig(target_modules=["q_proj", "v_proj", "down_proj"], max_rank=2, svd="full")
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(tmp / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp / "merged")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(tmp / "merged")
    return {"base": base, "adapter": tmp / "adapter", "merged": tmp / "merged", "tmp": tmp}


def _run(module: str, model_args: str, tmp: Path, name: str) -> subprocess.CompletedProcess:
    out = tmp / name
    cmd = [sys.executable, "-m", module, "--model", "hf", "--model_args", f"{model_args},dtype=float32"]
    cmd += ["--tasks", "soka_tiny", "--include_path", str(tmp / "task")]
    cmd += ["--device", "cpu", "--batch_size", "2", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp)


def _metrics(out: Path) -> dict[str, float]:
    [path] = sorted(out.rglob("results_*.json"))
    res = json.loads(path.read_text(encoding="utf-8"))["results"]["soka_tiny"]
    return {k: v for k, v in res.items() if k.startswith("acc") and "stderr" not in k}


def test_adapter_route_equals_merged_and_differs_from_base(models: dict[str, Path]) -> None:
    tmp = models["tmp"]
    if not (tmp / "task").exists():
        _task_dir(tmp)
    runs = {
        "adapter": ("axolotl_soka.lm_eval", f"pretrained={models['base']},peft={models['adapter']}"),
        "merged": ("lm_eval", f"pretrained={models['merged']}"),
        "base": ("lm_eval", f"pretrained={models['base']}"),
        "plain": ("lm_eval", f"pretrained={models['base']},peft={models['adapter']}"),
    }
    done = {name: _run(module, args, tmp, name) for name, (module, args) in runs.items()}
    for name in ("adapter", "merged", "base"):
        assert done[name].returncode == 0, done[name].stderr[-3000:]
    # plain lm-eval cannot load a SoKA adapter: SOKA is not a registered peft type there
    assert done["plain"].returncode != 0
    adapter, merged, base = (_metrics(tmp / n) for n in ("adapter", "merged", "base"))
    assert adapter.keys() == merged.keys() and adapter
    for key in adapter:
        assert adapter[key] == pytest.approx(merged[key], abs=1e-4)
    assert adapter != base, "the adapter did not change the scores"


def test_missing_lm_eval_exits_2(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['lm_eval'] = None; from axolotl_soka.lm_eval import main; sys.exit(main([]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "pip install 'axolotl-soka[lm-eval]'" in done.stderr
