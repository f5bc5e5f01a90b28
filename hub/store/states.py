"""The fleet view's SQL, shared by both stores: each node's last StateReport, its guests and its recent signed ops.

The statements are written once with ``?`` placeholders; PostgreSQL's store has them as ``%s`` (``dialect``).
Both drivers' connections take ``execute(sql, params)`` and their cursors ``executemany``, so one function records
a report on either, inside the caller's write transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction
whose first statement locks the node's row).

A delta applies only on top of the report the store holds: the same session (one executor process) and
``base_seq`` equal to the seq recorded. Anything else (another session, a gap, a report the store never got, a
node it never heard from) is not applied and the node is told to send a full report: a delta never lands on a
state it was not computed against. The session and seq live in the database, so a restarted hub (or another
replica) applies the next delta of a node whose last report it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from hub.store.model import MAX_OPS_KEPT, GuestRow, NodeState, OpRow, Recorded, StateIn, check_name, check_state

_NODE = ("SELECT cluster, node, audience, session, seq, received, at_ms, interval_s, held_version, tick_outcome, "
         "tick_error FROM node_states")
_COUNTS = "SELECT cluster, node, state, COUNT(*), COALESCE(SUM(pending), 0) FROM node_guests"
_GUEST = "SELECT node, vmid, state, pending, body FROM node_guests"
_OP = "SELECT op_id, payload_sha256, fate, at_ms, body FROM node_ops"


class Conn(Protocol):
    """What both drivers' connections offer: ``execute`` and a cursor with ``executemany``."""

    def execute(self, query: Any, params: Any = ...) -> Any:
        """Run one statement."""

    def cursor(self) -> Any:
        """A cursor (for executemany)."""


class Dialect:
    """How one database spells a placeholder, the time of a write, and a stored time."""

    def __init__(self, placeholder: str, now: Callable[[], tuple[str, tuple[Any, ...]]],
                 to_time: Callable[[Any], datetime], lock: str = "") -> None:
        self.placeholder, self.now, self.to_time, self.lock = placeholder, now, to_time, lock

    def sql(self, query: str) -> str:
        """``query`` with this database's placeholders."""
        return query if self.placeholder == "?" else query.replace("?", self.placeholder)


def record(conn: Conn, dialect: Dialect, report: StateIn) -> Recorded:
    """Record ``report`` in the caller's transaction (see the module's docstring); the store's seq after it."""
    check_state(report)
    q = dialect.sql
    key = (report.cluster, report.node)
    row = conn.execute(q(f"SELECT session, seq FROM node_states WHERE cluster = ? AND node = ?{dialect.lock}"),
                       key).fetchone()
    if not report.full and (row is None or row[0] != report.session or int(row[1]) != report.base_seq):
        return Recorded(applied=False, seq=int(row[1]) if row is not None else 0)
    if report.full:
        conn.execute(q("DELETE FROM node_guests WHERE cluster = ? AND node = ?"), key)
        conn.execute(q("DELETE FROM node_ops WHERE cluster = ? AND node = ?"), key)
    elif report.removed:
        conn.cursor().executemany(q("DELETE FROM node_guests WHERE cluster = ? AND node = ? AND vmid = ?"),
                                  [(*key, vmid) for vmid in report.removed])
    if report.guests:
        conn.cursor().executemany(
            q("INSERT INTO node_guests (cluster, node, vmid, state, pending, body) VALUES (?, ?, ?, ?, ?, ?) "
              "ON CONFLICT (cluster, node, vmid) DO UPDATE SET state = excluded.state, pending = excluded.pending, "
              "body = excluded.body"),
            [(*key, g.vmid, g.state, g.pending, g.body) for g in report.guests])
    if report.ops:
        conn.cursor().executemany(
            q("INSERT INTO node_ops (cluster, node, op_id, payload_sha256, fate, at_ms, body) "
              "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (cluster, node, op_id, payload_sha256) DO UPDATE SET "
              "fate = excluded.fate, at_ms = excluded.at_ms, body = excluded.body"),
            [(*key, o.op_id, o.payload_sha256, o.fate, o.at_ms, o.body) for o in report.ops])
        conn.execute(q("DELETE FROM node_ops WHERE cluster = ? AND node = ? AND (op_id, payload_sha256) NOT IN "
                       "(SELECT op_id, payload_sha256 FROM node_ops WHERE cluster = ? AND node = ? "
                       "ORDER BY at_ms DESC, op_id DESC LIMIT ?)"), (*key, *key, MAX_OPS_KEPT))
    now_sql, now_params = dialect.now()
    conn.execute(
        q(f"INSERT INTO node_states (cluster, node, audience, session, seq, received, at_ms, interval_s, "
          f"held_version, tick_outcome, tick_error) VALUES (?, ?, ?, ?, ?, {now_sql}, ?, ?, ?, ?, ?) "
          "ON CONFLICT (cluster, node) DO UPDATE SET audience = excluded.audience, session = excluded.session, "
          "seq = excluded.seq, received = excluded.received, at_ms = excluded.at_ms, interval_s = excluded.interval_s, "
          "held_version = excluded.held_version, tick_outcome = excluded.tick_outcome, "
          "tick_error = excluded.tick_error"),
        (*key, report.audience, report.session, report.seq, *now_params, report.at_ms, float(report.interval),
         report.held_version, report.tick_outcome, report.tick_error))
    return Recorded(applied=True, seq=report.seq)


