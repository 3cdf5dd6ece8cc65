"""Rank report (table, JSON, PNG) and the logged statistics, from a SoKA model built with plain PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_soka import SokaConfig

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = SokaConfig(target_modules=["q_proj", "v_proj", "down_proj"], max_rank=3, svd="full")
    return get_peft_model(base, config)


def test_write_report_json_png_and_table(peft_model, tmp_path, capsys):
    from axolotl_soka.report import JSON_NAME, PNG_NAME, load_report, write_report

    selections = peft_model.base_model.soka_selections["default"]
    report = write_report(selections, peft_model.peft_config["default"], tmp_path)

    saved = load_report(tmp_path)
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / PNG_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / JSON_NAME).is_file()

    rows = saved["modules"]
    assert len(rows) == 6  # 2 layers x 3 targets
    for row in rows:
        assert set(row) >= {
            "module",
            "shape",
            "rank",
            "energy_kept",
            "decided_by",
            "trainable_params",
            "layer",
        }
        assert 1 <= row["rank"] <= 3 and len(row["shape"]) == 4
    assert {r["kind"] for r in rows} == {"q_proj", "v_proj", "down_proj"}
    assert {r["layer"] for r in rows} == {0, 1}
    totals = saved["totals"]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert totals["trainable_params"] == trainable
    assert totals["total_terms"] == sum(r["rank"] for r in rows)
    assert saved["settings"]["max_rank"] == 3

    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and f"{trainable:,}" in printed


def test_adapter_stats_match_the_report(peft_model):
    from axolotl_soka.report import adapter_stats, build_report

    report = build_report(peft_model.base_model.soka_selections["default"])
    stats = adapter_stats(peft_model)
    assert stats["trainable_params"] == stats["adapter_params"] == report["totals"]["trainable_params"]
    assert stats["total_terms"] == report["totals"]["total_terms"]
    assert stats["adapted_modules"] == 6
    assert set(k for k in stats if k.startswith("mean_rank/")) == {
        "mean_rank/q_proj",
        "mean_rank/v_proj",
        "mean_rank/down_proj",
    }


def test_markdown_and_rich_tables(peft_model):
    from axolotl_soka.report import build_report, markdown_table, rich_table

    report = build_report(peft_model.base_model.soka_selections["default"])
    md = markdown_table(report)
    assert md.count("\n") == len(report["modules"]) + 2
    console = Console(record=True, width=200)
    console.print(rich_table(report))
    assert "criterion" in console.export_text()


def test_report_cli_prints_a_saved_report(peft_model, tmp_path, capsys):
    from axolotl_soka.report import write_report
    from axolotl_soka.report.__main__ import main

    write_report(peft_model.base_model.soka_selections["default"], None, tmp_path, show=False, plot=False)
    assert main([str(tmp_path)]) == 0
    assert "down_proj" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no SoKA rank report"):
        main([str(tmp_path / "missing")])
