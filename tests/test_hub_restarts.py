"""Real processes killed mid-stream: a `pve-executor run --hub` daemon SIGKILLed while a new document arrives and
its actions run against fakepve, and a `pve-hub serve` on PostgreSQL SIGKILLed under a watching daemon.

Each comes back on the same state (state dir, database and address): the daemon watches from the version it
holds (the hub's log says which since_version it received), converges, and fakepve received each config write and
start exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from planner import server
from tests.executor_helpers import ROOT, LineReader, cli, starts, unused_port
from tests.signing import write_store
from tests.test_hub_provider import WRITES, document, idle_ticks, store_doc, wait_for

CLUSTER = "fakecluster"  # fakepve's cluster: the daemon's audience is pve1@fakecluster
NODE = f"pve1@{CLUSTER}"
PVE_HUB = [sys.executable, "-c", "import sys; from hub.cli import main; sys.exit(main(sys.argv[1:]))"]


def desired(**config: str) -> str:
    """Guest 100 running with ``config``."""
    lines = ["guests:", "  - vmid: 100", "    state: running", "    config:"]
    return "\n".join([*lines, *(f"      {key}: '{value}'" for key, value in config.items())]) + "\n"


class HubProcess:
    """A `pve-hub serve` subprocess on 127.0.0.1:``port``; its JSON log in a file (what it received)."""

    def __init__(self, port: int, log: Path, *store: str) -> None:
        self.port, self.log = port, log
        with open(log, "ab") as out:
            self.child = subprocess.Popen([*PVE_HUB, "serve", "--listen", f"127.0.0.1:{port}", *store,
                                           "--heartbeat", "0.2", "--log-format", "json"],
                                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                          stdout=subprocess.DEVNULL, stderr=out)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.HubServiceStub(self.channel)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL, by PID."""
        self.channel.close()
        if self.child.poll() is None:
            os.kill(self.child.pid, signal.SIGKILL)
        self.child.wait(30)

    def stop(self) -> None:
        """SIGTERM, by PID; it must exit 0."""
        self.channel.close()
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            assert self.child.wait(30) == 0

    def apply(self, text: str) -> bytes:
        """``text`` signed by alice as the next version, uploaded expecting the latest."""
        latest = self.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10).latest_version
        previous = self.stub.GetDocument(pb.GetDocumentRequest(cluster=CLUSTER, version=latest),
                                         timeout=10).document.payload_sha256 if latest else ""
        signed = document(latest + 1, previous, desired=text, cluster=CLUSTER)
        self.stub.Apply(pb.ApplyRequest(cluster=CLUSTER, expected_version=latest, envelope=signed), timeout=10)
        return signed

    def node(self) -> tuple[int, bool]:
        """(version held, last report an ACK) of pve1 at the hub."""
        nodes = self.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10).nodes
        found = [(n.held_version, n.ok) for n in nodes if n.node == NODE]
        return found[0] if found else (0, False)


def watches(log: Path) -> list[int]:
    """The since_version of each Watch the hubs logged in ``log``, in order."""
    found = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "hub.watch_started" and event.get("node") == NODE:
            found.append(int(event["since_version"]))
    return found


class Daemon:
    """`pve-executor run --hub` as a subprocess (its log read line by line), stopped by its PID."""

    def __init__(self, command: list[str]) -> None:
        self.child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
        assert self.child.stderr is not None
        self.log = LineReader(self.child.stderr)

    def kill(self) -> None:
        """SIGKILL, by PID."""
        if self.child.poll() is None:
            os.kill(self.child.pid, signal.SIGKILL)
        self.child.wait(10)

    def stop(self) -> None:
        """SIGTERM; it must exit 0."""
        self.child.send_signal(signal.SIGTERM)
        assert self.child.wait(15) == 0


@pytest.fixture(name="daemons")
def _daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for daemon in made:
        if daemon.child.poll() is None:
            daemon.kill()


@pytest.fixture(name="hubs")
def _hubs() -> Iterator[list[HubProcess]]:
    made: list[HubProcess] = []
    yield made
    for hub in made:
        if hub.child.poll() is None:
            hub.kill()


def writes_to_100(fakepve: Any) -> list[tuple[str, str, Any]]:
    """Every write fakepve received for guest 100, with its body."""
    return [r for r in fakepve.requests if r[0] in WRITES and "/qemu/100/" in r[1]]


def daemon_command(fakepve: Any, cafile: str, planner: server.Running, tmp_path: Path, hub_port: int) -> list[str]:
    """pve-executor run --hub for pve1: its trust store grants alice desired.apply for pve1@fakecluster."""
    store = write_store(tmp_path, store_doc(NODE))
    return cli(f"https://127.0.0.1:{fakepve.port}", cafile, f"127.0.0.1:{planner.port}", tmp_path, "run",
               "--hub", f"127.0.0.1:{hub_port}", "--trust-store", str(store), "--state-dir", str(tmp_path / "state"),
               "--interval", "0.2", "--hub-heartbeat", "0.2", "--listen", f"127.0.0.1:{unused_port()}")


