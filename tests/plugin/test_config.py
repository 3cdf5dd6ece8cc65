"""Config validation of ``adapter: soka`` through Axolotl's own ``load_cfg`` (what every CLI command runs first)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load

BAD_VALUES = [
    # (overrides, fragments the message must contain)
    ({"soka_energy_threshold": 0.0}, ["soka_energy_threshold", "0.0", "(0, 1]"]),
    ({"soka_energy_threshold": 1.5}, ["soka_energy_threshold", "1.5", "(0, 1]"]),
    ({"soka_elbow_mode": "elbo"}, ["soka_elbow_mode", "'elbo'", "kneedle, curvature, none"]),
    ({"soka_rank_combine": "avg"}, ["soka_rank_combine", "'avg'", "min, max, energy, elbow"]),
    ({"soka_min_rank": -1}, ["soka_min_rank", "-1", "non-negative integer"]),
    ({"soka_max_rank": 0}, ["soka_max_rank", "0", "at least 1"]),
    ({"soka_search_window": 2}, ["soka_search_window", "2", "at least 3"]),
    ({"soka_alpha": 0.0}, ["soka_alpha", "0.0", "non-zero"]),
    ({"soka_init": "random"}, ["soka_init", "'random'", "kpsvd, zero"]),
    ({"soka_svd": "exact"}, ["soka_svd", "'exact'", "full, lowrank"]),
    ({"soka_svd_niter": -2}, ["soka_svd_niter", "-2", "non-negative integer"]),
    ({"soka_seed": -1}, ["soka_seed", "-1", "non-negative integer"]),
    ({"soka_sigma_mode": "both"}, ["soka_sigma_mode", "'both'", "separate, sqrt"]),
    ({"soka_factor_shape": "square"}, ["soka_factor_shape", "'square'", "balanced, lora"]),
    ({"soka_factor_shape": [2, 2]}, ["soka_factor_shape", "[2, 2]", "four positive integers"]),
    ({"soka_dropout": 1.0}, ["soka_dropout", "1.0", "[0, 1)"]),
    ({"soka_chunk_tokens": 0}, ["soka_chunk_tokens", "positive integer", "got 0"]),
    ({"soka_forward_mode": "fast"}, ["soka_forward_mode", "'fast'", "factored, dense"]),
    ({"soka_rank_pattern": {"q_proj": -1}}, ["soka_rank_pattern", "q_proj", "non-negative integer"]),
    ({"soka_shape_pattern": {"q_proj": "wide"}}, ["soka_shape_pattern", "'wide'", "balanced, lora"]),
    ({"soka_target_modules": []}, ["soka_target_modules", "[]", "non-empty list"]),
    ({"soka_eval_task": "humaneval"}, ["soka_eval_task", "'humaneval'", "gsm8k, math, mbpp"]),
    ({"soka_init_source": "task"}, ["soka_init_source", "'task'", "weight, gradient"]),
    ({"soka_init": "gradient", "soka_init_source": "weight"}, ["soka_init_source must be 'gradient'"]),
    ({"soka_calibration_batches": 0}, ["soka_calibration_batches", "0", "positive integer"]),
    ({"soka_min_rank": 5, "soka_max_rank": 2}, ["soka_min_rank (5)", "soka_max_rank (2)"]),
    (
        {"soka_rank_combine": "elbow", "soka_elbow_mode": "none"},
        ["soka_rank_combine", "soka_elbow_mode", "kneedle, curvature"],
    ),
    ({"merge_method": "memory_efficient"}, ["merge_method", "'memory_efficient'", "legacy"]),
    ({"load_in_8bit": True}, ["load_in_8bit", "soka", "false"]),
    ({"fsdp_config": {"fsdp_version": 2}}, ["fsdp", "not supported with adapter: soka", "DeepSpeed ZeRO-3"]),
]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    BAD_VALUES,
    ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in BAD_VALUES],
)
def test_bad_value_is_rejected_at_validation(make_config, no_model_load, overrides, fragments):
    with pytest.raises(ValueError) as info:  # pydantic's ValidationError is a ValueError
        load(make_config(**overrides))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_valid_config_keeps_the_keys_and_forces_legacy_merge(make_config, no_model_load):
    cfg = load(
        make_config(soka_energy_threshold=0.95, soka_factor_shape=[4, 8, 16, 8], soka_eval_task="gsm8k")
    )
    assert cfg.soka_energy_threshold == 0.95
    assert cfg.soka_factor_shape == [4, 8, 16, 8]
    assert cfg.soka_max_rank == 4 and cfg.soka_elbow_mode == "kneedle"  # set and default
    assert cfg.merge_method == "legacy"


def test_adapter_soka_without_the_plugin_fails(make_config, no_model_load):
    with pytest.raises(ValueError, match="Adapter 'soka' is not built in.*plugins"):
        load(make_config(plugins=None))


def test_plugin_without_adapter_soka_warns_and_does_nothing(make_config, no_model_load, caplog):
    from axolotl.integrations.base import PluginManager

    with caplog.at_level(logging.WARNING, logger="axolotl_soka"):
        cfg = load(make_config(adapter=None, soka_elbow_mode="bogus"))  # not checked: SoKA is off
    assert "set `adapter: soka`" in caplog.text
    plugin = PluginManager.get_instance().plugins["axolotl_soka.SokaPlugin"]
    assert plugin.load_adapter(object(), cfg) is None
    assert plugin.add_callbacks_post_trainer(cfg, object()) == []


def test_plugin_without_adapter_soka_names_the_ignored_keys(make_config, no_model_load, caplog):
    with caplog.at_level(logging.WARNING, logger="axolotl_soka"):
        load(make_config(adapter="lora", lora_r=4, soka_elbow_mode="curvature", soka_eval_task=None))
    warning = next(r.getMessage() for r in caplog.records if "set `adapter: soka`" in r.getMessage())
    assert "adapter is 'lora'" in warning
    ignored = warning.split("these keys are ignored: ")[1].rstrip(".").split(", ")
    assert sorted(ignored) == [
        "soka_elbow_mode",
        "soka_max_rank",
        "soka_svd",
    ]  # soka_eval_task: written empty


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("soka_energy_treshold", " (did you mean soka_energy_threshold?)"),
        ("soka_max_ranks", " (did you mean soka_max_rank?)"),
        ("soka_zzz", ""),  # nothing close: no suggestion
    ],
)
def test_unknown_soka_key_is_rejected_with_a_suggestion(make_config, no_model_load, key, hint):
    with pytest.raises(ValueError) as info:
        load(make_config(**{key: 0.5}))
    expected = f"unknown key {key}=0.5{hint}; the SoKA keys are listed in docs/plugin.md"
    assert expected in str(info.value), str(info.value)


def test_every_plugin_key_is_known(make_config, no_model_load):
    from axolotl_soka.plugin.args import SokaArgs, soka_keys

    assert soka_keys() == list(SokaArgs.model_fields)
    cfg = load(make_config(soka_report=False, soka_calibration_batches=2, soka_eval_data=None))
    assert cfg.soka_report is False and cfg.soka_calibration_batches == 2


@pytest.mark.parametrize(
    ("key", "value", "instead"),
    [
        ("lora_r", 16, "use soka_max_rank or soka_param_budget instead"),
        ("lora_alpha", 32, "use soka_alpha instead"),
        ("lora_dropout", 0.05, "use soka_dropout instead"),
    ],
)
def test_ignored_lora_key_is_rejected(make_config, no_model_load, key, value, instead):
    from axolotl_soka.plugin.args import LORA_REPLACEMENTS, SokaArgs

    assert all(k in SokaArgs.model_fields for k in LORA_REPLACEMENTS[key])
    with pytest.raises(ValueError) as info:
        load(make_config(**{key: value}))
    message = str(info.value)
    for fragment in [f"{key}={value!r} is ignored with adapter: soka", instead, f"remove {key}"]:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_lora_keys_the_plugin_reads_stay_allowed(make_config, no_model_load):
    cfg = load(
        make_config(
            lora_target_modules=["q_proj"],
            lora_modules_to_save=["lm_head"],
            lora_r=None,  # written empty: nothing to ignore
            lora_dropout=None,
        )
    )
    assert cfg.lora_target_modules == ["q_proj"] and cfg.lora_modules_to_save == ["lm_head"]


def test_target_modules_default_to_lora_target_modules(make_config, no_model_load):
    from axolotl_soka.plugin.plugin import soka_config_from_cfg

    cfg = load(make_config(lora_target_modules=["q_proj", "v_proj"]))
    assert soka_config_from_cfg(cfg).target_modules == {"q_proj", "v_proj"}
    cfg = load(make_config(lora_target_modules=["q_proj"], soka_target_modules=["o_proj"]))
    assert soka_config_from_cfg(cfg).target_modules == {"o_proj"}
    cfg = load(make_config())
    config = soka_config_from_cfg(cfg)
    assert config.target_modules is None and config.max_rank == 4 and config.svd == "full"


def test_forward_mode_reaches_the_soka_config(make_config, no_model_load):
    from axolotl_soka.plugin.plugin import soka_config_from_cfg

    assert soka_config_from_cfg(load(make_config())).forward_mode == "factored"
    assert soka_config_from_cfg(load(make_config(soka_forward_mode="dense"))).forward_mode == "dense"


def test_eval_task_is_rejected_on_sharded_runs(make_config, no_model_load):
    ds = Path(__file__).resolve().parents[2] / "example_configs" / "deepspeed" / "zero3_bf16.json"
    with pytest.raises(ValueError, match="soka_eval_task='gsm8k'.*ZeRO-3"):
        load(make_config(soka_eval_task="gsm8k", deepspeed=str(ds)))


def test_mbpp_eval_task_needs_the_sandbox_before_the_model_loads(make_config, no_model_load, monkeypatch):
    """Without a working bubblewrap, ``soka_eval_task: mbpp`` stops at config loading (not at the first
    evaluation, hours into training), with the sandbox's own reason."""
    from axolotl_soka.eval import sandbox

    monkeypatch.setattr(sandbox, "isolation_error", lambda bwrap=sandbox.BWRAP: "bubblewrap is not installed")
    with pytest.raises(ValueError, match="soka_eval_task='mbpp' runs generated programs: bubblewrap is not"):
        load(make_config(soka_eval_task="mbpp"))
    monkeypatch.setattr(sandbox, "isolation_error", lambda bwrap=sandbox.BWRAP: None)
    assert load(make_config(soka_eval_task="mbpp")).soka_eval_task == "mbpp"


