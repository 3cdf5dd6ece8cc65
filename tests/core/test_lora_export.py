"""LoRA-format export of SoKA adapters: exact at full rank, the error table, loading without SoKA, the CLI."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import TINY_LLAMA, build_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import axolotl_soka
from axolotl_soka import SokaConfig, SokaLayer, export_lora
from axolotl_soka.export_lora import main as cli_main

INPUT_IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4321))
UNTOUCHED = "model.layers.1.mlp.up_proj"  # left as initialised: D == 0 there
FULL_RANK = 64  # max over the tiny Llama's modules of min(out, in)
# the trained logits run on the fp32 residual base W − ΔW0 and the LoRA ones on W + U·diag(σ)·Vᵀ: both differ from
# exact arithmetic by fp32 rounding only, a few 1e-7 of the logit scale
LOGIT_TOL = 2e-6


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


def logits(model: nn.Module, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference relative to the logit scale (max |expected|)."""
    return float((actual - expected).abs().max() / expected.abs().max())


def soka_layers(model: nn.Module) -> dict[str, SokaLayer]:
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, SokaLayer)
    }


def perturb(peft_model: nn.Module, seed: int = 0) -> None:
    """Stand-in for training: noise on every factor and σ, except in :data:`UNTOUCHED`. Zero-init ``B`` starts
    at 0, so it gets noise of an absolute size instead of a share of its spread."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in soka_layers(peft_model).items():
            if name == UNTOUCHED:
                continue
            for container in (layer.soka_A, layer.soka_B, layer.soka_s):
                if "default" not in container:
                    continue
                param = container["default"]
                spread = float(param.std()) if param.numel() > 1 and param.std() > 0 else 0.05
                param.add_(0.3 * spread * torch.randn(param.shape, generator=generator))


CASES = {
    "kpsvd-separate": dict(init="kpsvd", sigma_mode="separate", alpha=1.0),
    "kpsvd-sqrt-alpha2": dict(init="kpsvd", sigma_mode="sqrt", alpha=2.0),
    "zero-alpha0.5": dict(init="zero", sigma_mode="separate", alpha=0.5),
}


@pytest.fixture(scope="module", params=list(CASES))
def trained(request):
    original = tiny_llama()
    config = SokaConfig(max_rank=4, svd="full", rank_pattern={"v_proj": 2}, **CASES[request.param])
    peft_model = get_peft_model(copy.deepcopy(original), config)
    perturb(peft_model)
    result = SimpleNamespace(original=original, peft_model=peft_model, logits=logits(peft_model))
    assert rel_error(result.logits, logits(original)) > 1e-2  # the "training" changed the model
    return result


def direct_delta(trained: SimpleNamespace, name: str) -> torch.Tensor:
    """``D`` from the weights alone, in fp64: merged weight of the trained model minus the original weight."""
    merged = copy.deepcopy(trained.peft_model).merge_and_unload()
    weight = merged.get_submodule(name).weight.detach()
    return weight.double() - trained.original.get_submodule(name).weight.detach().double()


def direct_errors(delta: torch.Tensor) -> torch.Tensor:
    """``e[r] = ‖D − D_r‖_F / ‖D‖_F`` for ``r = 0 … k`` from the fp64 singular values: ``(k + 1,)``."""
    energy = torch.linalg.svdvals(delta).square()
    tails = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return (tails / tails[0]).sqrt()


# ------------------------------------------------------------------ 1. exact at full rank
def test_full_rank_export_is_exact_on_the_original_base(trained, tmp_path):
    report = export_lora(trained.peft_model, tmp_path, rank=FULL_RANK)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"]) == (FULL_RANK, FULL_RANK)
    layers = soka_layers(trained.peft_model)
    assert sorted(config["target_modules"]) == sorted(layers)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert len(state) == 2 * len(layers)
    for name, layer in layers.items():
        lora_a = state[f"base_model.model.{name}.lora_A.weight"]
        lora_b = state[f"base_model.model.{name}.lora_B.weight"]
        assert lora_a.shape == (FULL_RANK, layer.in_features)
        assert lora_b.shape == (layer.out_features, FULL_RANK)
        k = min(layer.in_features, layer.out_features)
        assert not lora_a[k:].any() and not lora_b[:, k:].any()  # padding of the smaller modules
    rows = {m.name: m for m in report.modules}
    assert rows.keys() == layers.keys()
    assert rows["model.layers.0.self_attn.k_proj"].rank == 32
    assert (rows[UNTOUCHED].rank, rows[UNTOUCHED].error) == (0, 0.0)
    assert not state[f"base_model.model.{UNTOUCHED}.lora_A.weight"].any()
    assert not state[f"base_model.model.{UNTOUCHED}.lora_B.weight"].any()
    assert all(m.error == 0.0 and m.rank_needed is None for m in report.modules)

    loaded = PeftModel.from_pretrained(copy.deepcopy(trained.original), tmp_path)
    assert type(loaded.base_model).__name__ == "LoraModel"
    assert rel_error(logits(loaded), trained.logits) <= LOGIT_TOL


# ------------------------------------------------------------------ 2. the error table
def test_error_table_matches_a_direct_computation(trained, tmp_path):
    rank = 3
    report = export_lora(trained.peft_model, tmp_path, rank=rank)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert report.r == rank and report.max_error is None
    for row in report.modules:
        delta = direct_delta(trained, row.name)
        assert row.shape == tuple(delta.shape)
        lora_b = state[f"base_model.model.{row.name}.lora_B.weight"].double()
        lora_a = state[f"base_model.model.{row.name}.lora_A.weight"].double()
        if row.name == UNTOUCHED:
            # merging the fp32 residual back is not bit-exact, but D itself is zero
            assert (row.rank, row.error) == (0, 0.0) and not lora_a.any() and not lora_b.any()
            continue
        errors = direct_errors(delta)
        assert row.rank == rank
        # the direct D carries the fp32 rounding of the merged weights: about 1e-7 of ‖D‖ here
        assert row.error == pytest.approx(float(errors[rank]), abs=1e-6)
        # the stored factors are the best rank-r approximation (Eckart–Young)
        achieved = float(torch.linalg.norm(delta - lora_b @ lora_a) / torch.linalg.norm(delta))
        assert achieved == pytest.approx(float(errors[rank]), abs=1e-6)


def test_max_error_rank_is_the_smallest_meeting_the_bound(trained, tmp_path):
    max_error = 0.35
    report = export_lora(trained.peft_model, tmp_path, max_error=max_error)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    saved = json.loads((tmp_path / "export_report.json").read_text())
    assert saved["r"] == config["r"] == config["lora_alpha"] == report.r
    assert [m["rank_needed"] for m in saved["modules"]] == [m.rank_needed for m in report.modules]
    needed = {}
    for row in report.modules:
        if row.name == UNTOUCHED:
            assert (row.rank_needed, row.rank, row.error) == (0, 0, 0.0)
            continue
        errors = direct_errors(direct_delta(trained, row.name))
        assert (
            errors - max_error
        ).abs().min() > 1e-4  # no borderline rank: fp32 noise cannot flip the answer
        needed[row.name] = int(torch.nonzero(errors <= max_error)[0, 0])
        assert row.rank_needed == needed[row.name]
        assert errors[row.rank_needed] <= max_error < errors[row.rank_needed - 1]
        # every module stores the file's r components (or all it has), so its error is at most the bound
        assert row.rank == min(report.r, *row.shape)
        assert row.error == pytest.approx(float(errors[row.rank]), abs=1e-6) and row.error <= max_error
    assert report.r == max(needed.values())
    assert len(set(needed.values())) > 1  # the modules need different ranks: the uniform r is a real max
    loaded = PeftModel.from_pretrained(copy.deepcopy(trained.original), tmp_path)
    assert 0 < rel_error(logits(loaded), trained.logits) < 0.5


def test_argument_errors_name_the_parameter(trained, tmp_path):
    for kwargs, message in [
        ({}, "exactly one of rank"),
        ({"rank": 2, "max_error": 0.1}, "exactly one of rank"),
        ({"rank": 0}, r"rank must be an integer >= 1"),
        ({"rank": 2.0}, r"rank must be an integer >= 1"),
        ({"max_error": 1.0}, r"max_error must be a float in the open interval \(0, 1\)"),
        ({"max_error": 0.0}, r"max_error must be a float in the open interval \(0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            export_lora(trained.peft_model, tmp_path, **kwargs)
    with pytest.raises(ValueError, match="'other' is not a SoKA adapter"):
        export_lora(trained.peft_model, tmp_path, rank=2, adapter_name="other")
    assert not any(tmp_path.iterdir())


def test_package_attribute_stays_callable_after_importing_the_cli_module(trained, tmp_path):
    # importing the CLI module makes it the package attribute `axolotl_soka.export_lora`
    report = axolotl_soka.export_lora(trained.peft_model, tmp_path, rank=1)
    assert report.r == 1 and (tmp_path / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ 3. loading without SoKA
CHILD = textwrap.dedent(
    """
    import sys

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, lora_dir, ids_path, out_path = sys.argv[1:]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, lora_dir).eval()
    assert type(model.base_model).__name__ == "LoraModel"
    with torch.no_grad():
        result = model(input_ids=torch.load(ids_path)).logits.float()
    assert "axolotl_soka" not in sys.modules, "the child imported axolotl_soka"
    torch.save(result, out_path)
    """
)


def child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    env.pop("PYTHONPATH", None)
    return env


def test_loads_with_plain_peft_in_a_process_without_soka(tmp_path):
    original = tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(original), SokaConfig(max_rank=4, svd="full"))
    perturb(peft_model, seed=1)
    trained_logits = logits(peft_model)
    export_lora(peft_model, tmp_path / "lora", rank=FULL_RANK)
    original.save_pretrained(tmp_path / "base")
    torch.save(INPUT_IDS, tmp_path / "ids.pt")
    (tmp_path / "child.py").write_text(CHILD)
    args = ["base", "lora", "ids.pt", "child_logits.pt"]
    done = subprocess.run(
        [sys.executable, "child.py", *args], cwd=tmp_path, env=child_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    child_logits = torch.load(tmp_path / "child_logits.pt")
    parent_logits = logits(PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "lora"))
    torch.testing.assert_close(child_logits, parent_logits, rtol=0, atol=1e-6)
    assert rel_error(child_logits, trained_logits) <= LOGIT_TOL


# ------------------------------------------------------------------ 4. the CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model and a saved, perturbed kpsvd SoKA adapter for it."""
    root = tmp_path_factory.mktemp("cli")
    base_dir = build_tiny_model(root / "base")
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), SokaConfig(max_rank=4, svd="full")
    )
    perturb(peft_model, seed=2)
    peft_model.save_pretrained(root / "soka")
    return SimpleNamespace(root=root, base=base_dir, soka=root / "soka", peft_model=peft_model)


