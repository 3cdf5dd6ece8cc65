"""Axolotl's lm_eval plugin evaluates ``output_dir`` as a full model, which a SoKA run does not write: the
combination is refused at config load, before any model is loaded, unless nothing would run or
``lm_eval_model`` names the model to evaluate."""

from __future__ import annotations

import pytest
from conftest import load

PLUGINS = ["axolotl_soka.SokaPlugin", "axolotl.integrations.lm_eval.LMEvalPlugin"]


def test_the_lm_eval_plugin_on_a_soka_run_is_refused_with_what_to_do(make_config, no_model_load) -> None:
    with pytest.raises(ValueError) as info:
        load(make_config(plugins=PLUGINS, lm_eval_tasks=["gsm8k"]))
    message = str(info.value)
    assert "plugins: axolotl.integrations.lm_eval.LMEvalPlugin with adapter: soka" in message
    assert "lm_eval_post_train: false" in message and "axolotl.cli.merge_lora" in message
    assert "pretrained=OUTPUT_DIR/merged" in message and "lm_eval_model" in message


@pytest.mark.parametrize(
    "keys",
    [
        {"lm_eval_tasks": ["gsm8k"], "lm_eval_post_train": False},
        {"lm_eval_tasks": []},
        {"lm_eval_tasks": ["gsm8k"], "lm_eval_model": "outputs/merged"},
    ],
    ids=["post-train-off", "no-tasks", "explicit-model"],
)
def test_the_lm_eval_plugin_is_accepted_when_it_runs_nothing_or_has_a_model(make_config, keys) -> None:
    cfg = load(make_config(plugins=PLUGINS, **keys))
    assert cfg.adapter == "soka" and cfg.lm_eval_tasks == keys["lm_eval_tasks"]
