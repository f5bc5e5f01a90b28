"""A `pve-hub serve` subprocess SIGKILLed under watching executors (engine + hub provider per node, fakepve).

While the hub is down each node keeps its version and converges on the document on disk (a node rebooted
meanwhile too); a new hub process on the same state dir and port is reconnected to, resumed from the version
held (nothing applied again), and its next version reaches every node. fakepve's requests are counted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from executor.loop.engine import Engine
from executor.loop.hub import HubProvider, HubSettings
from executor.loop.hubheld import HeldFiles
from executor.metrics import ExecutorMetrics
from executor.pve.node import Connection, ProxmoxNode
from executor.signed.trust import TrustKeeper
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from tests.executor_helpers import ROOT, mutations, starts
from tests.signing import write_store
from tests.test_hub_cluster import CLUSTER, desired, store_doc
from tests.test_hub_provider import document, metric, wait_for
from tests.test_hub_service import PVE_HUB, _free_port

Make = Callable[..., Engine]
GUESTS = {"pve1": 100, "pve2": 200}
VMIDS = tuple(GUESTS.values())


def serve(state: Path, port: int) -> subprocess.Popen[bytes]:
    """`pve-hub serve` on 127.0.0.1:``port`` over SQLite in ``state``, once it answers."""
    child = subprocess.Popen([*PVE_HUB, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
                              "--heartbeat", "0.1", "--log-format", "json"], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            child.kill()
            child.wait()
            raise
    return child


class Node:
    """One node's executor: provider (state dir, trust keeper, metrics) and engine over its fakepve node."""

    def __init__(self, name: str, port: int, store: Path, state: Path, make_engine: Make,
                 connect: Callable[..., Connection]) -> None:
        self.name, self.metrics = name, ExecutorMetrics()
        state.mkdir(exist_ok=True)
        self.provider = HubProvider(HubSettings(target=f"127.0.0.1:{port}", heartbeat=0.2, backoff_base=0.05,
                                                backoff_cap=0.4),
                                    files=HeldFiles(state), trust=TrustKeeper(str(store), str(state)),
                                    audience=lambda: f"{name}@{CLUSTER}", metrics=self.metrics)
        self.provider.start()
        self.engine = make_engine([], pve=ProxmoxNode(connect(node=name)), provider=self.provider)

    def connected(self) -> bool:
        """The provider holds a stream to the hub."""
        return metric(self.metrics, "pve_executor_hub_connected") == 1


def acks(node: Node) -> float:
    """The ACKs this node's provider sent."""
    return metric(node.metrics, "pve_executor_hub_reports_total", verdict="ack", reason="none")


def apply(port: int, text: str, version: int, previous: str) -> str:
    """``text`` signed as ``version`` (after ``previous``) and applied; the new payload sha256."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = pb_grpc.HubServiceStub(channel).Apply(
            pb.ApplyRequest(cluster=CLUSTER, expected_version=version - 1,
                            envelope=document(version, previous, desired=text, cluster=CLUSTER, role="publisher")),
            timeout=10)
    return str(answer.payload_sha256)


def test_a_sigkilled_hub_changes_nothing_and_a_new_one_is_resumed(
        fakepve: Any, make_engine: Make, connect: Callable[..., Connection], tmp_path: Path,
        providers: list[HubProvider]) -> None:
    """v1 converges pve1 and pve2. SIGKILL the hub: both keep v1; pve1 restarts its drifted guest from it; pve2,
    rebooted without the hub, serves v1 from disk. A new hub on the same state dir: both reconnect resuming from
    v1 (a tick sends nothing), v2 reaches both and its one change is written once."""
    fakepve.add_node("pve2")
    for name, vmid in GUESTS.items():
        fakepve.add_vm(vmid, f"guest-{vmid}", node=name, status="stopped", config={"memory": 1024})
    store, port, state = write_store(tmp_path, store_doc()), _free_port(), tmp_path / "hub"
    hub = serve(state, port)
    try:
        nodes = {name: Node(name, port, store, tmp_path / f"state-{name}", make_engine, connect) for name in GUESTS}
        providers.extend(node.provider for node in nodes.values())
        v1 = apply(port, desired(vmids=VMIDS), 1, "")
        wait_for(lambda: all(n.provider.held.version == 1 for n in nodes.values()), "both nodes holding v1")
        for node in nodes.values():
            assert node.engine.tick(wait=True).succeeded == 1
        assert sorted(starts(fakepve)) == ["/api2/json/nodes/pve1/qemu/100/status/start",
                                           "/api2/json/nodes/pve2/qemu/200/status/start"]

        os.kill(hub.pid, signal.SIGKILL)
        hub.wait(30)
        wait_for(lambda: not any(n.connected() for n in nodes.values()), "both nodes seeing the hub gone")
        fakepve.vm(100).status = "stopped"  # drift while the hub is down
        before = len(fakepve.requests)
        summary = nodes["pve1"].engine.tick(wait=True)
        assert (summary.succeeded, summary.skipped, nodes["pve1"].provider.held.version) == (1, 0, 1)
        assert starts(fakepve, since=before) == ["/api2/json/nodes/pve1/qemu/100/status/start"]
        nodes["pve2"].provider.close()  # pve2 reboots: a new executor over the same state dir, no hub
        nodes["pve2"] = Node("pve2", port, store, tmp_path / "state-pve2", make_engine, connect)
        providers.append(nodes["pve2"].provider)
        assert nodes["pve2"].provider.held.version == 1 and len(nodes["pve2"].provider.desired()) == 2
        before = len(fakepve.requests)
        for node in nodes.values():
            assert node.engine.tick(wait=True).queued == 0  # converged on v1 from disk: nothing to send
        assert mutations(fakepve, before) == []

        hub = serve(state, port)
        wait_for(lambda: all(n.connected() for n in nodes.values()), "both nodes back on the new hub", timeout=15)
        time.sleep(0.5)  # 5 heartbeats: a v1 sent again would have arrived (the hub's first event comes at once)
        for node in nodes.values():  # resumed from v1: nothing taken again, nothing sent
            assert node.provider.held.version == 1 and node.engine.tick(wait=True).queued == 0
        assert [acks(n) for n in nodes.values()] == [1, 0]  # v1 not sent again (pve2's count began at its reboot)
        assert mutations(fakepve, before) == []
        apply(port, desired({200: "db"}, VMIDS), 2, v1)
        wait_for(lambda: all(n.provider.held.version == 2 for n in nodes.values()), "both nodes holding v2")
        wait_for(lambda: [acks(n) for n in nodes.values()] == [2, 1], "one ACK of v2 from each")
        for node in nodes.values():
            node.engine.tick(wait=True)
        assert [p for _, p, _ in mutations(fakepve, before)] == ["/api2/json/nodes/pve2/qemu/200/config"]
        assert fakepve.vm(200).config["tags"] == "db"
        assert len(starts(fakepve, 100)) == 2 and len(starts(fakepve, 200)) == 1  # the drift, and nothing twice
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = pb_grpc.HubServiceStub(channel).Status(pb.StatusRequest(cluster=CLUSTER), timeout=10)
        assert {(n.node, n.held_version, n.ok) for n in status.nodes} == {
            ("pve1@fakecluster", 2, True), ("pve2@fakecluster", 2, True)}
    finally:
        if hub.poll() is None:
            hub.send_signal(signal.SIGTERM)
            hub.wait(30)
