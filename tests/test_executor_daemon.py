"""The executor as a process and as a service: CLI, crash recovery, the API, the desired file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from executor.desired import Declared, DesiredStateError, FileProvider, parse
from executor.engine import Engine
from executor.server import start_api
from executor.v1 import executor_pb2 as epb
from executor.v1 import executor_pb2_grpc as epb_grpc
from journal import Ended, Journal, Outcome
from planner import server

ROOT = Path(__file__).resolve().parent.parent


def cli(fakepve: Any, cafile: str, planner_port: int, tmp_path: Path, *args: str) -> list[str]:
    """The pve-executor command line against the fixtures, secrets in files."""
    password = tmp_path / "password"
    password.write_text("secret\n")
    return [sys.executable, "-m", "executor", *args, "--node", "pve1", "--pve-url", f"https://127.0.0.1:{fakepve.port}",
            "--pve-user", "root@pam", "--pve-password-file", str(password), "--pve-ca-file", cafile,
            "--planner", f"127.0.0.1:{planner_port}", "--log-format", "json"]


def test_run_once_converges_and_logs_no_secret(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                              tmp_path: Path) -> None:
    """`pve-executor run --once` converges, exits 0, logs JSON lines, and never logs the password."""
    vm = fakepve.add_vm(100, "web", status="stopped", config={"memory": 512})
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n    config: {memory: 1024}\n")
    result = subprocess.run(cli(fakepve, fakepve_cafile, planner.port, tmp_path, "run", "--once", "--desired",
                                str(desired), "--state-dir", str(tmp_path / "state")),
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
    text = subprocess.run(cli(fakepve, fakepve_cafile, planner.port, tmp_path, "plan", "--desired", str(desired)),
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "guest 100: set config" in text and "memory: '512' -> '1024'" in text and "guest 100: start" in text
    as_json = subprocess.run(cli(fakepve, fakepve_cafile, planner.port, tmp_path, "plan", "--json", "--desired",
                                 str(desired)), cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert [a["vmid"] for a in json.loads(as_json.stdout)["actions"]] == [100, 100]
    assert not [r for r in fakepve.requests[before:] if r[0] in ("POST", "PUT") and "ticket" not in r[1]]


def test_bad_flags_and_bad_desired_file_exit_2_naming_the_problem(fakepve: Any, fakepve_cafile: str,
                                                                  planner: server.Running, tmp_path: Path) -> None:
    """A missing credential or a bad desired file is refused before anything runs."""
    no_node = subprocess.run([sys.executable, "-m", "executor", "plan"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=False, env={k: v for k, v in os.environ.items()
                                                           if not k.startswith("PVE_EXECUTOR_")})
    assert no_node.returncode == 2 and "config: node: required" in no_node.stderr
    bad = tmp_path / "desired.yaml"
    bad.write_text("guests:\n  - vmid: 100\n    state: sleeping\n")
    result = subprocess.run(cli(fakepve, fakepve_cafile, planner.port, tmp_path, "run", "--once", "--desired",
                                str(bad), "--state-dir", str(tmp_path / "s")),
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert f"{bad}:3: state: must be running or stopped, got 'sleeping'" in result.stderr


def test_sigkill_during_a_slow_task_is_resolved_from_its_upid(fakepve: Any, fakepve_cafile: str,
                                                              planner: server.Running, tmp_path: Path) -> None:
    """Killed while a start task runs, the restarted executor waits on that UPID; nothing runs twice."""
    fakepve.time_scale = 0.02
    vm = fakepve.add_vm(100, "web", status="stopped")
    vm.start_secs = 150  # 3 s of wall time
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n")
    command = cli(fakepve, fakepve_cafile, planner.port, tmp_path, "run", "--once", "--desired", str(desired),
                  "--state-dir", str(tmp_path / "state"))
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not any(m == "GET" and "/tasks/UPID" in p for m, p, _ in fakepve.requests):
        assert time.monotonic() < deadline and child.poll() is None, "the executor never polled its task"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert vm.status == "stopped"  # killed mid-task
    with Journal.open(tmp_path / "state") as journal:
        (flight,) = journal.in_flight()
        assert flight.kind == "start" and flight.upid
    restarted = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert restarted.returncode == 0, restarted.stderr
    events = [json.loads(line) for line in restarted.stderr.splitlines()]
    recovered = [e for e in events if e["event"] == "recovered"]
    assert [(e["outcome"], e["upid"]) for e in recovered] == [("ok", flight.upid)]
    assert vm.status == "running"
    assert len([t for t in fakepve.tasklog if t["type"] == "qmstart"]) == 1
    with Journal.open(tmp_path / "state") as journal:
        assert journal.in_flight() == []
        assert [r.outcome for r in journal.recent() if isinstance(r, Ended)] == [Outcome.OK]


def test_executor_api_status_reconcile_and_operations(fakepve: Any, make_engine: Callable[..., Engine]) -> None:
    """GetStatus, Reconcile and ListOperations over a real loopback server."""
    fakepve.add_vm(100, "web", status="stopped")
    engine = make_engine([Declared(vmid=100, state="running")])
    api = start_api(engine, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            stub = epb_grpc.ExecutorServiceStub(channel)
            assert stub.GetStatus(epb.GetStatusRequest(), timeout=10).ticks == 0
            tick = stub.Reconcile(epb.ReconcileRequest(), timeout=30).tick
            assert (tick.outcome, tick.actions_queued, tick.actions_succeeded) == (epb.TICK_OUTCOME_OK, 1, 1)
            status = stub.GetStatus(epb.GetStatusRequest(), timeout=10)
            assert status.ticks == 1 and status.journal_enabled and not status.in_flight
            assert [(c.kind, c.outcome, c.count) for c in status.actions] == [("start", "ok", 1)]
            records = stub.ListOperations(epb.ListOperationsRequest(limit=10), timeout=10).operations
            assert [r.record for r in records] == ["begun", "task", "ended"]
            with pytest.raises(grpc.RpcError) as info:
                stub.ListOperations(epb.ListOperationsRequest(limit=5000), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        api.stop(1)


@pytest.mark.parametrize(("text", "message"), [
    ("guests:\n  - vmid: 100\n    colour: blue\n", "f:3: colour: unknown key"),
    ("guests:\n  - vmid: 100\n    state: paused\n", "f:3: state: must be running or stopped"),
    ("guests:\n  - vmid: 100\n  - vmid: 100\n", "f:3: vmid: duplicate vmid 100 (first at line 2)"),
    ("guests:\n  - vmid: web\n", "f:2: vmid: must be an integer"),
    ("guests:\n  - vmid: 1.5\n", "f:2: vmid: must be an integer"),
    ("guests:\n  - state: running\n", "f:2: vmid: required"),
    ("guests:\n  - vmid: 100\n    config: {Memory: 1}\n", "f:3: config.Memory: not a PVE config key"),
    ("guests:\n  - vmid: 100\n    config: [memory]\n", "f:3: config: must be a mapping"),
    ("hosts: []\n", "f:1: unknown key 'hosts'"),
    ("guests: [\n", "f:2: not valid YAML"),
])
def test_desired_file_errors_name_file_line_and_field(text: str, message: str) -> None:
    """Every mistake in the desired file is refused with where it is and what is wrong."""
    with pytest.raises(DesiredStateError) as info:
        parse(text, "f")
    assert str(info.value).startswith(message)


def test_desired_file_values_become_pve_text() -> None:
    """YAML booleans are written 1/0 (PVE refuses True), numbers as text, null as a delete."""
    (guest,) = parse("guests:\n  - vmid: 100\n    state: running\n    description: web tier\n"
                     "    config: {memory: 4096, onboot: true, agent: false, tags: ~}\n")
    assert guest == Declared(vmid=100, state="running", description="web tier",
                             config={"memory": "4096", "onboot": "1", "agent": "0", "tags": ""})
    assert parse("") == [] and parse("guests:\n") == []


def test_bad_reload_keeps_the_last_good_state(tmp_path: Path) -> None:
    """An edit that breaks the file is logged and ignored; fixing it is picked up."""
    path = tmp_path / "desired.yaml"
    path.write_text("guests:\n  - vmid: 100\n    state: running\n")
    provider = FileProvider(path)
    path.write_text("guests:\n  - vmid: 100\n    state: runing\n")
    with capture_logs() as logs:
        assert provider.desired() == [Declared(vmid=100, state="running")]
    assert logs[0]["event"] == "desired_reload_failed" and "runing" in logs[0]["error"]
    path.write_text("guests:\n  - vmid: 100\n    state: stopped\n    # now valid\n")
    assert provider.desired() == [Declared(vmid=100, state="stopped")]


def test_a_journal_that_cannot_open_means_journal_less_operation(fakepve: Any, fakepve_cafile: str,
                                                                 planner: server.Running, tmp_path: Path) -> None:
    """An unusable state directory is a loud warning, not a crash: the node still converges (benign steps only)."""
    vm = fakepve.add_vm(100, "web", status="stopped")
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = subprocess.run(cli(fakepve, fakepve_cafile, planner.port, tmp_path, "run", "--once", "--desired",
                                str(desired), "--state-dir", str(blocker / "state")),
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    warning = next(e for e in events if e["event"] == "journal_unavailable_benign_only")
    assert warning["level"] == "error" and str(blocker) in warning["error"]
    assert vm.status == "running"


def test_api_token_auth_needs_no_login(fakepve: Any, connect: Callable[..., Any]) -> None:
    """With an API token every request carries it; no ticket is ever requested."""
    from executor.pve import Credentials, ProxmoxNode  # noqa: PLC0415

    fakepve.apitokens["reconcile@pve!executor"] = "0b6c-token-secret"
    fakepve.add_vm(100, "web", status="running")
    node = ProxmoxNode(connect(credentials=Credentials(user="reconcile@pve!executor",
                                                       token_secret="0b6c-token-secret")))
    assert [g.vmid for g in node.guests()] == [100]
    assert not [p for _, p, _ in fakepve.requests if p.endswith("/access/ticket")]
    assert "0b6c" not in repr(node.session._connection)  # secrets are never printed


def test_daemon_ticks_until_sigterm_then_drains_and_exits(fakepve: Any, fakepve_cafile: str,
                                                          planner: server.Running, tmp_path: Path) -> None:
    """`pve-executor run` ticks every interval, serves its API, and on SIGTERM exits 0 promptly."""
    vm = fakepve.add_vm(100, "web", status="stopped")
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n")
    child = subprocess.Popen(cli(fakepve, fakepve_cafile, planner.port, tmp_path, "run", "--interval", "0.2",
                                 "--listen", "127.0.0.1:0", "--desired", str(desired), "--state-dir",
                                 str(tmp_path / "state")), cwd=ROOT, stderr=subprocess.PIPE, text=True)
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


def test_recovery_without_upid_uses_the_task_list_or_the_guest_state(fakepve: Any, node: Any,
                                                                     tmp_path: Path) -> None:
    """A crash before the UPID was journalled: the guest's tasks, else its state, decide; else unknown."""
    from executor.pvewrite import ProxmoxWriter  # noqa: PLC0415
    from executor.recovery import recover  # noqa: PLC0415

    fakepve.add_vm(100, "web", status="stopped")
    fakepve.add_vm(101, "db", status="running")
    fakepve.add_vm(102, "mail", status="stopped")
    with Journal.open(tmp_path / "j") as journal:
        started = journal.begin(vmid=100, kind="start", payload={"type": "qemu"})
        ProxmoxWriter(node.session).start("qemu", 100)  # the call went out, the crash came before journal.task()
        journal.begin(vmid=101, kind="start", payload={"type": "qemu"})   # no task, but running: ok
        journal.begin(vmid=102, kind="start", payload={"type": "qemu"})   # no task, still stopped: unknown
        decided = {op.vmid: outcome for op, outcome in recover(journal, node)}
        assert decided == {100: Outcome.OK, 101: Outcome.OK, 102: Outcome.UNKNOWN}
        assert journal.in_flight() == [] and started


@pytest.mark.parametrize("kind", ["qemu", "lxc"])
def test_selftest_round_trips_a_description_and_restores_it(kind: str, fakepve: Any, fakepve_cafile: str,
                                                             planner: server.Running, tmp_path: Path) -> None:
    """`pve-executor selftest` writes, reads back equal after normalization, and restores the original."""
    add = fakepve.add_vm if kind == "qemu" else fakepve.add_ct
    guest = add(150, "scratch", status="stopped", config={"description": "keep me"})
    result = subprocess.run(cli(fakepve, fakepve_cafile, planner.port, tmp_path, "selftest", "--vmid", "150"),
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: ok" in result.stdout and "restored" in result.stdout
    assert guest.config["description"].rstrip("\n") == "keep me"
    writes = [p for m, p, _ in fakepve.requests if m in ("POST", "PUT") and p.endswith("/150/config")]
    assert len(writes) == 2