def test_callbacks_are_wired(make_config, no_model_load, tiny_model_dir):
    from axolotl.integrations.base import PluginManager
    from transformers import AutoTokenizer

    from axolotl_soka.eval.callback import SampleEvalCallback
    from axolotl_soka.plugin.callbacks import SokaStatsCallback

    cfg = load(make_config(soka_eval_task="gsm8k", soka_eval_samples=3, soka_eval_steps=2))
    trainer = SimpleNamespace(
        model=torch.nn.Linear(2, 2), processing_class=AutoTokenizer.from_pretrained(str(tiny_model_dir))
    )
    plugin = PluginManager.get_instance().plugins["axolotl_soka.SokaPlugin"]
    stats, sample_eval = plugin.add_callbacks_post_trainer(cfg, trainer)
    assert isinstance(stats, SokaStatsCallback) and stats.stats["soka/trainable_params"] == 6
    assert isinstance(sample_eval, SampleEvalCallback)
    assert sample_eval.task == "gsm8k" and len(sample_eval.records) == 3 and sample_eval.every == 2
    assert sample_eval.trainer is trainer


def test_processes_must_agree_on_ranks(monkeypatch):
    import torch.distributed as dist

    from axolotl_soka.plugin.plugin import check_ranks_agree

    other = {"model.layers.0.self_attn.q_proj": 3}

    def gather(out, obj):
        out[:] = [obj, other]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    check_ranks_agree(dict(other))  # same ranks everywhere: fine
    with pytest.raises(RuntimeError, match=r"different ranks.*q_proj: \[4, 3\].*soka_rank_pattern"):
        check_ranks_agree({"model.layers.0.self_attn.q_proj": 4})


