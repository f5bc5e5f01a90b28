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

from executor.loop.hub import HubProvider
from executor.metrics import ExecutorMetrics
from executor.signed.trust import TrustKeeper
from hub.store import InvalidArgumentError, PostgresStore, SqliteStore, Store
from hub.v1 import hub_pb2 as pb
from tests.hub_helpers import CLUSTER, Hub, running_hub, watch
from tests.signing import write_store
from tests.test_hub_provider import AUDIENCE, DESIRED, document, make_provider, metric, sha, wait_for
from tests.test_hub_provider import CLUSTER as PROVIDER_CLUSTER
from tests.test_hub_provider import store_doc as provider_store_doc

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


# -- a node ahead of the hub (a restored database) -------------------------------------------------------------------


def test_a_node_ahead_of_a_restored_hub_keeps_its_version_and_the_hub_shows_it(tmp_path: Path,
                                                                             providers: list[HubProvider]) -> None:
    """The node holds v3. The hub comes back from a backup taken at v2 (its row says the node holds 2), on the
    same address: the node watches from 3, gets heartbeats only (connected, no NACK, no error), keeps v3, and the
    restored hub's Status shows it holding 3, ahead of the latest 2, seen just now."""
    state, node_state = tmp_path / "hub", tmp_path / "node"
    node_state.mkdir()
    trust = TrustKeeper(str(write_store(tmp_path, provider_store_doc())), str(node_state))
    v1 = document(1)
    v2 = document(2, sha(v1), desired=DESIRED.replace("4096", "5120"))
    v3 = document(3, sha(v2), desired=DESIRED.replace("4096", "6144"))
    backup = SqliteStore.in_dir(tmp_path / "backup")
    for version, envelope in enumerate((v1, v2)):
        backup.append(PROVIDER_CLUSTER, version, envelope, "alice@example.org", "m")
    backup.record_ack(PROVIDER_CLUSTER, AUDIENCE, 2, True)
    backup.close()
    metrics = ExecutorMetrics()
    with running_hub(SqliteStore.in_dir(state), heartbeat=HEARTBEAT) as hub:
        port = hub.running.port
        provider = make_provider(providers, port, trust, node_state, metrics=metrics)
        for version, envelope in enumerate((v1, v2, v3)):
            hub.stub.Apply(pb.ApplyRequest(cluster=PROVIDER_CLUSTER, expected_version=version, envelope=envelope),
                           timeout=10)
        wait_for(lambda: provider.held.version == 3, "the node holding v3")
    reports_before = metric(metrics, "pve_executor_hub_reports_total", verdict="ack", reason="none")
    with running_hub(SqliteStore.in_dir(tmp_path / "backup"), heartbeat=HEARTBEAT,
                     listen=f"127.0.0.1:{port}") as restored:
        started = int(time.time() * 1000)
        wait_for(lambda: metric(metrics, "pve_executor_hub_connected") == 1, "the node on the restored hub", 20)

        def shown() -> tuple[int, int, bool, bool]:
            answer = restored.stub.Status(pb.StatusRequest(cluster=PROVIDER_CLUSTER), timeout=10)
            node = next(n for n in answer.nodes if n.node == AUDIENCE)
            return answer.latest_version, node.held_version, node.ok, node.last_seen_unix_ms >= started - 1000

        wait_for(lambda: shown() == (2, 3, True, True), "the restored hub showing the node at v3")
        time.sleep(5 * HEARTBEAT)  # heartbeats pass: nothing moves the node
        assert provider.held.version == 3 and [dict(g.config or {}) for g in provider.desired()] == [
            {"memory": "6144"}]
        assert metric(metrics, "pve_executor_hub_connected") == 1
        assert metric(metrics, "pve_executor_hub_reports_total", verdict="nack", reason="ROLLBACK") == 0
        assert metric(metrics, "pve_executor_hub_reports_total", verdict="ack", reason="none") - reports_before <= 1
