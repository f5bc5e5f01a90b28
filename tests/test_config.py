"""Settings: TOML file < environment < flags, shown with their sources; a bad one exits 2 naming its key.

The sample files in deploy/ hold only known settings of the right types.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from common.config import ConfigError, resolve
from executor import config as executor_config
from planner import config as planner_config
from tests.executor_helpers import ROOT, run_module


def test_config_layers_file_then_environment_then_flags(tmp_path: Path) -> None:
    """TOML < PVE_PLANNER_* < flags, shown by --print-config with each value's source."""
    config = tmp_path / "planner.toml"
    config.write_text('listen = "127.0.0.1:6000"\nworkers = 3\ngrace = 5.0\n')
    shown = run_module("planner", "serve", "--config", str(config), "--print-config", "--workers", "7",
                       env={"PVE_PLANNER_GRACE": "2.5"}).stdout
    assert f'listen = "127.0.0.1:6000"  # {config}' in shown
    assert "workers = 7  # --workers" in shown
    assert "grace = 2.5  # PVE_PLANNER_GRACE" in shown
    assert "max_message_mb = 256  # default" in shown


@pytest.mark.parametrize(("toml", "env", "message"), [
    ('workers = "many"\n', {}, "config: workers: must be int, got 'many'"),
    ("colour = 1\n", {}, "config: colour: unknown setting"),
    ("", {"PVE_PLANNER_WORKERS": "0"}, "config: workers: must be at least 1, got 0 (from PVE_PLANNER_WORKERS)"),
    ("", {"PVE_PLANNER_LOG_FORMAT": "xml"}, "config: log_format: must be one of auto, json, console"),
    ('tls_cert = "x.pem"\n', {}, "config: tls_cert: tls_cert and tls_key go together"),
    ("listen = \n", {}, "is not valid TOML"),
])
def test_invalid_config_exits_2_naming_the_key(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    """A bad setting anywhere is refused with its key and reason, exit code 2."""
    config = tmp_path / "planner.toml"
    config.write_text(toml)
    result = run_module("planner", "serve", "--config", str(config), "--listen", "127.0.0.1:0", env=env)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize(("service", "path"), [("planner", "deploy/planner.toml"),
                                               ("executor", "deploy/executor.toml")])
def test_shipped_config_files_are_valid(service: str, path: str) -> None:
    """The sample TOML files in deploy/ hold only known settings of the right types."""
    module = planner_config if service == "planner" else executor_config
    options = module.OPTIONS if service == "planner" else (*module.CONNECTION, *module.RUN)
    resolved = resolve(options, argparse.Namespace(config=str(ROOT / path)), module.ENV_PREFIX, environ={})
    assert all(source == str(ROOT / path) for key, source in resolved.sources.items()
               if resolved.values[key] != next(o.default for o in options if o.key == key))


def test_a_setting_above_its_maximum_names_the_bound() -> None:
    """op_clock_skew above 300 s would make every signed op fail inside verify: refused at start instead."""
    options = (*executor_config.CONNECTION, *executor_config.RUN)
    with pytest.raises(ConfigError, match="op_clock_skew: must be at most 300"):
        resolve(options, argparse.Namespace(), executor_config.ENV_PREFIX,
                environ={"PVE_EXECUTOR_OP_CLOCK_SKEW": "400"})
