"""The operator's tool as a command line: ``trust check --state-dir``, a closed pipe, --version, help and flags.

Each runs ``python -m executor`` (or ``python -m opctl``) as a process, as an operator types it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from executor import cli as executor_cli
from executor.signed.trust import TrustKeeper
from opctl import cli as opcli
from tests.signing import default_roles, key_entry, to_toml, write_store

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, module: str = "executor") -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` (no PVE_EXECUTOR_* setting inherited)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PVE_EXECUTOR_")} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def store(tmp_path: Path, version: int, *, name: str, owner: str = "alice@example.org") -> Path:
    """A valid trust store of ``version`` (``owner`` changes its content, not its version)."""
    keys = [{**key_entry("alice", ["destroyer", "operator"]), "owner": owner}, key_entry("bob", ["destroyer"])]
    return write_store(tmp_path, to_toml({"version": version, "roles": default_roles(), "keys": keys}), name=name)


def test_trust_check_with_the_state_dir_refuses_what_the_daemon_would(tmp_path: Path) -> None:
    """After the executor accepted v3 (its state dir records the floor): v2 is a rollback and v3 with other content
    a change without a new version, both exit 2 with the reason; v3 itself and v4 pass. Without --state-dir the
    floor is not known and v2 passes."""
    state = tmp_path / "state"
    state.mkdir()
    accepted = store(tmp_path, 3, name="v3.toml")
    keeper = TrustKeeper(str(accepted), str(state))  # the daemon's own keeper records the floor
    assert keeper.current() is not None
    older, changed = store(tmp_path, 2, name="v2.toml"), store(tmp_path, 3, name="v3b.toml", owner="mallory@x")
    rollback = cli("trust", "check", str(older), "--state-dir", str(state))
    assert rollback.returncode == 2, rollback
    assert "INVALID" in rollback.stderr and "version: 2 is lower than 3, the last version accepted (rollback)" \
        in rollback.stderr
    edited = cli("trust", "check", str(changed), "--state-dir", str(state))
    assert edited.returncode == 2 and "version 3 changed content: a changed trust store needs a higher version" \
        in edited.stderr, edited
    same = cli("trust", "check", str(accepted), "--state-dir", str(state))
    assert same.returncode == 0, same
    assert f"the executor with state dir {state} would accept it (its floor: version 3)" in same.stdout
    assert cli("trust", "check", str(store(tmp_path, 4, name="v4.toml")), "--state-dir", str(state)).returncode == 0
    assert cli("trust", "check", str(older)).returncode == 0
    missing = cli("trust", "check", str(accepted), "--state-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "--state-dir" in missing.stderr and "not a directory" in missing.stderr


def test_a_reader_that_goes_away_is_no_traceback(tmp_path: Path) -> None:
    """``trust check FILE | head -1``: the pipe's reader is gone before the output is written; the command ends
    quietly with 141 (what a shell reports for a tool SIGPIPE ended), no BrokenPipeError traceback."""
    path = store(tmp_path, 1, name="t.toml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    read, write = os.pipe()
    os.close(read)  # the reader went away before anything was written
    try:
        child = subprocess.run([sys.executable, "-m", "executor", "trust", "check", str(path)], cwd=ROOT, env=env,
                               stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write)
    assert "Traceback" not in child.stderr and "BrokenPipe" not in child.stderr, child.stderr
    assert child.returncode == opcli.BROKEN_PIPE


def test_opctl_has_a_version() -> None:
    """``opctl --version`` (the console script's module) prints its name and version and exits 0."""
    done = cli("--version", module="opctl")
    assert done.returncode == 0 and done.stdout.startswith("opctl ") and len(done.stdout.split()) == 2, done


def _parsers(parser: argparse.ArgumentParser, path: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _parsers(child, f"{path} {name}".strip())
    return found


OPERATOR = [(path, parser) for path, parser in _parsers(executor_cli.parser())
            if path.split(" ")[0] in opcli.COMMANDS]


def test_every_positional_has_help_and_every_command_its_exit_codes() -> None:
    """Each operator command's --help explains its positionals and ends with its exit codes."""
    assert len(OPERATOR) >= 14
    for path, parser in OPERATOR:
        for action in parser._actions:
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{path}: {action.dest} has no help"
        assert parser.epilog and "exit codes: 0" in parser.epilog, path
    status = dict(OPERATOR)["op status"]
    assert status.epilog and "3 still waiting" in status.epilog


@pytest.mark.parametrize("command", ["pending", "op propose", "op submit", "op status", "op revoke", "op undo"])
def test_api_commands_share_the_client_flags(command: str) -> None:
    """Every command that talks to the API takes --config and --api-ca/--api-client-cert/--api-client-key; the old
    --api-cert/--api-key still parse but are not shown."""
    parser = dict(OPERATOR)[command]
    shown = parser.format_help()
    for flag in ("--config", "--api-ca", "--api-client-cert", "--api-client-key"):
        assert flag in shown, (command, flag)
    assert "--api-cert " not in shown and "--api-key " not in shown
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--api-cert", "--api-key"} <= flags
