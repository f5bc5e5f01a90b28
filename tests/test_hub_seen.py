"""A node's last-seen from Watch activity, kept in the store so every replica's Status shows it (SQLite, PostgreSQL).

A node that only watches (no ACK yet, or a node ahead of a restored hub) must not vanish from Status because the
operator asked another replica; the writes are batched per cluster, at most one per heartbeat.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hub.store import InvalidArgumentError, PostgresStore, SqliteStore, Store
from hub.v1 import hub_pb2 as pb
from tests.hub_helpers import CLUSTER, Hub, running_hub, watch
from tests.test_hub_provider import wait_for

HEARTBEAT = 0.1
_names = itertools.count()


@pytest.fixture(name="opener", params=["sqlite", "postgres"])
def _opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Opens another store (another replica) on one fresh database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "hub.sqlite3"
        return lambda: SqliteStore(path)
    server = request.getfixturevalue("pg_server")
    conninfo = server.create_database(f"hub_seen_{os.getpid()}_{next(_names)}")
    return lambda: PostgresStore(conninfo)


def seen_ms(hub: Hub, node: str) -> int:
    """``node``'s last_seen at ``hub`` (0: not listed)."""
    nodes = hub.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10).nodes
    return next((n.last_seen_unix_ms for n in nodes if n.node == node), 0)


def test_a_watch_only_node_is_seen_by_the_other_replicas_status(opener: Callable[[], Store]) -> None:
    """n1 watches replica A and never reports: replica B's Status lists it, and its last-seen moves on while it
    watches."""
    with running_hub(opener(), heartbeat=HEARTBEAT) as a, running_hub(opener(), heartbeat=HEARTBEAT) as b:
        started = int(time.time() * 1000)
        stream = watch(a.stub, "n1@lab")
        stream.next()
        wait_for(lambda: seen_ms(b, "n1@lab") >= started - 1000, "n1 at replica B", timeout=3)
        first = seen_ms(b, "n1@lab")
        wait_for(lambda: seen_ms(b, "n1@lab") > first, "n1's last-seen moving on at replica B", timeout=3)
        stream.cancel()
        listed = {n.node: n for n in b.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10).nodes}
        assert (listed["n1@lab"].held_version, listed["n1@lab"].reported_version, listed["n1@lab"].reason) == (0, 0, "")


class CountingSeen:
    """A real store whose record_seen calls are kept (cluster and the nodes of each)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self._lock = threading.Lock()

    def record_seen(self, cluster: str, seen: Mapping[str, float]) -> None:
        """Kept, then passed on."""
        with self._lock:
            self.calls.append((cluster, tuple(sorted(seen))))
        self.store.record_seen(cluster, seen)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_watch_activity_is_written_in_one_batch_per_heartbeat(tmp_path: Path) -> None:
    """Ten nodes watching for 1 s at a 0.1 s heartbeat: each is in the store, in at most ~one write per heartbeat
    (not one per node per heartbeat), and a write names a node once."""
    counting = CountingSeen(SqliteStore.in_dir(tmp_path / "state"))
    with running_hub(counting, heartbeat=HEARTBEAT) as hub:
        names = [f"n{i}@lab" for i in range(10)]
        streams = [watch(hub.stub, name) for name in names]
        for stream in streams:
            stream.next()
        time.sleep(1.0)
        wait_for(lambda: {r.node for r in counting.store.nodes(CLUSTER)} == set(names), "every node stored", 3)
        for stream in streams:
            stream.cancel()
    calls = list(counting.calls)
    assert 1 <= len(calls) <= 1.0 / HEARTBEAT + 4, f"{len(calls)} writes for 10 nodes in 1 s"
    assert sum(len(nodes) for _, nodes in calls) <= 10 * (1.0 / HEARTBEAT + 3)


@pytest.fixture(name="store")
def _store(opener: Callable[[], Store]) -> Iterator[Store]:
    store = opener()
    try:
        yield store
    finally:
        store.close()


def test_record_seen_keeps_reports_and_never_moves_back(store: Store) -> None:
    """A node with no report gets a row holding nothing; a node's ACK, NACK reason and held version are kept; an
    older time does not move last_seen back; bad input names the field."""
    store.record_ack(CLUSTER, "n1@lab", 3, True)
    store.record_ack(CLUSTER, "n1@lab", 4, False, "ROLLBACK: held 5")
    now = time.time() + 60
    store.record_seen(CLUSTER, {"n1@lab": now, "n2@lab": now})
    store.record_seen(CLUSTER, {"n1@lab": now - 3600})
    rows = {r.node: r for r in store.nodes(CLUSTER)}
    assert (rows["n1@lab"].held, rows["n1@lab"].version, rows["n1@lab"].ok, rows["n1@lab"].reason) == \
        (3, 4, False, "ROLLBACK: held 5")
    assert (rows["n2@lab"].held, rows["n2@lab"].version, rows["n2@lab"].ok, rows["n2@lab"].reason) == (0, 0, False, "")
    assert {name: round(r.last_seen.timestamp()) for name, r in rows.items()} == {"n1@lab": round(now),
                                                                                  "n2@lab": round(now)}
    store.record_ack(CLUSTER, "n2@lab", 1, True)  # a report after: the row is an ordinary report
    assert [(r.held, r.version, r.ok) for r in store.nodes(CLUSTER) if r.node == "n2@lab"] == [(1, 1, True)]
    for bad, field in (({"bad node!": now}, "node"), ({"n3@lab": float("nan")}, "seen"), ({"n3@lab": -1.0}, "seen")):
        with pytest.raises(InvalidArgumentError, match=f"^{field}"):
            store.record_seen(CLUSTER, bad)
    with pytest.raises(InvalidArgumentError, match=r"^cluster"):
        store.record_seen("", {"n3@lab": now})
    store.record_seen(CLUSTER, {})  # nothing to write
    assert "n3@lab" not in {r.node for r in store.nodes(CLUSTER)}
