"""The PEFT method needs no Axolotl (nor pydantic, which comes with it): in a process where importing them
fails, as where they are not installed, SoKA initialises, trains a step, saves, loads and merges with plain
PEFT, and only the plugin asks for the ``axolotl`` extra. (DeepSpeed cannot be hidden the same way:
transformers imports it whenever it is installed.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {"axolotl", "pydantic"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    sys.path.insert(0, "tests")

    import tempfile, torch
    from peft import PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    import axolotl_soka
    from tiny_models import TINY_LLAMA

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model = get_peft_model(base, axolotl_soka.SokaConfig(max_rank=2, svd="full"))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        fresh = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
        fresh.load_state_dict(original)
        loaded = PeftModel.from_pretrained(fresh, out).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, trained, atol=1e-5, rtol=1e-5)
            merged = loaded.merge_and_unload()
            torch.testing.assert_close(merged(input_ids=ids).logits, trained, atol=1e-4, rtol=1e-4)
    assert not {"axolotl", "pydantic"} & set(sys.modules)
    try:
        axolotl_soka.SokaPlugin
    except ImportError as exc:
        print("PLUGIN:", exc)
    print("OK")
    """
)


def test_the_peft_method_works_without_axolotl() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "OK"
    plugin = next(line for line in lines if line.startswith("PLUGIN:"))
    assert "pip install 'axolotl-soka[axolotl]'" in plugin  # only the plugin needs the extra
