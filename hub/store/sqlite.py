"""SqliteStore: the embedded store, one SQLite file (WAL) in the hub's state directory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from hub.store import model, states
from hub.store.bell import Bell
from hub.store.model import (
    DEFAULT_MAX_ENVELOPE,
    Delivery,
    DocumentTooLarge,
    Entry,
    GuestRow,
    NodeReport,
    NodeState,
    OpRow,
    Recorded,
    SchemaTooNewError,
    StateIn,
    StoreError,
    StoreUnavailableError,
    UnknownVersionError,
    Version,
    VersionConflict,
)
from hub.store.schema import SQLITE, SQLITE_SCHEMA_VERSION

log = structlog.get_logger("hub.store")

FILENAME = "hub.sqlite3"
BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another process's write to finish

_DOCUMENT = "SELECT cluster, version, envelope, sha256, author, message, created_at FROM documents"
_ENTRY = "SELECT cluster, version, sha256, length(envelope), author, message, created_at FROM documents"
_REPORT = "SELECT cluster, node, held, version, ok, reason, last_seen FROM acks"
_DELIVERY = ("SELECT seq, delivery_id, cluster, node, envelope, op_id, kind, state, reason, detail, submitted_at, "
             "op_report FROM deliveries")


def migrate(conn: sqlite3.Connection, upto: int | None = None) -> tuple[int, int]:
    """Run the steps the database lacks (up to step ``upto``, None: all) in one write transaction.

    Returns (version before, version after). ``conn`` must be in autocommit mode.
    """
    target = len(SQLITE) if upto is None else upto
    with _write(conn):
        conn.execute(SQLITE_SCHEMA_VERSION)
        found = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
        if found > len(SQLITE):
            raise SchemaTooNewError(found, len(SQLITE))
        for step in SQLITE[found:target]:
            for statement in step.statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                         (step.number, step.description, time.time()))
    return found, max(found, target)


@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that holds the database's write lock from its first statement.

    BEGIN IMMEDIATE is what makes append's read-compare-insert atomic across threads and processes:
    a second writer waits (busy_timeout) for the first to commit, then reads the new head.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:  # another writer held the lock past busy_timeout, a disk error
        raise StoreUnavailableError(f"cannot write to the database: {error}") from error
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.OperationalError as error:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")  # leave the connection usable: not inside a failed transaction
        raise StoreUnavailableError(f"the database failed to commit: {error}") from error


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _version(row: Any) -> Version:
    return Version(cluster=row[0], version=row[1], envelope=bytes(row[2]), sha256=row[3], author=row[4],
                   message=row[5], created_at=_time(row[6]))


def _entry(row: Any) -> Entry:
    return Entry(cluster=row[0], version=row[1], sha256=row[2], size=row[3], author=row[4], message=row[5],
                 created_at=_time(row[6]))


def _report(row: Any) -> NodeReport:
    return NodeReport(cluster=row[0], node=row[1], held=row[2], version=row[3], ok=bool(row[4]), reason=row[5],
                      last_seen=_time(row[6]))


def _delivery(row: Any) -> Delivery:
    return Delivery(seq=row[0], delivery_id=row[1], cluster=row[2], node=row[3], envelope=bytes(row[4]), op_id=row[5],
                    kind=row[6], state=row[7], reason=row[8], detail=row[9], submitted_at=_time(row[10]),
                    op_report=bytes(row[11]))


DIALECT = states.Dialect("?", lambda: ("?", (time.time(),)), lambda value: _time(float(value)))


def _wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL; retried, as SQLite answers "database is locked" at once (no busy handler) while
    another connection opening the same new file switches it too (replicas starting together)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SqliteStore:
    """The Store on one SQLite file: WAL, a connection per thread, full fsync on commit.

    Waiters are woken at once by appends through this object, and within ``poll_interval`` s by
    appends from other objects or processes (one ``PRAGMA data_version`` per interval, however many
    wait). ``race_window`` (tests only) sleeps between reading the head and writing, to widen races.
    """

    def __init__(self, path: Path | str, *, max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE,
                 poll_interval: float = 0.25, race_window: float = 0.0) -> None:
        self.path = Path(path)
        self.max_envelope_bytes = max_envelope_bytes
        self._race_window = race_window
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        self._bell = Bell(self._poll, poll_interval)
        if not self.path.exists():
            # The documents are signed, not secret, but the reports and authors are the operator's business.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        try:
            conn = self._conn()
            _wal(conn)
            before, after = migrate(conn)
        except BaseException:
            self.close()
            raise
        if before != after:
            log.info("hub.store.migrated", store="sqlite", path=str(self.path), schema_from=before, schema_to=after)
        self._poller = self._connect()
        self._data_version = self._read_data_version()

    @classmethod
    def in_dir(cls, state_dir: Path | str, **options: Any) -> SqliteStore:
        """The store in ``state_dir`` (created 0700 if missing), file ``hub.sqlite3``."""
        directory = Path(state_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(directory / FILENAME, **options)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=FULL")  # a committed version survives a power cut
        with self._lock:
            self._conns.append(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are not shared between threads here)."""
        if self._closed:
            raise StoreError("the store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _read_data_version(self) -> int:
        return int(self._poller.execute("PRAGMA data_version").fetchone()[0])

    def _poll(self) -> bool:
        """True if another connection committed since the last poll (SQLite's data_version moved)."""
        if self._closed:
            return False
        current = self._read_data_version()
        moved, self._data_version = current != self._data_version, current
        return moved

    def _head(self, conn: sqlite3.Connection, cluster: str) -> int:
        row = conn.execute("SELECT latest FROM heads WHERE cluster = ?", (cluster,)).fetchone()
        return int(row[0]) if row else 0

    def append(self, cluster: str, expected_version: int, envelope: bytes, author: str, message: str) -> Version:
        """Store ``envelope`` as the next version if ``expected_version`` is the latest (see Store.append)."""
        model.check_name("cluster", cluster)
        model.check_version("expected_version", expected_version)
        data = model.check_envelope(envelope)
        model.check_text("author", author, required=True)
        model.check_text("message", message, required=False)
        if len(data) > self.max_envelope_bytes:
            log.warning("hub.store.too_large", cluster=cluster, size=len(data), limit=self.max_envelope_bytes)
            raise DocumentTooLarge(cluster, len(data), self.max_envelope_bytes)
        digest = hashlib.sha256(data).hexdigest()
        conn = self._conn()
        with _write(conn):
            current = self._head(conn, cluster)
            if current != expected_version:
                log.info("hub.store.conflict", cluster=cluster, expected=expected_version, current=current)
                raise VersionConflict(cluster, expected_version, current)
            if self._race_window:
                time.sleep(self._race_window)
            version, now = current + 1, time.time()
            conn.execute("INSERT INTO documents (cluster, version, envelope, sha256, author, message, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (cluster, version, data, digest, author, message, now))
            conn.execute("INSERT INTO heads (cluster, latest) VALUES (?, ?) "
                         "ON CONFLICT (cluster) DO UPDATE SET latest = excluded.latest", (cluster, version))
        self._bell.ring(cluster)
        log.info("hub.store.appended", cluster=cluster, version=version, sha256=digest, size=len(data), author=author)
        return Version(cluster, version, data, digest, author, message, _time(now))

    def latest(self, cluster: str) -> int:
        """The cluster's latest version (0: none yet)."""
        return self._head(self._conn(), model.check_name("cluster", cluster))

    def get(self, cluster: str, version: int | None = None) -> Version | None:
        """A version of the cluster's document (None: the latest), or None if there is none."""
        model.check_name("cluster", cluster)
        conn = self._conn()
        if version is None:
            version = self._head(conn, cluster)
            if not version:
                return None
        model.check_version("version", version, least=1)
        row = conn.execute(f"{_DOCUMENT} WHERE cluster = ? AND version = ?", (cluster, version)).fetchone()
        return _version(row) if row else None

    def history(self, cluster: str, limit: int = 20, before: int | None = None) -> list[Entry]:
        """Up to ``limit`` versions older than ``before``, newest first, without envelopes."""
        model.check_name("cluster", cluster)
        model.check_page(limit, before)
        rows = self._conn().execute(f"{_ENTRY} WHERE cluster = ? AND version < ? ORDER BY version DESC LIMIT ?",
                                    (cluster, before if before is not None else 2**62, limit)).fetchall()
        return [_entry(row) for row in rows]

    def clusters(self) -> list[str]:
        """Every cluster with a version, an ACK/NACK or a StateReport, by name."""
        rows = self._conn().execute("SELECT cluster FROM heads UNION SELECT cluster FROM acks UNION "
                                    "SELECT cluster FROM node_states ORDER BY cluster")
        return [str(row[0]) for row in rows.fetchall()]

    def since(self, cluster: str, version: int) -> Version | None:
        """The latest document if it is newer than ``version``, else None (see Store.since)."""
        model.check_name("cluster", cluster)
        model.check_version("version", version)
        latest = self.latest(cluster)
        if version > latest:
            raise UnknownVersionError(cluster, version, latest)
        return None if version == latest else self.get(cluster, latest)

    def record_ack(self, cluster: str, node: str, version: int, ok: bool, reason: str = "") -> NodeReport:
        """Record a node's ACK or NACK of ``version`` (a NACK keeps the version the node held)."""
        model.check_report(cluster, node, version, ok, reason)
        conn = self._conn()
        with _write(conn):
            conn.execute("INSERT INTO acks (cluster, node, held, version, ok, reason, last_seen) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (cluster, node) DO UPDATE SET "
                         "held = CASE WHEN excluded.ok THEN excluded.version ELSE acks.held END, "
                         "version = excluded.version, ok = excluded.ok, reason = excluded.reason, "
                         "last_seen = excluded.last_seen",
                         (cluster, node, version if ok else 0, version, int(ok), reason, time.time()))
            row = conn.execute(f"{_REPORT} WHERE cluster = ? AND node = ?", (cluster, node)).fetchone()
        log.info("hub.store.report", cluster=cluster, node=node, version=version, ok=ok)
        return _report(row)

    def nodes(self, cluster: str) -> list[NodeReport]:
        """Every node's last report for the cluster, by node name."""
        model.check_name("cluster", cluster)
        rows = self._conn().execute(f"{_REPORT} WHERE cluster = ? ORDER BY node", (cluster,)).fetchall()
        return [_report(row) for row in rows]

    def wait_for_change(self, cluster: str, after_version: int, timeout: float) -> bool:
        """Block until the latest version is past ``after_version`` (True) or ``timeout`` s pass (False)."""
        model.check_name("cluster", cluster)
        model.check_version("after_version", after_version)
        seconds = model.check_timeout(timeout)
        return self._bell.wait(cluster, lambda: not self._closed and self.latest(cluster) > after_version, seconds)

    # --- deliveries: approvals through the hub (migration 4) -------------------------------------------------------

    def record_audience(self, cluster: str, node: str, audience: str) -> None:
        """Record the audience ``node`` says its signed ops name."""
        model.check_name("cluster", cluster)
        model.check_name("node", node)
        model.check_audience(audience)
        conn = self._conn()
        row = conn.execute("SELECT audience FROM audiences WHERE cluster = ? AND node = ?", (cluster, node)).fetchone()
        if row is not None and row[0] == audience:
            return  # said again on every report and stream: no write (no fsync) when it has not changed
        with _write(conn):
            conn.execute("INSERT INTO audiences (cluster, node, audience, updated_at) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (cluster, node) DO UPDATE SET audience = excluded.audience, "
                         "updated_at = excluded.updated_at", (cluster, node, audience, time.time()))

    def node_for_audience(self, cluster: str, audience: str) -> str | None:
        """The node named ``audience`` if it reported; else the node that last said it answers to it; or None.

        The name comes first: another node claiming that audience (without mutual TLS, claims are unchecked) never
        takes a node's own envelopes."""
        model.check_name("cluster", cluster)
        model.check_audience(audience)
        conn = self._conn()
        row = conn.execute("SELECT node FROM acks WHERE cluster = ? AND node = ? UNION SELECT node FROM audiences "
                           "WHERE cluster = ? AND node = ?", (cluster, audience, cluster, audience)).fetchone()
        if row is None:
            row = conn.execute("SELECT node FROM audiences WHERE cluster = ? AND audience = ? "
                               "ORDER BY updated_at DESC, node LIMIT 1", (cluster, audience)).fetchone()
        return str(row[0]) if row else None

    def add_delivery(self, cluster: str, node: str, envelope: bytes, op_id: str, kind: str) -> Delivery:
        """Queue ``envelope`` for ``node`` under a new delivery id (see Store.add_delivery)."""
        model.check_name("cluster", cluster)
        model.check_name("node", node)
        data = model.check_op_envelope(envelope)
        if op_id:
            model.check_delivery_id(op_id, "op_id")
        model.check_text("kind", kind, required=True)
        delivery_id, now = uuid.uuid4().hex, time.time()
        with _write(self._conn()) as conn:
            cursor = conn.execute("INSERT INTO deliveries (delivery_id, cluster, node, envelope, op_id, kind, state, "
                                  "submitted_at) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
                                  (delivery_id, cluster, node, data, op_id, kind, now))
            seq = int(cursor.lastrowid or 0)
        self._bell.ring(cluster)
        log.info("hub.store.delivery_queued", cluster=cluster, node=node, delivery_id=delivery_id, op_id=op_id,
                 op_kind=kind)
        return Delivery(seq, delivery_id, cluster, node, data, op_id, kind, "queued", "", "", _time(now))

    def open_deliveries(self, cluster: str, node: str) -> list[Delivery]:
        """The node's deliveries without a verdict, oldest first."""
        model.check_name("cluster", cluster)
        model.check_name("node", node)
        rows = self._conn().execute(f"{_DELIVERY} WHERE cluster = ? AND node = ? AND state IN (?, ?) ORDER BY seq",
                                    (cluster, node, *model.OPEN_STATES)).fetchall()
        return [_delivery(row) for row in rows]

    def deliveries_after(self, cluster: str, seq: int) -> list[Delivery]:
        """The cluster's deliveries numbered past ``seq``, oldest first."""
        model.check_name("cluster", cluster)
        model.check_version("seq", seq)
        rows = self._conn().execute(f"{_DELIVERY} WHERE cluster = ? AND seq > ? ORDER BY seq LIMIT ?",
                                    (cluster, seq, model.MAX_DELIVERIES)).fetchall()
        return [_delivery(row) for row in rows]

    def delivery_head(self, cluster: str) -> int:
        """The cluster's last delivery number (0: none)."""
        model.check_name("cluster", cluster)
        row = self._conn().execute("SELECT COALESCE(MAX(seq), 0) FROM deliveries WHERE cluster = ?",
                                   (cluster,)).fetchone()
        return int(row[0])

    def mark_delivered(self, delivery_id: str) -> None:
        """A queued delivery was sent on its node's stream."""
        model.check_delivery_id(delivery_id)
        with _write(self._conn()) as conn:
            conn.execute("UPDATE deliveries SET state = 'delivered' WHERE delivery_id = ? AND state = 'queued'",
                         (delivery_id,))

    def record_verdict(self, cluster: str, node: str, delivery_id: str, decision: str, *, op_id: str = "",
                       reason: str = "", detail: str = "") -> bool:
        """The node's first verdict on its delivery (see Store.record_verdict)."""
        model.check_name("cluster", cluster)
        model.check_name("node", node)
        model.check_delivery_id(delivery_id)
        model.check_verdict(decision, op_id, reason, detail)
        with _write(self._conn()) as conn:
            cursor = conn.execute(
                "UPDATE deliveries SET state = ?, reason = ?, detail = ?, decided_at = ?, "
                "op_id = CASE WHEN ? <> '' THEN ? ELSE op_id END "
                "WHERE delivery_id = ? AND cluster = ? AND node = ? AND state IN (?, ?)",
                (decision, reason, detail, time.time(), op_id, op_id, delivery_id, cluster, node, *model.OPEN_STATES))
            recorded = cursor.rowcount == 1
        log.info("hub.store.verdict", cluster=cluster, node=node, delivery_id=delivery_id, decision=decision,
                 recorded=recorded)
        return recorded

    def record_op_reports(self, cluster: str, node: str, reports: list[tuple[str, bytes]]) -> int:
        """Each op's latest fate on every delivery of it to ``node``, in one transaction (see Store)."""
        model.check_name("cluster", cluster)
        model.check_name("node", node)
        for op_id, _ in reports:
            model.check_delivery_id(op_id, "op_id")
        conn = self._conn()
        routed = {row[0] for row in conn.execute("SELECT DISTINCT op_id FROM deliveries WHERE cluster = ? AND node = ?",
                                                 (cluster, node)).fetchall()}
        wanted = [(op_id, body) for op_id, body in reports if op_id in routed]
        if not wanted:  # a full report names many ops: no write (and no fsync) for those the hub never routed
            return 0
        with _write(conn):
            return sum(int(conn.execute("UPDATE deliveries SET op_report = ? WHERE cluster = ? AND node = ? AND "
                                        "op_id = ?", (bytes(body), cluster, node, op_id)).rowcount)
                       for op_id, body in wanted)

    def deliveries(self, cluster: str, ident: str | None = None, limit: int = 20) -> list[Delivery]:
        """Deliveries by delivery id or op id, or the ``limit`` most recent; oldest first."""
        model.check_name("cluster", cluster)
        if ident is not None:
            model.check_delivery_id(ident, "id")
            rows = self._conn().execute(f"{_DELIVERY} WHERE cluster = ? AND (delivery_id = ? OR op_id = ?) "
                                        "ORDER BY seq LIMIT ?", (cluster, ident, ident, model.MAX_DELIVERIES))
            return [_delivery(row) for row in rows.fetchall()]
        model.check_version("limit", limit, least=1)
        rows = self._conn().execute(f"{_DELIVERY} WHERE cluster = ? ORDER BY seq DESC LIMIT ?",
                                    (cluster, min(limit, model.MAX_DELIVERIES)))
        return [_delivery(row) for row in reversed(rows.fetchall())]

    def wait_for_deliveries(self, cluster: str, after_seq: int, timeout: float) -> bool:
        """Block until the cluster has a delivery past ``after_seq`` (True) or ``timeout`` s pass (False)."""
        model.check_name("cluster", cluster)
        model.check_version("after_seq", after_seq)
        seconds = model.check_timeout(timeout)
        return self._bell.wait(cluster, lambda: not self._closed and self.delivery_head(cluster) > after_seq, seconds)

    def schema_version(self) -> int:
        """The schema step the database is at."""
        return int(self._conn().execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    # -- last seen (Watch activity) --------------------------------------------------------------------------------

    def record_seen(self, cluster: str, seen: Mapping[str, float]) -> None:
        """Move each node's last_seen to its time in ``seen`` (never back), in one transaction (see Store)."""
        rows = model.check_seen(cluster, seen)
        if not rows:
            return
        conn = self._conn()
        with _write(conn):
            conn.executemany("INSERT INTO acks (cluster, node, held, version, ok, reason, last_seen) "
                             "VALUES (?, ?, 0, 0, 0, '', ?) ON CONFLICT (cluster, node) DO UPDATE SET "
                             "last_seen = MAX(acks.last_seen, excluded.last_seen)",
                             [(cluster, node, at) for node, at in rows])

    def close(self) -> None:
        """Close every connection and wake every waiter (they return False)."""
        self._closed = True
        self._bell.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()


    # --- the fleet view (hub.store.states) ----------------------------------------------------------------------

    def record_state(self, report: StateIn) -> Recorded:
        """Record a node's StateReport (see Store.record_state), under the database's write lock."""
        conn = self._conn()
        with _write(conn):
            recorded = states.record(conn, DIALECT, report)
        log.debug("hub.store.state", cluster=report.cluster, node=report.node, seq=report.seq, full=report.full,
                  applied=recorded.applied)
        return recorded

    def node_states(self, cluster: str | None = None) -> list[NodeState]:
        """Every node's last StateReport with its guests counted by state."""
        return states.node_states(self._conn(), DIALECT, cluster)

    def guests(self, cluster: str, node: str | None = None, *, pending_only: bool = False) -> list[GuestRow]:
        """The guests as last reported, by node then vmid."""
        return states.guests(self._conn(), DIALECT, cluster, node, pending_only)

    def ops(self, cluster: str, node: str) -> list[OpRow]:
        """The node's recent signed ops, oldest first."""
        return states.ops(self._conn(), DIALECT, cluster, node)
