"""A cluster on one hub: a three-node fakepve cluster, one real hub over SQLite, one executor (engine + hub
provider, its own state dir and audience NODE@fakecluster) per node, one trust store granting `desired.apply`.

One signed apply converges every node (each guest on its own node, each change sent once); a migrated guest is
handled by its new node and not by the old one; a node joining late gets the current version at once; Status
shows every node's held version and ACK. What fakepve received is counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from executor.loop.engine import Engine, TickOutcome
from executor.loop.hub import HubProvider, HubSettings
from executor.loop.hubheld import HeldFiles
from executor.metrics import ExecutorMetrics
from executor.pve.node import Connection, ProxmoxNode
from executor.signed.trust import TrustKeeper
from hub.store import SqliteStore
from hub.v1 import hub_pb2 as pb
from tests.executor_helpers import mutations, starts
from tests.hub_helpers import Hub, running_hub
from tests.signing import default_roles, key_entry, write_store
from tests.test_hub_provider import document, sha, wait_for

Make = Callable[..., Engine]
CLUSTER = "fakecluster"  # fakepve's cluster name: the executors' audience is NODE@fakecluster
NODES = ("pve1", "pve2", "pve3", "pve4")
GUESTS = {"pve1": 100, "pve2": 200, "pve3": 300, "pve4": 400}


def desired(tags: dict[int, str] | None = None, vmids: tuple[int, ...] = tuple(GUESTS.values())) -> str:
    """``vmids`` running (with ``tags`` for some: applied at once on a running guest, no pending change)."""
    lines = ["guests:"]
    for vmid in vmids:
        lines += [f"  - vmid: {vmid}", "    state: running"]
        if tags and vmid in tags:
            lines += ["    config:", f"      tags: '{tags[vmid]}'"]
    return "\n".join(lines) + "\n"


def store_doc() -> dict[str, Any]:
    """alice holds publisher: desired.apply for every node of the cluster, threshold 1."""
    return {"version": 1,
            "roles": [*default_roles(),
                      {"name": "publisher", "kinds": ["desired.apply"], "classes": ["APPROVAL"], "max_ttl": "1h",
                       "audiences": [f"{node}@{CLUSTER}" for node in NODES], "threshold": 1}],
            "keys": [key_entry("alice", ["publisher", "operator"])]}


class Cluster:
    """The hub, the fake, the shared trust store, and one executor per node started so far."""

    def __init__(self, hub: Hub, fakepve: Any, make_engine: Make, connect: Callable[..., Connection],
                 tmp_path: Path) -> None:
        self.hub, self.fakepve, self.make_engine, self.connect, self.tmp = hub, fakepve, make_engine, connect, tmp_path
        self.store = write_store(tmp_path, store_doc())
        self.engines: dict[str, Engine] = {}
        self.providers: dict[str, HubProvider] = {}

    def join(self, node: str) -> None:
        """Start ``node``'s executor: its own state dir, trust keeper over the shared store, provider, engine."""
        state = self.tmp / f"state-{node}"
        state.mkdir()
        provider = HubProvider(HubSettings(target=self.hub.address, heartbeat=0.2, backoff_base=0.05, backoff_cap=0.8),
                               files=HeldFiles(state), trust=TrustKeeper(str(self.store), str(state)),
                               audience=lambda: f"{node}@{CLUSTER}", metrics=ExecutorMetrics())
        self.providers[node] = provider
        provider.start()
        self.engines[node] = self.make_engine([], pve=ProxmoxNode(self.connect(node=node)), provider=provider)

    def apply(self, text: str) -> bytes:
        """``text`` signed by alice as the next version, uploaded expecting the latest."""
        latest = self.hub.store.get(CLUSTER)
        version = latest.version if latest is not None else 0
        previous = self.hub.stub.GetDocument(pb.GetDocumentRequest(cluster=CLUSTER, version=version),
                                             timeout=10).document.payload_sha256 if version else ""
        signed = document(version + 1, previous, desired=text, cluster=CLUSTER, role="publisher")
        self.hub.stub.Apply(pb.ApplyRequest(cluster=CLUSTER, expected_version=version, envelope=signed), timeout=10)
        return signed

    def status(self) -> dict[str, tuple[int, bool]]:
        """Per node at the hub: (held version, last report an ACK)."""
        answer = self.hub.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10)
        return {n.node.split("@")[0]: (n.held_version, n.ok) for n in answer.nodes}

    def held_everywhere(self, version: int) -> Callable[[], bool]:
        """True once every started node has ACKed ``version`` at the hub."""
        return lambda: self.status() == {node: (version, True) for node in self.engines}

    def close(self) -> None:
        """Stop the providers (the engines are closed by make_engine)."""
        for provider in self.providers.values():
            provider.close()