@pytest.mark.parametrize(
    ("raw", "cleared"),
    [
        ({"adapter": "soka", "merge_lora": True, "deepspeed": None}, True),  # merge_lora's second load
        ({"adapter": "soka", "merge_lora": True, "deepspeed": "zero3.json"}, False),  # its first load
        ({"adapter": "soka", "deepspeed": None}, False),  # training
        ({"adapter": "lora", "merge_lora": True, "deepspeed": None}, False),  # not SoKA
    ],
)
def test_merge_clears_the_deepspeed_settings_an_earlier_load_exported(monkeypatch, raw, cleared):
    """``merge_lora`` loads the YAML with ``deepspeed:`` and then without it: at the second load the plugin
    removes what the first exported (the model loader would read ``ACCELERATE_DEEPSPEED_ZERO_STAGE=3`` back),
    and touches the environment nowhere else."""
    from axolotl_soka.plugin.plugin import DEEPSPEED_ENV, SokaPlugin

    for key in DEEPSPEED_ENV:
        monkeypatch.setenv(key, "3")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    SokaPlugin().register(dict(raw))
    left = [key for key in DEEPSPEED_ENV if key in os.environ]
    assert left == ([] if cleared else list(DEEPSPEED_ENV))
    assert os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "4"


def pre_model_load(cfg) -> None:
    """The plugin's ``pre_model_load`` hook, as Axolotl's model loader calls it before
    ``from_pretrained``."""
    from axolotl.integrations.base import PluginManager

    PluginManager.get_instance().plugins["axolotl_soka.SokaPlugin"].pre_model_load(cfg)


