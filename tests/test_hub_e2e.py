"""The real hub and the executor's real hub provider together: an apply through pve-hub's service converges a guest,
the node's ACK and NACK show in Status, and a hub restarted on the same state dir is resumed from the held version.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from executor.loop.engine import Engine
from executor.loop.hub import HubProvider
from executor.metrics import ExecutorMetrics
from executor.signed.trust import TrustKeeper
from hub.store import SqliteStore
from hub.v1 import hub_pb2 as pb
from safety.desireddoc import Held
from tests.hub_helpers import Hub, running_hub
from tests.pve_memory import MemoryPve
from tests.signing import write_store
from tests.test_hub_provider import AUDIENCE, CLUSTER, DESIRED, document, make_provider, sha, store_doc, wait_for

Make = Callable[..., Engine]


@pytest.fixture(name="trust")
def _trust(tmp_path: Path) -> TrustKeeper:
    """The node's trust keeper (alice: publisher, desired.apply for pve1@cluster-a)."""
    state = tmp_path / "node"
    state.mkdir()
    return TrustKeeper(str(write_store(tmp_path, store_doc())), str(state))


def apply(hub: Hub, envelope: bytes, expected: int) -> pb.ApplyResponse:
    """Upload ``envelope`` as the next version (the hub checks only its sequence)."""
    answer: pb.ApplyResponse = hub.stub.Apply(pb.ApplyRequest(cluster=CLUSTER, expected_version=expected,
                                                              envelope=envelope), timeout=10)
    return answer


def node_status(hub: Hub) -> tuple[int, int, bool, str]:
    """(held, reported, ok, reason) of the node at the hub, or zeros."""
    nodes = {n.node: n for n in hub.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10).nodes}
    node = nodes.get(AUDIENCE)
    return (node.held_version, node.reported_version, node.ok, node.reason) if node else (0, 0, False, "")


def test_an_apply_reaches_the_node_which_converges_and_acks(trust: TrustKeeper, tmp_path: Path, pve: MemoryPve,
                                                            make_memory_engine: Make,
                                                            providers: list[HubProvider]) -> None:
    """v1 through the hub: the node verifies it, ACKs (Status shows it held) and the engine starts the guest.
    A forged v2 (an unknown key) passes the courier but is NACKed by the node and changes nothing there;
    after a restart of the hub on the same state dir, the node resumes and takes v3."""
    vm = pve.add_vm(100, "web", status="stopped", config={"memory": 2048})
    state = tmp_path / "hub"
    with running_hub(SqliteStore.in_dir(state), heartbeat=0.1) as hub:
        port = hub.running.port
        provider = make_provider(providers, port, trust, tmp_path / "node", metrics=ExecutorMetrics())
        engine = make_memory_engine([], provider=provider)
        v1 = document(1)
        assert apply(hub, v1, 0).payload_sha256 == sha(v1)
        wait_for(lambda: node_status(hub) == (1, 1, True, ""), "the node's ACK of v1 at the hub")
        assert provider.held == Held(version=1, sha256=sha(v1))
        engine.tick(wait=True)
        assert (vm.status, str(vm.config["memory"])) == ("running", "4096")
        forged = document(2, sha(v1), signers=("mallory",), desired=DESIRED.replace("4096", "8192"))
        apply(hub, forged, 1)
        wait_for(lambda: node_status(hub)[:3] == (1, 2, False), "the node's NACK of v2 at the hub")
        assert "UNKNOWN_KEY" in node_status(hub)[3] and provider.held.version == 1
    v3 = document(3, sha(forged), desired=DESIRED.replace("4096", "6144"))
    with running_hub(SqliteStore.in_dir(state), heartbeat=0.1, listen=f"127.0.0.1:{port}") as hub:
        assert hub.stub.History(pb.HistoryRequest(cluster=CLUSTER), timeout=10).entries[0].version == 2
        apply(hub, v3, 2)
        wait_for(lambda: node_status(hub)[:3] == (3, 3, True), "the node's ACK of v3 after the restart", 20)
        assert provider.held.version == 3
        assert [dict(g.config or {}) for g in provider.desired()] == [{"memory": "6144"}]