@pytest.fixture(name="cluster")
def _cluster(fakepve: Any, make_engine: Make, connect: Callable[..., Connection], tmp_path: Path) -> Iterator[Cluster]:
    for node in NODES[1:]:
        fakepve.add_node(node)
    for node, vmid in GUESTS.items():
        fakepve.add_vm(vmid, f"guest-{vmid}", node=node, status="stopped", config={"memory": 1024})
    with running_hub(SqliteStore.in_dir(tmp_path / "hub"), heartbeat=0.1) as hub:
        made = Cluster(hub, fakepve, make_engine, connect, tmp_path)
        try:
            yield made
        finally:
            made.close()


def config_writes(fakepve: Any, since: int = 0) -> list[str]:
    """The paths of config writes fakepve received."""
    return [p for m, p, _ in mutations(fakepve, since) if p.endswith("/config")]


def test_one_apply_converges_three_nodes_a_migration_is_handed_over_and_a_late_node_catches_up(
        cluster: Cluster) -> None:
    """v1 reaches pve1-3, each ACKs it (Status shows it) and starts its own guest only, each start sent once;
    400 (pve4, no executor yet) is the only guest no node acts on. 200 migrates pve2 -> pve3; v2 changes its
    tags: pve3 writes it once, pve2 sends nothing for it and reports no NOT_FOUND. pve4 joining late holds v2
    at once and starts 400."""
    fake = cluster.fakepve
    for node in NODES[:3]:
        cluster.join(node)
    v1 = cluster.apply(desired())
    wait_for(cluster.held_everywhere(1), "every node's ACK of v1")
    assert {n: p.held.sha256 for n, p in cluster.providers.items()} == {n: sha(v1) for n in NODES[:3]}
    before = len(fake.requests)
    for node in NODES[:3]:
        summary = cluster.engines[node].tick(wait=True)
        assert (summary.outcome, summary.succeeded, summary.skipped, summary.failed) == (TickOutcome.OK, 1, 0, 0), \
            (node, summary)
        assert summary.elsewhere == 3, (node, summary)  # the others' guests (400's pve4 exists): elsewhere, not missing
    assert sorted(starts(fake, since=before)) == [f"/api2/json/nodes/{n}/qemu/{GUESTS[n]}/status/start"
                                                 for n in NODES[:3]]
    assert [fake.vm(v).status for v in GUESTS.values()] == ["running", "running", "running", "stopped"]
    for node in NODES[:3]:  # converged: a second tick sends nothing
        assert cluster.engines[node].tick(wait=True).queued == 0
    assert len(mutations(fake, before)) == 3

    asyncio.run(fake.migrate(200, "pve3"))  # time_scale 0: done before it returns
    assert fake.vm(200).node == "pve3"
    before = len(fake.requests)
    cluster.apply(desired({200: "db"}))
    wait_for(cluster.held_everywhere(2), "every node's ACK of v2")
    summaries = {node: cluster.engines[node].tick(wait=True) for node in NODES[:3]}
    assert all(s.skipped == 0 and s.failed == 0 for s in summaries.values()), summaries  # no NOT_FOUND noise
    assert (summaries["pve2"].queued, summaries["pve2"].elsewhere) == (0, 4)  # its only guest left
    assert summaries["pve3"].succeeded == 1
    assert config_writes(fake, before) == ["/api2/json/nodes/pve3/qemu/200/config"]
    assert [p for _, p, _ in fake.requests[before:] if "/pve2/qemu/200" in p] == []
    assert fake.vm(200).config["tags"] == "db"

    before = len(fake.requests)
    cluster.join("pve4")
    wait_for(cluster.held_everywhere(2), "the late node's ACK of v2", timeout=5)
    assert cluster.providers["pve4"].held.version == 2
    summary = cluster.engines["pve4"].tick(wait=True)
    assert (summary.succeeded, summary.skipped, summary.elsewhere) == (1, 0, 3)
    assert starts(fake, since=before) == ["/api2/json/nodes/pve4/qemu/400/status/start"]
    assert len(mutations(fake, before)) == 1
    for node in NODES:  # every node converged: nothing more to send anywhere
        assert cluster.engines[node].tick(wait=True).queued == 0
    assert cluster.status() == {node: (2, True) for node in NODES}
    assert len(starts(fake)) == 4 and len(config_writes(fake)) == 1  # each change exactly once, in all