# tiny Llama: q/o (64, 64), k/v (32, 64), gate/up (128, 64), down (64, 128); 2 layers, 14 targets
PRE_LOAD_ERRORS = [
    # (overrides, fragments the message must contain)
    (
        {"soka_target_modules": ["qq_proj"]},
        ["soka_target_modules=['qq_proj'] matches no linear layer", "q_proj, k_proj", "down_proj, lm_head"],
    ),
    (
        {"lora_target_modules": ["attn_out"]},
        ["lora_target_modules=['attn_out'] matches no linear layer", "allowed: module names or a regex"],
    ),
    (
        {"soka_target_modules": ["embed_tokens"]},
        ["soka_target_modules=['embed_tokens'] is invalid", "'model.embed_tokens'", "not an nn.Linear"],
    ),
    (
        {"soka_factor_shape": [4, 8, 16, 8]},
        [
            "soka_factor_shape=[4, 8, 16, 8] is invalid",
            "module 'model.layers.0.self_attn.k_proj' with weight (out=32, in=64)",
            "m*p = 64 must equal out",
        ],
    ),
    (
        {"soka_shape_pattern": {"down_proj": [8, 8, 8, 8]}},
        [
            "soka_shape_pattern['down_proj']=[8, 8, 8, 8] is invalid",
            "module 'model.layers.0.mlp.down_proj' with weight (out=64, in=128)",
            "n*q = 64 must equal in",
        ],
    ),
    (
        {"soka_rank_pattern": {"qproj": 2}},
        [
            "soka_rank_pattern key 'qproj' (value 2) matches no target module",
            "'model.layers.0.self_attn.q_proj'",
        ],
    ),
    (
        {"soka_target_modules": ["q_proj"], "soka_shape_pattern": {"v_proj": "lora"}},
        ["soka_shape_pattern key 'v_proj' (value 'lora') matches no target module", "such as q_proj"],
    ),
    (
        {"soka_param_budget": 50, "soka_min_rank": 0},
        ["soka_param_budget=50 (50 parameters) is smaller than one Kronecker term", "allowed: at least 97"],
    ),
    (
        {"soka_param_budget": "1k"},
        ["soka_param_budget 1,000 is smaller than the", "soka_min_rank already needs on 14 modules"],
    ),
]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    PRE_LOAD_ERRORS,
    ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in PRE_LOAD_ERRORS],
)
def test_model_config_mismatch_is_rejected_before_the_weights_load(
    make_config, no_model_load, overrides, fragments
):
    cfg = load(make_config(**overrides))  # valid on its own: only the model's config rules it out
    with pytest.raises(ValueError) as info:
        pre_model_load(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_model_loader_runs_the_check_before_from_pretrained(make_config, no_model_load):
    from axolotl.loaders import ModelLoader, load_tokenizer

    cfg = load(make_config(soka_rank_pattern={"qproj": 2}))
    with pytest.raises(ValueError, match="soka_rank_pattern key 'qproj'"):
        ModelLoader(cfg, load_tokenizer(cfg)).load()
    cfg = load(make_config(soka_rank_pattern={"q_proj": 2}))
    with pytest.raises(AssertionError, match="a model was loaded"):  # checked, then the weights would load
        ModelLoader(cfg, load_tokenizer(cfg)).load()


def test_valid_config_passes_the_pre_load_check(make_config, no_model_load, caplog):
    cfg = load(
        make_config(
            soka_target_modules=["q_proj", "v_proj", "down_proj"],
            soka_rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 1},
            soka_shape_pattern={"v_proj": [4, 8, 8, 8], "down_proj": "auto"},
            soka_param_budget="2k",  # above the 2*(2*129) + 2*97 + 2*193 = 1,096 parameters that must stay
        )
    )
    with caplog.at_level(logging.DEBUG, logger="axolotl_soka"):
        pre_model_load(cfg)
    assert "SoKA pre-load check passed: 6 target modules" in caplog.text


