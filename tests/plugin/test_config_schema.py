"""One schema for the ``soka_*`` keys: generated from ``SokaConfig``'s fields, merged into Axolotl's config model,
and rendered into ``docs/plugin.md``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugin.md"


def own_fields() -> dict[str, dataclasses.Field]:
    from peft.config import PeftConfig

    from axolotl_soka import SokaConfig

    peft = {f.name for f in dataclasses.fields(PeftConfig)}
    return {f.name: f for f in dataclasses.fields(SokaConfig) if f.name not in peft}


def test_docs_key_table_is_generated_from_the_schema():
    from axolotl_soka.plugin.keys_doc import COMMAND, sync

    text = DOCS.read_text(encoding="utf-8")
    assert sync(text) == text, f"docs/plugin.md's key table is out of date; run: {COMMAND}"


def test_generator_script_checks_the_docs():
    result = subprocess.run(
        [sys.executable, "scripts/gen_config_docs.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_stale_table_is_replaced_between_the_markers():
    from axolotl_soka.plugin.keys_doc import END, START, render_table, sync

    stale = f"intro\n{START}\n| key |\n|---|\n| `soka_gone` |\n{END}\nrest\n"
    new = sync(stale)
    assert new.startswith(f"intro\n{START}\n") and new.endswith(f"\n{END}\nrest\n")
    assert render_table() in new and "soka_gone" not in new
    with pytest.raises(ValueError, match="markers"):
        sync("no markers here")


def test_every_soka_config_field_is_a_key_or_listed_as_not_one():
    from axolotl_soka.plugin.args import KEY_TO_FIELD, KEYS, NOT_KEYS, PREFIX, RESOLVED_BY_PLUGIN, SokaArgs

    fields = own_fields()
    generated = {spec.field for spec in KEYS if spec.field}
    assert generated | set(NOT_KEYS) == set(fields) and not generated & set(NOT_KEYS)
    assert [spec.key for spec in KEYS] == list(SokaArgs.model_fields)
    assert all(spec.key.startswith(PREFIX) and spec.help for spec in KEYS)
    assert set(KEY_TO_FIELD.values()) == generated - {k[len(PREFIX) :] for k in RESOLVED_BY_PLUGIN}
    assert "forward_mode" in generated  # still a key until it is deprecated


def test_keys_take_the_dataclass_defaults_and_help():
    from axolotl_soka.plugin.args import AXOLOTL_FALLBACK, KEYS, SokaArgs

    fields = own_fields()
    for spec in KEYS:
        if spec.field is None:
            continue
        field = fields[spec.field]
        expected = (
            None if spec.key in AXOLOTL_FALLBACK or field.default is dataclasses.MISSING else field.default
        )
        assert SokaArgs.model_fields[spec.key].default == expected, spec.key
        assert SokaArgs.model_fields[spec.key].description.startswith(spec.help), spec.key
    # field names in the help are shown under their YAML keys
    assert "`soka_min_rank`" in SokaArgs.model_fields["soka_max_rank"].description
    assert SokaArgs.model_fields["soka_seed"].default is None  # "unset" stays visible for the seed fallback


def test_a_new_soka_config_field_becomes_a_key():
    from axolotl_soka import SokaConfig
    from axolotl_soka.plugin.args import config_keys
    from axolotl_soka.plugin.keys_doc import render_table

    @dataclasses.dataclass
    class Extended(SokaConfig):
        warmup_terms: int | None = dataclasses.field(
            default=None, metadata={"help": "Terms kept frozen, at most `max_rank`."}
        )

    keys = {spec.key: spec for spec in config_keys(Extended)}
    spec = keys["soka_warmup_terms"]
    assert spec.annotation == int | None and spec.default is None
    assert spec.help == "Terms kept frozen, at most `soka_max_rank`."
    assert "| `soka_warmup_terms` | int | unset | Terms kept frozen" in render_table(list(keys.values()))


def test_axolotl_merges_the_generated_model(make_config, no_model_load):
    """The class ``get_input_args`` names is what Axolotl merges into its config models, with the same fields."""
    import importlib

    from axolotl.integrations.base import PluginManager
    from axolotl.integrations.config import merge_input_args

    from axolotl_soka.plugin.args import KEYS, SokaArgs

    cfg = load(make_config(soka_shape_pattern={"q_proj": [4, 8, 8, 8]}, soka_param_budget="2k"))
    assert cfg.soka_shape_pattern == {"q_proj": [4, 8, 8, 8]} and cfg.soka_param_budget == "2k"
    plugin = PluginManager.get_instance().plugins["axolotl_soka.SokaPlugin"]
    module, name = plugin.get_input_args().rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is SokaArgs
    for merged in merge_input_args():
        assert issubclass(merged, SokaArgs)
        for spec in KEYS:
            assert merged.model_fields[spec.key].annotation == spec.annotation, spec.key
    schema = SokaArgs.model_json_schema()["properties"]
    assert set(schema) == {spec.key for spec in KEYS}


def test_wrong_type_names_the_key(make_config, no_model_load):
    with pytest.raises(ValueError) as info:
        load(make_config(soka_max_rank="many"))
    message = str(info.value)
    assert "soka_max_rank" in message and "'many'" in message