def run_cli(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    return info.value.code, capsys.readouterr().err


def test_cli_rejects_bad_input_before_loading_weights(saved, tmp_path, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(PeftModel, "from_pretrained", forbidden)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "adapter_config.json").write_text(json.dumps({"peft_type": "SOKA"}))
    good = ["--base", str(saved.base), "--adapter", str(saved.soka), "--out", str(tmp_path / "out")]
    both_or_neither = "exactly one of --rank R (an integer >= 1) and --max-error E (a float in (0, 1))"
    cases = [
        (good, both_or_neither),
        ([*good, "--rank", "4", "--max-error", "0.1"], both_or_neither),
        ([*good, "--rank", "0"], "--rank must be an integer >= 1, got 0"),
        ([*good, "--rank", "-3"], "--rank must be an integer >= 1, got -3"),
        ([*good, "--rank", "two"], "argument --rank: invalid int value: 'two'"),
        ([*good, "--max-error", "1"], "--max-error must be in the open interval (0, 1), got 1.0"),
        ([*good, "--max-error", "0"], "--max-error must be in the open interval (0, 1), got 0.0"),
        ([*good, "--max-error", "-0.2"], "--max-error must be in the open interval (0, 1), got -0.2"),
        (
            ["--base", str(saved.base), "--adapter", str(tmp_path / "lora"), "--out", "x", "--rank", "2"],
            "peft_type is 'LORA', expected 'SOKA'",
        ),
        (
            ["--base", str(saved.base), "--adapter", str(tmp_path), "--out", "x", "--rank", "2"],
            f"--adapter {tmp_path}: not a SoKA adapter folder (no adapter_config.json)",
        ),
        (
            [
                "--base",
                str(saved.base),
                "--adapter",
                str(tmp_path / "no_weights"),
                "--out",
                "x",
                "--rank",
                "2",
            ],
            "no adapter weights",
        ),
        (
            ["--base", str(tmp_path), "--adapter", str(saved.soka), "--out", "x", "--rank", "2"],
            f"--base {tmp_path}: not a model folder (no config.json)",
        ),
        (
            [
                "--base",
                str(saved.base),
                "--adapter",
                str(saved.soka),
                "--out",
                str(saved.soka),
                "--rank",
                "2",
            ],
            "--out must differ from --adapter",
        ),
    ]
    for argv, message in cases:
        code, err = run_cli(capsys, argv)
        assert code == 2, argv
        assert message in err, (argv, err)
    assert not (tmp_path / "out").exists()


def test_cli_exports_and_reports(saved, tmp_path):
    out = tmp_path / "out"
    argv = ["--base", str(saved.base), "--adapter", str(saved.soka), "--out", str(out), "--max-error", "0.3"]
    done = subprocess.run(
        [sys.executable, "-m", "axolotl_soka.export_lora", *argv],
        cwd=Path(__file__).parents[2],
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "| module | shape (out, in) | rank | rel. Frobenius error | rank for error ≤ 0.3 |" in done.stdout
    saved_report = json.loads((out / "export_report.json").read_text())
    expected = export_lora(saved.peft_model, tmp_path / "in_process", max_error=0.3)
    assert saved_report["r"] == expected.r and f"r = {expected.r}" in done.stdout
    assert len(saved_report["modules"]) == len(expected.modules) == 14
    for row, want in zip(saved_report["modules"], expected.modules, strict=True):
        assert (row["name"], tuple(row["shape"]), row["rank"], row["rank_needed"]) == (
            want.name,
            want.shape,
            want.rank,
            want.rank_needed,
        )
        assert row["error"] == pytest.approx(want.error, rel=1e-5, abs=1e-7)
        assert row["name"] in done.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", expected.r, expected.r)
    # the CLI's adapter reproduces the in-process one on the saved base
    base = AutoModelForCausalLM.from_pretrained(saved.base)
    ids = torch.randint(0, base.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    from_cli = logits(PeftModel.from_pretrained(copy.deepcopy(base), out), ids)
    in_process = logits(PeftModel.from_pretrained(base, tmp_path / "in_process"), ids)
    torch.testing.assert_close(from_cli, in_process, rtol=0, atol=1e-5)


def test_cli_exit_status_is_2_in_a_real_process(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "axolotl_soka.export_lora", "--base", "b", "--adapter", "a", "--out", "o"],
        cwd=Path(__file__).parents[2],
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "--rank R (an integer >= 1) and --max-error E (a float in (0, 1))" in done.stderr