def test_pre_load_check_is_skipped_without_a_local_model_config(make_config, no_model_load, caplog):
    """No ``config.json`` on this machine: nothing is downloaded and the loader decides later."""
    cfg = load(make_config(soka_target_modules=["qq_proj"]))
    cfg.base_model = cfg.base_model_config = "not-a-user/not-a-cached-model"
    with caplog.at_level(logging.DEBUG, logger="axolotl_soka"):
        pre_model_load(cfg)
    assert "SoKA pre-load check skipped: no local model config" in caplog.text


def test_pre_load_check_is_skipped_for_a_saved_adapter(make_config, no_model_load, tmp_path, caplog):
    cfg = load(make_config(soka_target_modules=["qq_proj"]))
    cfg.lora_model_dir = str(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="axolotl_soka"):
        pre_model_load(cfg)
    assert "the saved adapter in" in caplog.text


def test_pre_load_budget_floor_is_the_one_get_peft_model_raises(make_config, tiny_model_dir):
    """One rule before and after loading: the same parameter count, under the YAML names before."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_soka.plugin.plugin import soka_config_from_cfg

    cfg = load(make_config(soka_param_budget="1k"))
    with pytest.raises(
        ValueError, match="soka_param_budget 1,000 is smaller than the ([0-9,]+) parameters"
    ) as pre:
        pre_model_load(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with pytest.raises(
        ValueError, match="param_budget 1,000 is smaller than the ([0-9,]+) parameters"
    ) as post:
        get_peft_model(model, soka_config_from_cfg(cfg))
    count = str(pre.value).split("smaller than the ")[1].split(" ")[0]
    assert f"smaller than the {count} parameters" in str(post.value)