def node_states(conn: Conn, dialect: Dialect, cluster: str | None) -> list[NodeState]:
    """Every node's last report (of ``cluster``; None: of every cluster), by cluster then node."""
    where, params = ("WHERE cluster = ?", (check_name("cluster", cluster),)) if cluster is not None else ("", ())
    counts: dict[tuple[str, str], tuple[dict[str, int], int]] = {}
    for c, node, state, count, pending in conn.execute(dialect.sql(f"{_COUNTS} {where} GROUP BY cluster, node, state"),
                                                       params).fetchall():
        found = counts.setdefault((c, node), ({}, 0))
        found[0][state] = int(count)
        counts[(c, node)] = (found[0], found[1] + int(pending))
    rows = conn.execute(dialect.sql(f"{_NODE} {where} ORDER BY cluster, node"), params).fetchall()
    return [NodeState(cluster=r[0], node=r[1], audience=r[2], session=r[3], seq=int(r[4]),
                      received=dialect.to_time(r[5]), at_ms=int(r[6]), interval=float(r[7]), held_version=int(r[8]),
                      tick_outcome=r[9], tick_error=r[10], counts=counts.get((r[0], r[1]), ({}, 0))[0],
                      pending=counts.get((r[0], r[1]), ({}, 0))[1]) for r in rows]


def guests(conn: Conn, dialect: Dialect, cluster: str, node: str | None, pending_only: bool) -> list[GuestRow]:
    """The guests last reported (by ``node``, None: every node), by node then vmid; only those with approvals
    waiting when ``pending_only``."""
    where, params = "WHERE cluster = ?", [check_name("cluster", cluster)]
    if node is not None:
        where, params = f"{where} AND node = ?", [*params, check_name("node", node)]
    if pending_only:
        where = f"{where} AND pending > 0"
    rows = conn.execute(dialect.sql(f"{_GUEST} {where} ORDER BY node, vmid"), tuple(params)).fetchall()
    return [GuestRow(node=r[0], vmid=int(r[1]), state=r[2], pending=int(r[3]), body=bytes(r[4])) for r in rows]


def ops(conn: Conn, dialect: Dialect, cluster: str, node: str) -> list[OpRow]:
    """The node's recent signed ops, oldest first."""
    rows = conn.execute(dialect.sql(f"{_OP} WHERE cluster = ? AND node = ? ORDER BY at_ms, op_id"),
                        (check_name("cluster", cluster), check_name("node", node))).fetchall()
    return [OpRow(op_id=r[0], payload_sha256=r[1], fate=r[2], at_ms=int(r[3]), body=bytes(r[4])) for r in rows]
