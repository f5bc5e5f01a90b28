"""The operator's tools, as real processes: `pve-executor whoami`, one executor per state directory, SIGHUP,
the audience warning, `selftest --state-dir`, `clock-reset` on a mistyped directory, `--version`, the shared
flag spelling, help on every positional, exit codes in `--help`, and no traceback for a taken port.
"""

from __future__ import annotations

import argparse
import ast
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import healthcheck
from common.version import version
from executor import cli as executor_cli
from executor.loop.hubheld import HeldFiles
from planner import cli as planner_cli
from planner import server
from safety import desireddoc
from tests.certs import Pki
from tests.executor_helpers import ROOT, cli, run_module, unused_port
from tests.signed_helpers import (
    AUDIENCE,
    Daemon,
    add_vm,
    api_propose,
    api_submit,
    roles,
    run_command,
    signed_by,
    store_doc,
)
from tests.signing import key_entry, private, write_store


def _run(command: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(name="taken")
def _taken() -> Iterator[int]:
    """A loopback port a listening socket holds for the test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


# --- whoami ----------------------------------------------------------------------------------------------

def _whoami(fakepve: Any, cafile: str, planner_port: int, tmp_path: Path, *extra: str,
            pve_url: str | None = None) -> subprocess.CompletedProcess[str]:
    trust = tmp_path / "trust-daemon.toml"
    if not trust.exists():
        write_store(tmp_path, store_doc(), name=trust.name)
    return _run(cli(pve_url or f"https://127.0.0.1:{fakepve.port}", cafile, f"127.0.0.1:{planner_port}", tmp_path,
                    "whoami", "--trust-store", str(trust), "--state-dir", str(tmp_path / "state"), *extra))


def test_whoami_names_the_audience_the_roles_naming_it_and_the_journal_a_daemon_holds(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """whoami (and its alias status) prints the audience signed ops must name, the trust store's version and
    fingerprint, the roles naming the audience with their kinds, the journal (locked by the running daemon,
    nothing in flight, op counts) and Proxmox reachable; exit 0. --json says the same to a program."""
    add_vm(fakepve, 100, status="running")
    with Daemon(run_command(fakepve, fakepve_cafile, planner.port, tmp_path), unused_port()) as daemon:
        daemon.wait_serving()
        text = _whoami(fakepve, fakepve_cafile, planner.port, tmp_path)
        as_json = _whoami(fakepve, fakepve_cafile, planner.port, tmp_path, "--json")
        alias = _run([*cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, "127.0.0.1:1", tmp_path, "status"),
                      "--state-dir", str(tmp_path / "state"), "--trust-store", str(tmp_path / "trust-daemon.toml")])
        assert daemon.stop() == 0
    assert text.returncode == 0, text.stdout + text.stderr
    assert f"executor_id  {AUDIENCE}" in text.stdout
    assert "trust store" in text.stdout and "version 1, sha256 " in text.stdout
    assert "role destroyer: DESTRUCTIVE; kinds config.disk_detach" in text.stdout
    assert "role operator: APPROVAL" in text.stdout and "op.revoke" in text.stdout
    assert "locked by a running daemon; 0 in flight" in text.stdout
    assert f"https://127.0.0.1:{fakepve.port} (node pve1): reachable" in text.stdout
    assert f"pve-executor {version()}" in text.stdout and text.stdout.rstrip().endswith("status: ok")
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and report["ok"] is True and report["executor_id"] == AUDIENCE
    assert report["journal"]["locked"] is True and sorted(report["trust"]["roles"]) == ["destroyer", "operator"]
    assert report["trust"]["roles"]["operator"]["signers"] == ["alice@example.org"]
    assert alias.returncode == 0 and f"executor_id  {AUDIENCE}" in alias.stdout


def test_whoami_shows_the_hub_document_held(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                            tmp_path: Path) -> None:
    """With a hub document held in the state dir, whoami prints its version and full sha256 (the pair
    pve_executor_hub_held_info exports): a monitor that is not the hub compares nodes by it; --json too."""
    data = desireddoc.build_payload(cluster="cluster-a", version=2, role="publisher", author="alice@example.org",
                                    message="v2", created=int(time.time()), previous_sha256="ab" * 32,
                                    desired="guests: []\n")
    envelope = desireddoc.seal(data, private("alice"))
    held = desireddoc.Held(version=2, sha256=desireddoc.payload_sha256(envelope))
    (tmp_path / "state").mkdir()
    HeldFiles(tmp_path / "state").save(desireddoc.to_bytes(envelope), held)
    text = _whoami(fakepve, fakepve_cafile, planner.port, tmp_path)
    as_json = _whoami(fakepve, fakepve_cafile, planner.port, tmp_path, "--json")
    assert text.returncode == 0, text.stdout + text.stderr
    assert f"hub document version 2, sha256 {held.sha256} (held in state dir)" in text.stdout
    assert json.loads(as_json.stdout)["hub"] == {"version": 2, "sha256": held.sha256, "error": ""}


def test_whoami_exits_1_and_says_what_is_wrong(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                               tmp_path: Path) -> None:
    """No role names this audience, Proxmox unreachable: each is a PROBLEM line and exit 1 (a state directory not
    made yet is said, not a problem); settings come from --config as the daemon's do."""
    write_store(tmp_path, {**store_doc(), "roles": roles("pve9@elsewhere")}, name="trust-daemon.toml")
    unnamed = _whoami(fakepve, fakepve_cafile, planner.port, tmp_path)
    assert unnamed.returncode == 1, unnamed.stdout + unnamed.stderr
    assert f"PROBLEM: no role of the trust store names audience '{AUDIENCE}'" in unnamed.stdout
    assert "does not exist yet" in unnamed.stdout and "PROBLEM: state" not in unnamed.stdout
    down = _whoami(fakepve, fakepve_cafile, planner.port, tmp_path, pve_url=f"https://127.0.0.1:{unused_port()}")
    assert down.returncode == 1 and "PROBLEM: Proxmox at https://127.0.0.1:" in down.stdout
    assert "Traceback" not in down.stderr
    config = tmp_path / "executor.toml"
    config.write_text(f'executor_id = "pve9@elsewhere"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'trust_store = "{tmp_path / "trust-daemon.toml"}"\n', encoding="utf-8")
    (tmp_path / "state").mkdir()
    configured = _run([*cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, "127.0.0.1:1", tmp_path, "whoami"),
                       "--config", str(config)])
    assert configured.returncode == 0, configured.stdout
    assert "executor_id  pve9@elsewhere" in configured.stdout and "not locked" in configured.stdout


# --- the daemon: audience warning, SIGHUP, one per state directory -----------------------------------------

def test_the_daemon_warns_at_load_when_no_role_names_its_audience(fakepve: Any, fakepve_cafile: str,
                                                                  planner: server.Running, tmp_path: Path) -> None:
    """A trust store whose roles all name other executors: a structlog warning and a line on stderr."""
    write_store(tmp_path, {**store_doc(), "roles": roles("pve9@elsewhere")}, name="trust-daemon.toml")
    with Daemon(run_command(fakepve, fakepve_cafile, planner.port, tmp_path), unused_port()) as daemon:
        daemon.wait_serving()
        (event,) = daemon.events("trust_store_names_no_role_for_audience")
        # The stderr line follows the event; the reader thread may not have it yet: wait for it, not for stop.
        deadline = time.monotonic() + 10
        while not _warned(daemon.log.lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.stop() == 0
    assert event["audience"] == AUDIENCE and event["roles"] == ["destroyer", "operator"]
    assert _warned(daemon.log.lines)


def _warned(lines: list[str]) -> bool:
    """Whether the daemon printed its no-role warning."""
    return any(line.startswith("pve-executor: warning: no role of the trust store") for line in lines)


def test_sighup_reloads_the_trust_store_at_once_not_at_the_next_tick(fakepve: Any, fakepve_cafile: str,
                                                                    planner: server.Running, tmp_path: Path) -> None:
    """Interval 30 s: a new key added to the trust store signs an accepted op within 1 s of SIGHUP (before the
    SIGHUP the same op is refused: the daemon does not know the key)."""
    add_vm(fakepve, 100, status="running")
    with Daemon(run_command(fakepve, fakepve_cafile, planner.port, tmp_path), unused_port()) as daemon:
        daemon.wait_serving()
        envelope = signed_by(api_propose(daemon.api, 100, "snapshot.create", snapname="s1"), "carol",
                             role="operator")
        assert api_submit(daemon.api, envelope)[0] != "accepted"
        doc = store_doc()
        write_store(tmp_path, {**doc, "version": 2, "keys": [*doc["keys"], key_entry("carol", ["operator"])]},
                    name="trust-daemon.toml")
        daemon.child.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        decision = api_submit(daemon.api, envelope)
        assert daemon.stop() == 0
    assert decision[0] == "accepted", decision


def test_a_second_executor_on_a_locked_state_directory_refuses_to_start(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """Two real processes on one state directory: the second exits 1 naming the reason, the first runs on."""
    command = run_command(fakepve, fakepve_cafile, planner.port, tmp_path)
    with Daemon(command, unused_port()) as first:
        first.wait_serving()
        second = _run([*command, "--listen", f"127.0.0.1:{unused_port()}"], timeout=30)
        assert first.child.poll() is None
        assert first.stop() == 0
    assert second.returncode == 1, second.stderr[-2000:]
    assert "is in use by another process: another pve-executor runs on this state directory" in second.stderr
    assert "Traceback" not in second.stderr and "journal_unavailable_benign_only" not in second.stderr


# --- selftest --state-dir, clock-reset, nothing written outside the test's directories ---------------------

def test_selftest_writes_into_its_state_dir(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                            tmp_path: Path) -> None:
    """`selftest --state-dir DIR` journals its writes there (and nowhere else)."""
    fakepve.add_vm(150, "scratch", status="stopped", config={"description": "keep me"})
    state = tmp_path / "selftest-state"
    result = _run(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path,
                      "selftest", "--vmid", "150", "--state-dir", str(state)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("journal-"))


def test_clock_reset_refuses_a_state_dir_that_does_not_exist(tmp_path: Path) -> None:
    """A mistyped --state-dir is an error (exit 2), not a new empty journal."""
    missing = tmp_path / "no-such-state"
    result = run_module("executor", "clock-reset", "--state-dir", str(missing))
    assert result.returncode == 2 and f"state_dir: {missing}: no such directory" in result.stderr
    assert not missing.exists()


WRITING = ("run", "selftest", "clock-reset")  # the commands that write their state directory
SAFE = ("--state-dir", "--config", "--print-config", "--help", "STATE_DIR")


def _strings(node: ast.AST) -> list[str]:
    """Every string literal under ``node``."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_the_test_suite_never_runs_a_writing_command_on_the_default_state_dir() -> None:
    """Every `python -m executor run|selftest|clock-reset` the tests start names its state directory (or a
    config file): the default, /var/lib/pve-reconcile, is the real node's, never the test suite's."""
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            words = _strings(node)
            executor = name == "cli" or (name == "run_module" and "executor" in words) or "executor" in words
            if (executor and any(w in WRITING for w in words) and not any(s in w for w in words for s in SAFE)
                    and name not in ("Daemon", "_run", "run_daemon_until")):
                found.append(f"{path.name}:{node.lineno}")
    assert found == []


# --- one vocabulary: --version, flags, help, exit codes ----------------------------------------------------

@pytest.mark.parametrize(("module", "prog"), [("executor", "pve-executor"), ("planner", "pve-planner"),
                                              ("common.healthcheck", "pve-healthcheck")])
def test_version_prints_prog_and_version(module: str, prog: str) -> None:
    """`--version` prints `<prog> <version>` and exits 0."""
    result = run_module(module, "--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"{prog} {version()}")


def _parsers(top: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, Any]]:
    """Each parser under ``top`` (the operator's commands, which opctl owns, left out), by name."""
    yield top.prog, top
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name not in skip:
                    yield from _parsers(sub, skip)


def test_every_positional_has_help_and_every_help_lists_the_exit_codes() -> None:
    """pve-executor (its own commands), pve-planner and pve-healthcheck: no bare positional, exit codes in --help."""
    parsers = [*_parsers(executor_cli.parser(), frozenset({"keys", "trust", "pending", "op"})),
               *_parsers(planner_cli.parser()), *_parsers(healthcheck.parser())]
    bare = [f"{prog}: {a.dest}" for prog, p in parsers for a in p._actions
            if not a.option_strings and not a.help]
    assert bare == []
    assert [prog for prog, p in parsers if "exit codes: 0" not in p.format_help()] == []


def test_healthcheck_speaks_the_shared_client_tls_flags(mtls_planner: server.Running, pki: Pki) -> None:
    """--ca/--client-cert/--client-key reach a mutual-TLS planner; the old --tls-* spellings still work."""
    target = f"127.0.0.1:{mtls_planner.port}"
    new = run_module("common.healthcheck", target, "--ca", pki.ca, "--client-cert", pki.client_cert,
                     "--client-key", pki.client_key)
    old = run_module("common.healthcheck", target, "--tls-ca", pki.ca, "--tls-cert", pki.client_cert,
                     "--tls-key", pki.client_key)
    assert (new.returncode, new.stdout.strip()) == (0, "SERVING"), new.stderr
    assert (old.returncode, old.stdout.strip()) == (0, "SERVING"), old.stderr
    assert "--tls-ca" not in run_module("common.healthcheck", "--help").stdout


# --- listening: a taken port, a missing port ------------------------------------------------------------

def test_a_taken_port_is_one_line_and_exit_1(taken: int, fakepve: Any, fakepve_cafile: str,
                                             planner: server.Running, tmp_path: Path) -> None:
    """planner serve and executor run (--listen and --metrics-listen): "cannot listen on H:P: address in use"."""
    expected = f"cannot listen on 127.0.0.1:{taken}: address in use"
    base = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path, "run",
               "--state-dir", str(tmp_path / "state"))
    results = {
        "planner": run_module("planner", "serve", "--listen", f"127.0.0.1:{taken}"),
        "planner metrics": run_module("planner", "serve", "--listen", "127.0.0.1:0", "--metrics-listen",
                                      f"127.0.0.1:{taken}"),
        "executor": _run([*base, "--listen", f"127.0.0.1:{taken}"]),
        "executor metrics": _run([*base, "--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{taken}"]),
    }
    for name, result in results.items():
        assert result.returncode == 1, f"{name}: {result.stderr[-1500:]}"
        assert expected in result.stderr and "Traceback" not in result.stderr, f"{name}: {result.stderr[-1500:]}"


@pytest.mark.parametrize("flag", ["--listen", "--metrics-listen"])
def test_a_listen_address_without_a_port_is_a_config_error_naming_the_flag(flag: str) -> None:
    """`--listen 127.0.0.1`: exit 2, naming the flag, before anything starts."""
    for command in (["planner", "serve"], ["executor", "run", "--state-dir", "/nonexistent/never-used"]):
        result = run_module(*command, flag, "127.0.0.1")
        assert result.returncode == 2, result.stderr
        assert "'127.0.0.1' has no port: give HOST:PORT" in result.stderr and f"(from {flag})" in result.stderr
        assert "Traceback" not in result.stderr



def test_whoami_on_a_node_without_a_trust_store_is_ok(fakepve: Any, fakepve_cafile: str, tmp_path: Path) -> None:
    """The quick start leaves a benign-only node (no trust store): whoami says signed operations are off, exit 0."""
    command = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, "127.0.0.1:1", tmp_path, "whoami")
    command = [c for c in command if c not in ("--planner", "127.0.0.1:1")]
    result = subprocess.run([*command, "--state-dir", str(tmp_path / "state")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "signed operations are off" in result.stdout and "PROBLEM" not in result.stdout