def test_a_daemon_killed_while_a_document_arrives_and_its_start_runs_resumes_and_applies_nothing_twice(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path, daemons: list[Daemon],
        hubs: list[HubProcess]) -> None:
    """v1 (memory 4096, running) reaches the daemon, which writes the config and POSTs the start; the start task
    takes 4 s in fakepve. Inside that window v2 (tags) arrives, is saved and ACKed, and the daemon is SIGKILLed
    with the guest still stopped. Restarted on the same state dir it watches from v2 (the hub's log), converges
    (running, tags written) and fakepve received one memory write, one tags write and one start."""
    fakepve.add_vm(100, "vm100", status="stopped", config={"memory": 2048, "cores": 1})
    fakepve.vm(100).start_secs = 4
    fakepve.time_scale = 1.0  # the start task runs 4 real seconds: the window the kill falls in
    hub = HubProcess(unused_port(), tmp_path / "hub.log", "--state-dir", str(tmp_path / "hub"))
    hubs.append(hub)
    hub.apply(desired(memory="4096"))
    command = daemon_command(fakepve, fakepve_cafile, planner, tmp_path, hub.port)
    daemons.append(Daemon(command))
    wait_for(lambda: starts(fakepve, 100) != [], "the start of guest 100 POSTed", timeout=30)
    hub.apply(desired(memory="4096", tags="web"))
    wait_for(lambda: hub.node() == (2, True), "the daemon's ACK of v2 while the start runs", timeout=3)
    daemons[0].kill()
    assert fakepve.vm(100).status == "stopped", "the kill fell after the start task ended: the window was missed"
    assert watches(hub.log) == [0]

    daemons.append(Daemon(command))
    wait_for(lambda: len(watches(hub.log)) == 2, "the restarted daemon's Watch", timeout=30)
    assert watches(hub.log) == [0, 2]  # resumed from the version on disk, not from v1 or 0
    wait_for(lambda: fakepve.vm(100).status == "running" and fakepve.vm(100).config.get("tags") == "web",
             "guest 100 converged on v2", timeout=30)
    wait_for(lambda: len(idle_ticks(daemons[1].log)) >= 2, "two ticks with nothing to do", timeout=30)
    daemons[1].stop()
    assert hub.node() == (2, True)
    writes = writes_to_100(fakepve)
    assert len(starts(fakepve, 100)) == 1, writes
    configs = [body for _, path, body in writes if path.endswith("/config")]
    assert sum("memory" in str(body) for body in configs) == 1, configs
    assert sum("tags" in str(body) for body in configs) == 1, configs


def test_a_hub_on_postgresql_sigkilled_under_a_watching_daemon_is_resumed_by_its_successor(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path, daemons: list[Daemon],
        hubs: list[HubProcess], pg_server: Any) -> None:
    """`pve-hub serve` on PostgreSQL: v1 converges the daemon's guest. SIGKILL the hub; the daemon keeps v1 (a drift
    is put right from it). A new hub on the same database and address: the daemon reconnects (backoff, jitter)
    watching from v1, v2 reaches it, and fakepve received one memory write, one tags write, two starts (the
    second the drift's)."""
    fakepve.add_vm(100, "vm100", status="stopped", config={"memory": 2048, "cores": 1})
    dsn = tmp_path / "dsn"
    dsn.write_text(pg_server.create_database(f"hub_restart_{os.getpid()}") + "\n", encoding="utf-8")
    port, log = unused_port(), tmp_path / "hub.log"
    hubs.append(HubProcess(port, log, "--postgres-dsn-file", str(dsn)))
    hubs[0].apply(desired(memory="4096"))
    daemons.append(Daemon(daemon_command(fakepve, fakepve_cafile, planner, tmp_path, port)))
    daemon = daemons[0]
    wait_for(lambda: hubs[0].node() == (1, True) and fakepve.vm(100).status == "running", "v1 converged", timeout=30)

    hubs[0].kill()
    wait_for(lambda: bool(events(daemon, "hub_disconnected")), "the daemon seeing the hub gone", timeout=10)
    fakepve.vm(100).status = "stopped"  # drift while the hub is down: put right from the v1 on disk
    wait_for(lambda: fakepve.vm(100).status == "running", "the drift put right without a hub", timeout=10)

    hubs.append(HubProcess(port, log, "--postgres-dsn-file", str(dsn)))
    wait_for(lambda: len(watches(log)) >= 2, "the daemon back on the new hub", timeout=30)
    assert set(watches(log)[1:]) == {1}  # resumed from v1 (every try after the kill)
    hubs[1].apply(desired(memory="4096", tags="web"))
    wait_for(lambda: hubs[1].node() == (2, True), "the daemon's ACK of v2 at the new hub", timeout=10)
    wait_for(lambda: fakepve.vm(100).config.get("tags") == "web", "v2 applied", timeout=10)
    idle = len(idle_ticks(daemon.log))
    wait_for(lambda: len(idle_ticks(daemon.log)) >= idle + 2, "two ticks with nothing to do", timeout=30)
    daemon.stop()
    hubs[1].stop()
    configs = [body for _, path, body in writes_to_100(fakepve) if path.endswith("/config")]
    assert len(starts(fakepve, 100)) == 2, writes_to_100(fakepve)
    assert sum("memory" in str(body) for body in configs) == 1, configs
    assert sum("tags" in str(body) for body in configs) == 1, configs
    assert len(events(daemon, "hub_document_applied")) == 2  # v1 and v2, each taken once


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    """The daemon's log events called ``name`` so far."""
    found = []
    for line in list(daemon.log.lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            found.append(event)
    return found
