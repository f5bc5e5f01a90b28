"""The hub's storage seam: one Protocol, implemented by SqliteStore and PostgresStore."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from hub.store.model import Delivery, Entry, GuestRow, NodeReport, NodeState, OpRow, Recorded, StateIn, Version


class Store(Protocol):
    """Per cluster, a gap-free sequence of signed documents (1..n), and each node's last ACK/NACK.

    Bad input raises ``InvalidArgumentError`` (a ValueError naming the field); refusals are ``StoreError``s.
    Every method is safe to call from several threads, and several processes (or replicas) may share
    one database.
    """

    max_envelope_bytes: int

    def append(self, cluster: str, expected_version: int, envelope: bytes, author: str, message: str) -> Version:
        """Store ``envelope`` as version ``expected_version + 1`` if ``expected_version`` is the latest (0: none).

        Raises ``VersionConflict`` (naming both versions) if another append came first, and
        ``DocumentTooLarge`` over ``max_envelope_bytes``; either way nothing is stored.
        """
        ...

    def latest(self, cluster: str) -> int:
        """The cluster's latest version (0: none yet)."""
        ...

    def get(self, cluster: str, version: int | None = None) -> Version | None:
        """Version ``version`` (None: the latest) of the cluster's document, or None if there is none."""
        ...

    def history(self, cluster: str, limit: int = 20, before: int | None = None) -> list[Entry]:
        """Up to ``limit`` versions older than ``before`` (None: all), newest first, without envelopes."""
        ...

    def clusters(self) -> list[str]:
        """Every cluster with a version, an ACK/NACK or a StateReport, by name (the web page's index)."""
        ...

    def since(self, cluster: str, version: int) -> Version | None:
        """What a watcher holding ``version`` needs: the latest document if it is newer, else None.

        Each document is the whole desired state, so the latest one supersedes any in between.
        Raises ``UnknownVersionError`` if ``version`` is past the latest (the watcher is ahead of this hub).
        """
        ...

    def record_ack(self, cluster: str, node: str, version: int, ok: bool, reason: str = "") -> NodeReport:
        """Record a node's ACK (``ok``) or NACK of ``version``, with the reason, now; return its report."""
        ...

    def nodes(self, cluster: str) -> list[NodeReport]:
        """Every node's last report for the cluster, by node name."""
        ...

    def wait_for_change(self, cluster: str, after_version: int, timeout: float) -> bool:
        """Block until the cluster's latest version is past ``after_version`` (True) or ``timeout`` s pass (False).

        Woken by appends through any store on the same database, this process's or another's.
        """
        ...

    # --- deliveries: approvals through the hub (migration 4) -------------------------------------------------------
    # The hub carries signed envelopes to the node their audience names; it never reads more of them than the
    # audience, kind and op id, and it never approves: the node's gate verifies each as its local API does.

    def record_audience(self, cluster: str, node: str, audience: str) -> None:
        """Record the audience ``node`` says its signed ops name (at Watch; from its StateReports)."""
        ...

    def node_for_audience(self, cluster: str, audience: str) -> str | None:
        """The node that last said it answers to ``audience``; else a node named ``audience`` (an executor's id is
        its audience, NODE@CLUSTER) that reported; None when there is none."""
        ...

    def add_delivery(self, cluster: str, node: str, envelope: bytes, op_id: str, kind: str) -> Delivery:
        """Queue ``envelope`` for ``node`` (a new delivery id); InvalidArgumentError over MAX_OP_ENVELOPE bytes.

        Wakes the cluster's delivery waiters on every replica (``wait_for_deliveries``).
        """
        ...

    def open_deliveries(self, cluster: str, node: str) -> list[Delivery]:
        """The node's deliveries without a verdict (queued, or delivered and unanswered), oldest first."""
        ...

    def deliveries_after(self, cluster: str, seq: int) -> list[Delivery]:
        """The cluster's deliveries numbered past ``seq``, oldest first (what a feed has not routed yet)."""
        ...

    def delivery_head(self, cluster: str) -> int:
        """The cluster's last delivery number (0: none)."""
        ...

    def mark_delivered(self, delivery_id: str) -> None:
        """A queued delivery was sent on its node's stream (a decided one keeps its verdict)."""
        ...

    def record_verdict(self, cluster: str, node: str, delivery_id: str, decision: str, *, op_id: str = "",
                       reason: str = "", detail: str = "") -> bool:
        """The node's verdict on its delivery; True if recorded. The first verdict stands: a redelivery's (a nonce
        already spent, in flight) never overwrites it; a delivery of another node is not touched."""
        ...

    def record_op_reports(self, cluster: str, node: str, reports: list[tuple[str, bytes]]) -> int:
        """Each (op_id, serialized OpReport): the op's latest fate on every delivery of it to ``node``, in one
        transaction; how many deliveries it touched (an op the hub never routed touches none)."""
        ...

    def deliveries(self, cluster: str, ident: str | None = None, limit: int = 20) -> list[Delivery]:
        """Deliveries whose delivery id or op id is ``ident``, or (None) the ``limit`` most recent; oldest first."""
        ...

    def wait_for_deliveries(self, cluster: str, after_seq: int, timeout: float) -> bool:
        """Block until the cluster has a delivery past ``after_seq`` (True) or ``timeout`` s pass (False)."""
        ...

    def schema_version(self) -> int:
        """The schema step the database is at (hub.store.schema's migrations)."""
        ...

    # -- last seen (Watch activity) --------------------------------------------------------------------------------

    def record_seen(self, cluster: str, seen: Mapping[str, float]) -> None:
        """Record that each node of ``seen`` was watching ``cluster`` at its time (unix seconds), in one write.

        Only ``last_seen`` moves, and never back; a node with no report yet gets a row holding nothing (version 0,
        no verdict), so every replica's ``nodes`` lists a node that only watches.
        """
        ...

    def close(self) -> None:
        """Release connections and wake every waiter (they return False)."""
        ...

    # --- the fleet view: each node's state after its ticks (hub.store.states) -----------------------------------

    def record_state(self, report: StateIn) -> Recorded:
        """Record a node's StateReport: a full one replaces its guests and ops; a delta applies only on top of the
        report held (same session, ``base_seq`` the seq held), else nothing changes and ``applied`` is False."""
        ...

    def node_states(self, cluster: str | None = None) -> list[NodeState]:
        """Every node's last StateReport (of ``cluster``; None: every cluster) with its guests counted by state."""
        ...

    def guests(self, cluster: str, node: str | None = None, *, pending_only: bool = False) -> list[GuestRow]:
        """The guests as last reported (by ``node``; None: every node), by node then vmid."""
        ...

    def ops(self, cluster: str, node: str) -> list[OpRow]:
        """The node's recent signed ops (at most model.MAX_OPS_KEPT), oldest first."""
        ...
