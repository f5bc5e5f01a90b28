"""The hub's storage seam: one Protocol, implemented by SqliteStore and PostgresStore."""

from __future__ import annotations

from typing import Protocol

from hub.store.model import Entry, GuestRow, NodeReport, NodeState, OpRow, Recorded, StateIn, Version


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

    def schema_version(self) -> int:
        """The schema step the database is at (hub.store.schema's migrations)."""
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
