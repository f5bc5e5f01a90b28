"""The pve-executor command: `run --once`, `run` as a daemon until SIGTERM, `plan` (a dry run), `selftest`.

Each runs as a real child process against fakepve and a real planner; bad flags and a bad desired
file are refused (exit 2, naming the problem) before anything runs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from planner import server
from tests.executor_helpers import ROOT, cli, run_module


def test_run_once_converges_and_logs_no_secret(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                              tmp_path: Path) -> None:
    """`pve-executor run --once` converges, exits 0, logs JSON lines, and never logs the password."""
    vm = fakepve.add_vm(100, "web", status="stopped", config={"memory": 512})
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n    config: {memory: 1024}\n")
    result = subprocess.run(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}",
                                tmp_path, "run", "--once", "--desired", str(desired), "--state-dir",
                                str(tmp_path / "state")),
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert (vm.status, str(vm.config["memory"])) == ("running", "1024")
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["event"] for e in events].count("action") == 2
    assert "secret" not in result.stderr and "secret" not in result.stdout


def test_plan_is_a_dry_run_that_shows_key_current_and_desired(fakepve: Any, fakepve_cafile: str,
                                                              planner: server.Running, tmp_path: Path) -> None:
    """`pve-executor plan` prints what would change and mutates nothing; --json for machines."""
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512})
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n    config: {memory: 1024}\n")
    before = len(fakepve.requests)
    shown = subprocess.run(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}",
                               tmp_path, "plan", "--desired", str(desired)),
                           cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    text = shown.stdout
    assert shown.returncode == 3, shown.stderr  # changes to make
    assert "guest 100: set config" in text and "memory: '512' -> '1024'" in text and "guest 100: start" in text
    as_json = subprocess.run(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}",
                                 tmp_path, "plan", "--json", "--desired", str(desired)),
                             cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert as_json.returncode == 3
    assert [a["vmid"] for a in json.loads(as_json.stdout)["steps"]] == [100, 100]
    assert not [r for r in fakepve.requests[before:] if r[0] in ("POST", "PUT") and "ticket" not in r[1]]


def test_bad_flags_and_bad_desired_file_exit_2_naming_the_problem(fakepve: Any, fakepve_cafile: str,
                                                                  planner: server.Running, tmp_path: Path) -> None:
    """A missing credential or a bad desired file is refused before anything runs."""
    no_node = run_module("executor", "plan")
    assert no_node.returncode == 2 and "config: node: required" in no_node.stderr
    bad = tmp_path / "desired.yaml"
    bad.write_text("guests:\n  - vmid: 100\n    state: sleeping\n")
    result = subprocess.run(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}",
                                tmp_path, "run", "--once", "--desired", str(bad), "--state-dir", str(tmp_path / "s")),
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert f"{bad}:3: state: must be running or stopped, got 'sleeping'" in result.stderr


def test_daemon_ticks_until_sigterm_then_drains_and_exits(fakepve: Any, fakepve_cafile: str,
                                                          planner: server.Running, tmp_path: Path) -> None:
    """`pve-executor run` ticks every interval, serves its API, and on SIGTERM exits 0 promptly."""
    vm = fakepve.add_vm(100, "web", status="stopped")
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n")
    child = subprocess.Popen(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}",
                                 tmp_path, "run", "--interval", "0.2", "--listen", "127.0.0.1:0", "--desired",
                                 str(desired), "--state-dir", str(tmp_path / "state")),
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while vm.status != "running":
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)  # a few more ticks, each planning nothing
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
    finally:
        if child.poll() is None:
            child.kill()
    assert child.stderr is not None
    events = [json.loads(line) for line in child.stderr.read().splitlines()]
    ticks = [e for e in events if e["event"] == "tick"]
    assert len(ticks) >= 3 and sum(t["queued"] for t in ticks) == 1
    assert [e["event"] for e in events][-1] != "tick" or events[-1]["queued"] == 0
    assert any(e["event"] == "signal_received" for e in events)
    assert any(e["event"] == "executor_api_listening" for e in events)


@pytest.mark.parametrize("kind", ["qemu", "lxc"])
def test_selftest_round_trips_a_description_and_restores_it(kind: str, fakepve: Any, fakepve_cafile: str,
                                                             planner: server.Running, tmp_path: Path) -> None:
    """`pve-executor selftest` writes, reads back equal after normalization, and restores the original."""
    add = fakepve.add_vm if kind == "qemu" else fakepve.add_ct
    guest = add(150, "scratch", status="stopped", config={"description": "keep me"})
    result = subprocess.run(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}",
                                tmp_path, "selftest", "--vmid", "150", "--state-dir", str(tmp_path / "state")),
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: ok" in result.stdout and "restored" in result.stdout
    assert guest.config["description"].rstrip("\n") == "keep me"
    writes = [p for m, p, _ in fakepve.requests if m in ("POST", "PUT") and p.endswith("/150/config")]
    assert len(writes) == 2


def test_plan_and_selftest_read_the_daemons_own_config_file(tmp_path: Path) -> None:
    """The one config file a node has (deploy/executor.toml holds run's settings too) serves `plan` and
    `selftest`: they skip the daemon's settings there instead of refusing the file; a misspelt key is still an
    error naming it."""
    shipped = (ROOT / "deploy" / "executor.toml").read_text()
    config = tmp_path / "executor.toml"
    config.write_text(shipped)
    for command in (["plan"], ["selftest", "--vmid", "100"]):
        result = subprocess.run([sys.executable, "-m", "executor", *command, "--config", str(config),
                                 "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
    config.write_text(shipped + "\nmax_paralel = 3\n")
    result = subprocess.run([sys.executable, "-m", "executor", "plan", "--config", str(config), "--print-config"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "max_paralel: unknown setting" in result.stderr
