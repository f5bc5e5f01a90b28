"""What the pages show, read from the Store: nodes, their guests and ops, pending approvals, history.

Node data travels as the hub.v1 messages the gRPC API answers with (NodeStatus, GuestState, OpReport,
PendingApproval), so the page and ``GetNode``/``ListPending`` say the same thing. Every store call runs through
``read`` (the hub's store threads: SQLite connections are per thread, and a page must not open one per request).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from hub.store import NodeReport, Store
from hub.v1 import hub_pb2 as pb

T = TypeVar("T")
Read = Callable[..., Any]


def direct(call: Callable[..., T], *args: object) -> T:
    """Run a store call on this thread (tests; the hub passes its store threads' ``read``)."""
    return call(*args)


def state_name(value: int) -> str:
    """``drifted`` for SYNC_STATE_DRIFTED (as the CLI and metrics spell sync states)."""
    return pb.SyncState.Name(value).removeprefix("SYNC_STATE_").lower()  # type: ignore[arg-type]


def node_status(report: NodeReport) -> pb.NodeStatus:
    """A node's ACK/NACK row as the wire's NodeStatus."""
    return pb.NodeStatus(node=report.node, held_version=report.held, reported_version=report.version,
                         ok=report.ok, reason=report.reason,
                         last_seen_unix_ms=int(report.last_seen.timestamp() * 1000))


@dataclass(frozen=True, slots=True)
class Fleet:
    """The store as the pages read it."""

    store: Store
    read: Read = direct

    def latest(self, cluster: str) -> int:
        """The cluster's latest version (0: none)."""
        return int(self.read(self.store.latest, cluster))

    def statuses(self, cluster: str) -> list[pb.NodeStatus]:
        """Every node of the cluster, by name."""
        return [node_status(r) for r in self.read(self.store.nodes, cluster)]

    def node(self, cluster: str, node: str) -> pb.GetNodeResponse | None:
        """One node's status, guests and ops; None for a node the hub never heard of."""
        found = [s for s in self.statuses(cluster) if s.node == node]
        return pb.GetNodeResponse(status=found[0]) if found else None

    def pending(self, cluster: str) -> list[pb.PendingApproval]:
        """Every node's pending approvals, by node then vmid."""
        return []

    def clusters(self) -> list[str]:
        """The clusters the hub holds, by name."""
        return list(self.read(self.store.clusters))


def now_ms() -> int:
    """The hub's clock, Unix milliseconds."""
    return int(time.time() * 1000)
