"""What the pages show, read from the Store: nodes, their guests and ops, pending approvals, history.

Node data travels as the hub.v1 messages the gRPC API answers with (NodeStatus, GuestState, OpReport,
PendingApproval), built by the same functions (hub.fleet), so the page and ``Status``/``GetNode``/``ListPending``
say the same thing. Every store call runs through ``read`` (the hub's store threads: SQLite connections are per
thread, and a page must not open one per request).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from hub import fleet
from hub.service import DEFAULT_HEARTBEAT
from hub.store import Store
from hub.v1 import hub_pb2 as pb

T = TypeVar("T")
Read = Callable[..., Any]


def direct(call: Callable[..., T], *args: object) -> T:
    """Run a store call on this thread (tests; the hub passes its store threads' ``read``)."""
    return call(*args)


def no_watchers(cluster: str) -> Mapping[str, float]:
    """No Watch activity known (the hub passes its servicer's: each node's last Watch on this replica)."""
    return {}


def state_name(value: int) -> str:
    """``drifted`` for SYNC_STATE_DRIFTED (as the CLI and metrics spell sync states)."""
    return fleet.state_name(value) or "unspecified"


@dataclass(frozen=True, slots=True)
class Fleet:
    """The store as the pages read it."""

    store: Store
    read: Read = direct
    watched: Callable[[str], Mapping[str, float]] = no_watchers
    heartbeat: float = DEFAULT_HEARTBEAT

    def latest(self, cluster: str) -> int:
        """The cluster's latest version (0: none)."""
        return int(self.read(self.store.latest, cluster))

    def statuses(self, cluster: str) -> list[pb.NodeStatus]:
        """Every node of the cluster (ACK/NACK, StateReport or Watch), by name, as ``Status`` answers."""
        acks = {report.node: report for report in self.read(self.store.nodes, cluster)}
        states = {state.node: state for state in self.read(self.store.node_states, cluster)}
        seen = self.watched(cluster)
        now = time.time()
        return [fleet.node_status(node, acks.get(node), states.get(node), seen.get(node), heartbeat=self.heartbeat,
                                  now=now) for node in sorted({*acks, *states, *seen})]

    def node(self, cluster: str, node: str) -> pb.GetNodeResponse | None:
        """One node's status, guests (by vmid) and ops (oldest first); None for a node the hub never heard of."""
        found = [s for s in self.statuses(cluster) if s.node == node]
        if not found:
            return None
        guests = [fleet.guest_of(row) for row in self.read(self.store.guests, cluster, node)]
        return pb.GetNodeResponse(status=found[0], guests=guests, ops=self.ops(cluster, node))

    def ops(self, cluster: str, node: str) -> list[pb.OpReport]:
        """The node's recent signed ops, oldest first."""
        return [fleet.op_of(row) for row in self.read(self.store.ops, cluster, node)]

    def pending(self, cluster: str) -> list[pb.PendingApproval]:
        """Every node's pending approvals, by node, then as the node lists them (vmid, then op kind)."""
        found = []
        for row in self.read(lambda: self.store.guests(cluster, pending_only=True)):
            for item in fleet.guest_of(row).pending:
                item.node = row.node  # the node the hub heard it from, whatever the entry says (as ListPending)
                found.append(item)
        return sorted(found, key=lambda p: (p.node, p.vmid, p.op_kind))

    def clusters(self) -> list[str]:
        """The clusters the hub holds, by name."""
        return list(self.read(self.store.clusters))


def now_ms() -> int:
    """The hub's clock, Unix milliseconds."""
    return int(time.time() * 1000)
