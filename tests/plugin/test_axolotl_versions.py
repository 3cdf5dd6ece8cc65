"""SoKA under the rules Axolotl 0.21 added (seeded adapter init, ``lora_fp32_gradients``, required plugins),
checked the same way on 0.19 and 0.21."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import load
from packaging.version import Version

INSTALL_HINT = "pip install 'axolotl-soka[axolotl]'"
REPO = Path(__file__).resolve().parents[2]


def test_soka_seed_defaults_to_axolotl_seed(make_config, no_model_load):
    from axolotl.integrations.base import PluginManager

    from axolotl_soka import SokaConfig
    from axolotl_soka.plugin.plugin import soka_config_from_cfg

    cases = [  # (YAML keys, seed of the SokaConfig the plugin builds)
        ({"seed": 7}, 7),
        ({"seed": 7, "soka_seed": 3}, 3),
        ({"seed": 7, "soka_seed": 0}, 0),  # an explicit 0 wins too
        ({"seed": None}, 0),  # Axolotl's own default seed (42) does not count as set
    ]
    for overrides, expected in cases:
        cfg = load(make_config(**overrides))
        plugin = PluginManager.get_instance().plugins["axolotl_soka.SokaPlugin"]
        _, config = plugin.load_adapter(None, cfg, config_only=True)
        assert config.seed == expected, overrides
        assert soka_config_from_cfg(cfg).seed == expected, overrides
    assert cfg.seed == 42 and cfg.soka_seed is None
    assert SokaConfig().seed == 0  # plain PEFT use keeps its own default
    with pytest.raises(ValueError, match=r"seed=-1 is invalid as the default of soka_seed.*non-negative"):
        load(make_config(seed=-1))


def test_lora_fp32_gradients_is_rejected_before_validation(make_config, no_model_load):
    with pytest.raises(ValueError) as info:
        load(make_config(lora_fp32_gradients=True))
    message = str(info.value)
    for fragment in (
        "lora_fp32_gradients=True",
        "adapter: soka",
        "always fp32",
        "remove lora_fp32_gradients",
    ):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    raised_at = info.traceback[-1]
    assert (Path(raised_at.path).name, raised_at.name) == ("plugin.py", "register")  # before validation


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("blocked", "statement"),
    [("axolotl", "import axolotl_soka.plugin"), ("pydantic", "from axolotl_soka import SokaPlugin")],
)
def test_import_without_the_extra_says_how_to_install(blocked, statement):
    result = run_python(
        f"""
        import sys

        class NotInstalled:  # finds nothing for the blocked package, as if it were not installed
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == {blocked!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, NotInstalled())
        import axolotl_soka  # the PEFT method needs neither
        {statement}
        """
    )
    assert result.returncode != 0, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: The SoKA Axolotl plugin (axolotl_soka.SokaPlugin) cannot be imported: "
        f"{blocked!r} is missing or incompatible (No module named {blocked!r}). "
        f"Install the plugin with its dependencies: {INSTALL_HINT}"
    ), last
    assert "direct cause of the following exception" in result.stderr  # chained to the original error


def test_axolotl_reports_the_install_hint():
    """Through Axolotl's own plugin loading, with an Axolotl that lacks what the plugin imports."""
    result = run_python(
        """
        import sys, types
        import axolotl.integrations.base as base
        from axolotl.utils.config import prepare_plugins
        from axolotl.utils.dict import DictDefault

        old = types.ModuleType(base.__name__)
        old.__dict__.update({k: v for k, v in vars(base).items() if k != "AdapterCapabilities"})
        sys.modules[base.__name__] = old
        prepare_plugins(DictDefault(plugins=["axolotl_soka.SokaPlugin"], adapter="soka"))
        """
    )
    output = result.stdout + result.stderr
    assert "'axolotl' is missing or incompatible" in output and INSTALL_HINT in output, output
    if Version(version("axolotl")) >= Version("0.21"):
        assert result.returncode != 0  # plugins named in `plugins:` are required
    else:
        assert "Error: The SoKA Axolotl plugin" in result.stdout  # logged, and the plugin skipped
