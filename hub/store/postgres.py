"""PostgresStore: the store for a hub that must outlive its machine; several replicas share one database."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
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
from hub.store.schema import POSTGRES, POSTGRES_MIGRATION_LOCK, POSTGRES_SCHEMA_VERSION

log = structlog.get_logger("hub.store")

CHANNEL = "hub_versions"  # NOTIFY'd in each append's transaction, payload the cluster: delivered on commit
POOL_WAIT = 30.0  # seconds a call waits for a free connection before it gives up
CONNECT_TIMEOUT = 5  # seconds to reach the server

_DOCUMENT = "SELECT cluster, version, envelope, sha256, author, message, created_at FROM documents"
_ENTRY = "SELECT cluster, version, sha256, octet_length(envelope), author, message, created_at FROM documents"
_REPORT = "SELECT cluster, node, held, version, ok, reason, last_seen FROM acks"
_DELIVERY = ("SELECT seq, delivery_id, cluster, node, envelope, op_id, kind, state, reason, detail, submitted_at, "
             "op_report FROM deliveries")

Conn = psycopg.Connection[tuple[Any, ...]]
# The database's clock stamps reports, so replicas agree on a node's age; the node's row is locked for the delta.
DIALECT = states.Dialect("%s", lambda: ("now()", ()), lambda value: value, lock=" FOR UPDATE")
_T = TypeVar("_T")


def migrate(conn: Conn, upto: int | None = None) -> tuple[int, int]:
    """Run the steps the database lacks (up to step ``upto``, None: all) in one transaction.

    An advisory lock held to the end makes replicas that start together migrate one after the other.
    Returns (version before, version after). ``conn`` must be in autocommit mode.
    """
    target = len(POSTGRES) if upto is None else upto
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (POSTGRES_MIGRATION_LOCK,))
        conn.execute(POSTGRES_SCHEMA_VERSION)
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        found = int(row[0]) if row else 0
        if found > len(POSTGRES):
            raise SchemaTooNewError(found, len(POSTGRES))
        for step in POSTGRES[found:target]:
            for statement in step.statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                         (step.number, step.description))
    return found, max(found, target)


def _version(row: Any) -> Version:
    return Version(cluster=row[0], version=row[1], envelope=bytes(row[2]), sha256=row[3], author=row[4],
                   message=row[5], created_at=row[6])


def _entry(row: Any) -> Entry:
    return Entry(cluster=row[0], version=row[1], sha256=row[2], size=row[3], author=row[4], message=row[5],
                 created_at=row[6])


def _report(row: Any) -> NodeReport:
    return NodeReport(cluster=row[0], node=row[1], held=row[2], version=row[3], ok=row[4], reason=row[5],
                      last_seen=row[6])


def _delivery(row: Any) -> Delivery:
    return Delivery(seq=row[0], delivery_id=row[1], cluster=row[2], node=row[3], envelope=bytes(row[4]), op_id=row[5],
                    kind=row[6], state=row[7], reason=row[8], detail=row[9], submitted_at=row[10],
                    op_report=bytes(row[11]))


class _Pool:
    """At most ``size`` autocommit connections, made when first needed; a broken one is dropped."""

    def __init__(self, conninfo: str, size: int) -> None:
        self._conninfo = conninfo
        self._free = threading.BoundedSemaphore(size)
        self._idle: list[Conn] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        """A connection for the block: an idle one, or a new one while fewer than ``size`` are out."""
        if self._closed:
            raise StoreError("the store is closed")
        if not self._free.acquire(timeout=POOL_WAIT):
            raise StoreError(f"no database connection free after {POOL_WAIT:.0f} s")
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                try:
                    conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
                except psycopg.OperationalError as error:
                    raise StoreUnavailableError(f"cannot reach the database: {error}") from error
            try:
                yield conn
            except psycopg.OperationalError as error:
                # A restarted server, a dropped connection: this one is dropped below, the next call reconnects.
                raise StoreUnavailableError(f"the database failed during the call: {error}") from error
            finally:
                if conn.closed or conn.broken or self._closed:
                    conn.close()
                else:
                    with self._lock:
                        self._idle.append(conn)
        finally:
            self._free.release()

    def close(self) -> None:
        """Close the idle connections; the ones out are closed when returned."""
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresStore:
    """The Store on PostgreSQL (psycopg 3): a row lock per cluster orders appends; LISTEN/NOTIFY wakes waiters.

    Every replica's waiters are woken by an append on any replica: each store holds one listening
    connection (reconnected with backoff if lost, waking every waiter to re-check, since a
    notification may have been missed). ``race_window`` (tests only) sleeps between reading the
    head and writing, to widen races.
    """

    def __init__(self, conninfo: str, *, pool_size: int = 4, max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE,
                 race_window: float = 0.0) -> None:
        self.max_envelope_bytes = max_envelope_bytes
        self._conninfo = conninfo
        self._race_window = race_window
        self._pool = _Pool(conninfo, pool_size)
        self._closed = threading.Event()
        try:
            with self._pool.connection() as conn:
                before, after = migrate(conn)
        except BaseException:
            self._pool.close()
            raise
        if before != after:
            log.info("hub.store.migrated", store="postgres", schema_from=before, schema_to=after)
        self._bell = Bell()
        self._stop_channel = f"hub_stop_{uuid.uuid4().hex}"
        self._listening = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="hub-store-listen", daemon=True)
        self._listener.start()
        # Waiters that start after the constructor must not miss an append: wait for LISTEN to be in place.
        self._listening.wait(timeout=10)

    def _listen(self) -> None:
        """Ring the bell of each cluster NOTIFY'd; reconnect with backoff when the connection is lost."""
        backoff = 0.1
        while not self._closed.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    conn.execute(f"LISTEN {self._stop_channel}")
                    self._bell.ring()  # whatever was appended while nobody listened: look again
                    self._listening.set()
                    backoff = 0.1
                    self._relay(conn)
            except psycopg.Error as error:
                if self._closed.is_set():
                    return
                log.warning("hub.store.listen_lost", error=str(error), retry_in=backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _relay(self, conn: Conn) -> None:
        while not self._closed.is_set():
            for note in conn.notifies(timeout=5.0):
                if note.channel == self._stop_channel:
                    return
                self._bell.ring(note.payload)

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
        with self._pool.connection() as conn, conn.transaction():
            # The head row is the lock: a concurrent append of this cluster waits here, then reads the new head.
            conn.execute("INSERT INTO heads (cluster, latest) VALUES (%s, 0) ON CONFLICT (cluster) DO NOTHING",
                         (cluster,))
            row = conn.execute("SELECT latest FROM heads WHERE cluster = %s FOR UPDATE", (cluster,)).fetchone()
            current = int(row[0]) if row else 0
            if current != expected_version:
                log.info("hub.store.conflict", cluster=cluster, expected=expected_version, current=current)
                raise VersionConflict(cluster, expected_version, current)
            if self._race_window:
                time.sleep(self._race_window)
            version = current + 1
            stamp = conn.execute(
                "INSERT INTO documents (cluster, version, envelope, sha256, author, message) "
                "VALUES (%s, %s, %s, %s, %s, %s) RETURNING created_at",
                (cluster, version, data, digest, author, message)).fetchone()
            conn.execute("UPDATE heads SET latest = %s WHERE cluster = %s", (version, cluster))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, cluster))
        self._bell.ring(cluster)
        log.info("hub.store.appended", cluster=cluster, version=version, sha256=digest, size=len(data), author=author)
        assert stamp is not None  # RETURNING of an INSERT that succeeded
        return Version(cluster, version, data, digest, author, message, stamp[0])

    def _one(self, query: str, params: tuple[Any, ...], *, binary: bool = False) -> Any:
        return self._read(lambda conn: conn.execute(query, params, binary=binary).fetchone())

    def _all(self, query: str, params: tuple[Any, ...]) -> list[Any]:
        return self._read(lambda conn: conn.execute(query, params).fetchall())

    def _read(self, call: Callable[[Conn], _T]) -> _T:
        """``call`` on a pooled connection; once more on a fresh one if the first was dead (a restarted server).

        Only reads and idempotent writes come here: an append is never run twice.
        """
        try:
            with self._pool.connection() as conn:
                return call(conn)
        except StoreUnavailableError:
            with self._pool.connection() as conn:
                return call(conn)

    def latest(self, cluster: str) -> int:
        """The cluster's latest version (0: none yet)."""
        row = self._one("SELECT latest FROM heads WHERE cluster = %s", (model.check_name("cluster", cluster),))
        return int(row[0]) if row else 0

    def get(self, cluster: str, version: int | None = None) -> Version | None:
        """A version of the cluster's document (None: the latest), or None if there is none."""
        model.check_name("cluster", cluster)
        if version is None:
            version = self.latest(cluster)
            if not version:
                return None
        model.check_version("version", version, least=1)
        # Binary results: the envelope comes as its bytes, not twice their size in hex.
        row = self._one(f"{_DOCUMENT} WHERE cluster = %s AND version = %s", (cluster, version), binary=True)
        return _version(row) if row else None

    def history(self, cluster: str, limit: int = 20, before: int | None = None) -> list[Entry]:
        """Up to ``limit`` versions older than ``before``, newest first, without envelopes."""
        model.check_name("cluster", cluster)
        model.check_page(limit, before)
        rows = self._all(f"{_ENTRY} WHERE cluster = %s AND version < %s ORDER BY version DESC LIMIT %s",
                         (cluster, before if before is not None else 2**62, limit))
        return [_entry(row) for row in rows]

    def clusters(self) -> list[str]:
        """Every cluster with a version, an ACK/NACK or a StateReport, by name."""
        rows = self._all("SELECT cluster FROM heads UNION SELECT cluster FROM acks UNION "
                                    "SELECT cluster FROM node_states ORDER BY cluster", ())
        return [str(row[0]) for row in rows]

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
        row = self._one(
            f"INSERT INTO acks (cluster, node, held, version, ok, reason, last_seen) "
            f"VALUES (%s, %s, %s, %s, %s, %s, now()) ON CONFLICT (cluster, node) DO UPDATE SET "
            f"held = CASE WHEN excluded.ok THEN excluded.version ELSE acks.held END, "
            f"version = excluded.version, ok = excluded.ok, reason = excluded.reason, last_seen = excluded.last_seen "
            f"RETURNING {_REPORT.removeprefix('SELECT ').removesuffix(' FROM acks')}",
            (cluster, node, version if ok else 0, version, ok, reason))
        log.info("hub.store.report", cluster=cluster, node=node, version=version, ok=ok)
        return _report(row)

    def nodes(self, cluster: str) -> list[NodeReport]:
        """Every node's last report for the cluster, by node name."""
        rows = self._all(f"{_REPORT} WHERE cluster = %s ORDER BY node", (model.check_name("cluster", cluster),))
        return [_report(row) for row in rows]

    def wait_for_change(self, cluster: str, after_version: int, timeout: float) -> bool:
        """Block until the latest version is past ``after_version`` (True) or ``timeout`` s pass (False)."""
        model.check_name("cluster", cluster)
        model.check_version("after_version", after_version)
        seconds = model.check_timeout(timeout)
        return self._bell.wait(cluster, lambda: not self._closed.is_set() and self.latest(cluster) > after_version,
                               seconds)

    # --- deliveries: approvals through the hub (migration 4) -------------------------------------------------------

    def record_audience(self, cluster: str, node: str, audience: str) -> None:
        """Record the audience ``node`` says its signed ops name."""
        model.check_name("cluster", cluster)
        model.check_name("node", node)
        model.check_audience(audience)
        row = self._one("SELECT audience FROM audiences WHERE cluster = %s AND node = %s", (cluster, node))
        if row is not None and row[0] == audience:
            return  # said again on every report and stream: no write when it has not changed
        self._read(lambda conn: conn.execute(
            "INSERT INTO audiences (cluster, node, audience) VALUES (%s, %s, %s) ON CONFLICT (cluster, node) "
            "DO UPDATE SET audience = excluded.audience, updated_at = now()", (cluster, node, audience)))

    def node_for_audience(self, cluster: str, audience: str) -> str | None:
        """The node named ``audience`` if it reported; else the node that last said it answers to it; or None.

        The name comes first: another node claiming that audience (without mutual TLS, claims are unchecked) never
        takes a node's own envelopes."""
        model.check_name("cluster", cluster)
        model.check_audience(audience)
        row = self._one("SELECT node FROM acks WHERE cluster = %s AND node = %s UNION SELECT node FROM audiences "
                        "WHERE cluster = %s AND node = %s", (cluster, audience, cluster, audience))
        if row is None:
            row = self._one("SELECT node FROM audiences WHERE cluster = %s AND audience = %s "
                            "ORDER BY updated_at DESC, node LIMIT 1", (cluster, audience))
        return str(row[0]) if row else None

    def add_delivery(self, cluster: str, node: str, envelope: bytes, op_id: str, kind: str) -> Delivery:
        """Queue ``envelope`` for ``node`` under a new delivery id; NOTIFY wakes every replica's feed."""
        model.check_name("cluster", cluster)
        model.check_name("node", node)
        data = model.check_op_envelope(envelope)
        if op_id:
            model.check_delivery_id(op_id, "op_id")
        model.check_text("kind", kind, required=True)
        delivery_id = uuid.uuid4().hex
        with self._pool.connection() as conn, conn.transaction():  # never retried: it is not idempotent
            row = conn.execute("INSERT INTO deliveries (delivery_id, cluster, node, envelope, op_id, kind, state) "
                               "VALUES (%s, %s, %s, %s, %s, %s, 'queued') RETURNING seq, submitted_at",
                               (delivery_id, cluster, node, data, op_id, kind)).fetchone()
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, cluster))  # a ring means "look again"
        self._bell.ring(cluster)
        assert row is not None
        log.info("hub.store.delivery_queued", cluster=cluster, node=node, delivery_id=delivery_id, op_id=op_id,
                 op_kind=kind)
        return Delivery(int(row[0]), delivery_id, cluster, node, data, op_id, kind, "queued", "", "", row[1])

    def open_deliveries(self, cluster: str, node: str) -> list[Delivery]:
        """The node's deliveries without a verdict, oldest first."""
        model.check_name("cluster", cluster)
        model.check_name("node", node)
        rows = self._all(f"{_DELIVERY} WHERE cluster = %s AND node = %s AND state IN (%s, %s) ORDER BY seq",
                         (cluster, node, *model.OPEN_STATES))
        return [_delivery(row) for row in rows]

    def deliveries_after(self, cluster: str, seq: int) -> list[Delivery]:
        """The cluster's deliveries numbered past ``seq``, oldest first."""
        model.check_name("cluster", cluster)
        model.check_version("seq", seq)
        rows = self._all(f"{_DELIVERY} WHERE cluster = %s AND seq > %s ORDER BY seq LIMIT %s",
                         (cluster, seq, model.MAX_DELIVERIES))
        return [_delivery(row) for row in rows]

    def delivery_head(self, cluster: str) -> int:
        """The cluster's last delivery number (0: none)."""
        row = self._one("SELECT COALESCE(MAX(seq), 0) FROM deliveries WHERE cluster = %s",
                        (model.check_name("cluster", cluster),))
        return int(row[0])

    def mark_delivered(self, delivery_id: str) -> None:
        """A queued delivery was sent on its node's stream."""
        model.check_delivery_id(delivery_id)
        self._read(lambda conn: conn.execute(
            "UPDATE deliveries SET state = 'delivered' WHERE delivery_id = %s AND state = 'queued'", (delivery_id,)))

    def record_verdict(self, cluster: str, node: str, delivery_id: str, decision: str, *, op_id: str = "",
                       reason: str = "", detail: str = "") -> bool:
        """The node's first verdict on its delivery (see Store.record_verdict); idempotent, so retried once."""
        model.check_name("cluster", cluster)
        model.check_name("node", node)
        model.check_delivery_id(delivery_id)
        model.check_verdict(decision, op_id, reason, detail)
        count = self._read(lambda conn: conn.execute(
            "UPDATE deliveries SET state = %s, reason = %s, detail = %s, decided_at = now(), "
            "op_id = CASE WHEN %s <> '' THEN %s ELSE op_id END "
            "WHERE delivery_id = %s AND cluster = %s AND node = %s AND state IN (%s, %s)",
            (decision, reason, detail, op_id, op_id, delivery_id, cluster, node, *model.OPEN_STATES)).rowcount)
        log.info("hub.store.verdict", cluster=cluster, node=node, delivery_id=delivery_id, decision=decision,
                 recorded=count == 1)
        return count == 1

    def record_op_reports(self, cluster: str, node: str, reports: list[tuple[str, bytes]]) -> int:
        """Each op's latest fate on every delivery of it to ``node``, in one transaction (see Store)."""
        model.check_name("cluster", cluster)
        model.check_name("node", node)
        for op_id, _ in reports:
            model.check_delivery_id(op_id, "op_id")
        routed = {row[0] for row in self._all("SELECT DISTINCT op_id FROM deliveries WHERE cluster = %s AND node = %s",
                                              (cluster, node))}
        wanted = [(op_id, body) for op_id, body in reports if op_id in routed]
        if not wanted:
            return 0

        def write(conn: Conn) -> int:
            with conn.transaction():
                return sum(int(conn.execute("UPDATE deliveries SET op_report = %s WHERE cluster = %s AND node = %s "
                                            "AND op_id = %s", (bytes(body), cluster, node, op_id)).rowcount)
                           for op_id, body in wanted)
        return self._read(write)  # idempotent: the same fates again

    def deliveries(self, cluster: str, ident: str | None = None, limit: int = 20) -> list[Delivery]:
        """Deliveries by delivery id or op id, or the ``limit`` most recent; oldest first."""
        model.check_name("cluster", cluster)
        if ident is not None:
            model.check_delivery_id(ident, "id")
            rows = self._all(f"{_DELIVERY} WHERE cluster = %s AND (delivery_id = %s OR op_id = %s) ORDER BY seq "
                             "LIMIT %s", (cluster, ident, ident, model.MAX_DELIVERIES))
            return [_delivery(row) for row in rows]
        model.check_version("limit", limit, least=1)
        rows = self._all(f"{_DELIVERY} WHERE cluster = %s ORDER BY seq DESC LIMIT %s",
                         (cluster, min(limit, model.MAX_DELIVERIES)))
        return [_delivery(row) for row in reversed(rows)]

    def wait_for_deliveries(self, cluster: str, after_seq: int, timeout: float) -> bool:
        """Block until the cluster has a delivery past ``after_seq`` (True) or ``timeout`` s pass (False)."""
        model.check_name("cluster", cluster)
        model.check_version("after_seq", after_seq)
        seconds = model.check_timeout(timeout)
        return self._bell.wait(cluster, lambda: not self._closed.is_set() and self.delivery_head(cluster) > after_seq,
                               seconds)

    def schema_version(self) -> int:
        """The schema step the database is at."""
        return int(self._one("SELECT MAX(version) FROM schema_version", ())[0])

    # -- last seen (Watch activity) --------------------------------------------------------------------------------

    def record_seen(self, cluster: str, seen: Mapping[str, float]) -> None:
        """Move each node's last_seen to its time in ``seen`` (never back), in one transaction (see Store).

        Idempotent, so it may be tried again on a fresh connection.
        """
        rows = model.check_seen(cluster, seen)
        if not rows:
            return

        def write(conn: Conn) -> None:
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO acks (cluster, node, held, version, ok, reason, last_seen) "
                    "VALUES (%s, %s, 0, 0, false, '', to_timestamp(%s)) ON CONFLICT (cluster, node) DO UPDATE SET "
                    "last_seen = GREATEST(acks.last_seen, excluded.last_seen)",
                    [(cluster, node, at) for node, at in rows])
        self._read(write)

    def close(self) -> None:
        """Stop listening, close every connection and wake every waiter (they return False)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._bell.close()
        try:
            with self._pool.connection() as conn:
                conn.execute("SELECT pg_notify(%s, '')", (self._stop_channel,))
        except (psycopg.Error, StoreError):
            pass  # the listener then stops at its next 5 s timeout
        self._listener.join(timeout=6)
        self._pool.close()

    # --- the fleet view (hub.store.states) ----------------------------------------------------------------------

    def record_state(self, report: StateIn) -> Recorded:
        """Record a node's StateReport (see Store.record_state) in one transaction that locks the node's row."""
        with self._pool.connection() as conn, conn.transaction():
            recorded = states.record(conn, DIALECT, report)
        log.debug("hub.store.state", cluster=report.cluster, node=report.node, seq=report.seq, full=report.full,
                  applied=recorded.applied)
        return recorded

    def node_states(self, cluster: str | None = None) -> list[NodeState]:
        """Every node's last StateReport with its guests counted by state."""
        return self._read(lambda conn: states.node_states(conn, DIALECT, cluster))

    def guests(self, cluster: str, node: str | None = None, *, pending_only: bool = False) -> list[GuestRow]:
        """The guests as last reported, by node then vmid."""
        return self._read(lambda conn: states.guests(conn, DIALECT, cluster, node, pending_only))

    def ops(self, cluster: str, node: str) -> list[OpRow]:
        """The node's recent signed ops, oldest first."""
        return self._read(lambda conn: states.ops(conn, DIALECT, cluster, node))
