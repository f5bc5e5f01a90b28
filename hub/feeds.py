"""One feed per watched cluster: a single thread waits on the store and fans each new version out to every watcher.

A thousand watchers of one cluster cost one thread and one store wait (a LISTEN connection on PostgreSQL), not a
thousand pollers: each watcher only blocks on its own queue. The feed also keeps the latest version as one
ready-made ``WatchEvent``, so a thousand nodes reconnecting after a hub restart are answered from memory with one
shared copy of the document, not a thousand reads of it. Store calls run on a small pool of their own (``read``,
the service's calls too), so the many threads that hold Watch streams never each open a database connection.
A watcher skips any version it already holds, so a version seen twice (a subscribe racing an append) is sent once.

Deliveries (signed ops routed through the hub) travel the same way: a second thread per feed waits on the store's
deliveries (``wait_for_deliveries``: LISTEN/NOTIFY on PostgreSQL, so a delivery queued on any replica reaches the
replica its node watches) and hands each to the watchers of its node. A stream that starts reads its node's open
deliveries itself, after subscribing, so none falls between (it skips one it already sent).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from hub import documents
from hub.store import Delivery, Store, StoreError, Version
from hub.v1 import hub_pb2 as pb

log = structlog.get_logger("hub.feeds")
WAIT_SLICE = 1.0  # seconds per store wait: how soon a feed with no watchers left stops
RETRY_AFTER = 1.0  # seconds before a feed asks a failing store again
READERS = 4  # threads (so, at most this many database connections) that call the store for the service
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Published:
    """A version as every watcher receives it: its number and one WatchEvent shared by all streams."""

    version: int
    event: pb.WatchEvent

    @classmethod
    def of(cls, version: Version) -> Published:
        """The event of a stored version."""
        return cls(version.version, pb.WatchEvent(document=documents.to_document(version)))


CLOSED = None  # what a watcher's queue gets when its stream must end (the hub stops, or the call is cancelled)


@dataclass(eq=False)
class Watcher:
    """A watcher's queue (new versions of its cluster, or CLOSED) and the cluster's latest when it subscribed."""

    cluster: str
    current: Published | None = None
    node: str = ""  # the node it watches for: deliveries for it come in its inbox
    inbox: queue.SimpleQueue[Published | Delivery | None] = field(default_factory=queue.SimpleQueue)


class _Feed:
    """The thread that waits on one cluster and hands each new version to its watchers."""

    def __init__(self, feeds: Feeds, cluster: str, current: Published | None, delivered: int = 0) -> None:
        self.cluster, self.current = cluster, current
        self.delivered = delivered  # the last delivery number routed (read before the first watcher subscribed)
        self.watchers: set[Watcher] = set()
        self._feeds = feeds
        self._thread = threading.Thread(target=self._run, name=f"hub-feed-{cluster}", daemon=True)
        self._router = threading.Thread(target=self._route, name=f"hub-deliver-{cluster}", daemon=True)

    @property
    def latest(self) -> int:
        """The latest version this feed has seen (0: none)."""
        return self.current.version if self.current is not None else 0

    def start(self) -> None:
        self._thread.start()
        self._router.start()

    def _run(self) -> None:
        log.info("hub.feed.started", cluster=self.cluster, latest=self.latest)
        while self._feeds.keep(self):
            try:
                if not self._feeds.store.wait_for_change(self.cluster, self.latest, WAIT_SLICE):
                    continue
                version = self._feeds.store.get(self.cluster)
            except StoreError as exc:
                log.warning("hub.feed.store_failed", cluster=self.cluster, error=str(exc))
                self._feeds.stopping.wait(RETRY_AFTER)
                continue
            if version is not None and version.version > self.latest:
                self._feeds.publish(self, Published.of(version))
        log.info("hub.feed.stopped", cluster=self.cluster)

    def _route(self) -> None:
        """Hand each new delivery of the cluster to the watchers of its node."""
        while self._feeds.keep(self):
            try:
                if not self._feeds.store.wait_for_deliveries(self.cluster, self.delivered, WAIT_SLICE):
                    continue
                found = self._feeds.store.deliveries_after(self.cluster, self.delivered)
            except StoreError as exc:
                log.warning("hub.feed.store_failed", cluster=self.cluster, error=str(exc))
                self._feeds.stopping.wait(RETRY_AFTER)
                continue
            for delivery in found:
                self._feeds.route(self, delivery)
                self.delivered = max(self.delivered, delivery.seq)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._router.join(timeout)


class Feeds:
    """The hub's feeds, one per cluster with watchers; ``subscribe`` / ``unsubscribe`` per Watch stream."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._feeds: dict[str, _Feed] = {}
        self._loading: dict[str, Future[tuple[Published | None, int]]] = {}  # the read that starts a cluster's feed
        self._readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="hub-store")

    def read(self, call: Callable[..., T], *args: object) -> T:
        """``call(*args)`` on the store's reader threads (their errors raised here)."""
        return self._readers.submit(call, *args).result()

    def _load(self, cluster: str) -> tuple[Published | None, int]:
        delivered = self.store.delivery_head(cluster)  # before any watcher reads its open deliveries
        version = self.store.get(cluster)
        return (Published.of(version) if version is not None else None), delivered

    def subscribe(self, cluster: str, node: str = "") -> Watcher:
        """A new watcher of ``cluster`` with the latest version in ``current``; the feed starts with the first.

        StoreError when the feed must start and the store cannot be read.
        """
        with self._lock:
            loading = None
            if cluster not in self._feeds:
                # One read per starting feed, shared by every watcher that arrives meanwhile.
                loading = self._loading.get(cluster)
                if loading is None:
                    loading = self._loading[cluster] = self._readers.submit(self._load, cluster)
        # Wait outside the lock: a slow or unreachable store must not stall the streams of other clusters.
        try:
            loaded, delivered = loading.result() if loading is not None else (None, 0)
        except BaseException:
            self._done_loading(cluster, loading)
            raise
        with self._lock:
            if loading is not None and self._loading.get(cluster) is loading:
                del self._loading[cluster]
            feed = self._feeds.get(cluster)
            if feed is None:
                feed = _Feed(self, cluster, loaded, delivered)
                self._feeds[cluster] = feed
                feed.start()
            watcher = Watcher(cluster, feed.current, node)
            feed.watchers.add(watcher)
        if self.stopping.is_set():
            watcher.inbox.put(CLOSED)
        return watcher

    def _done_loading(self, cluster: str, loading: Future[tuple[Published | None, int]] | None) -> None:
        with self._lock:
            if loading is not None and self._loading.get(cluster) is loading:
                del self._loading[cluster]

    def unsubscribe(self, watcher: Watcher) -> None:
        """The watcher's stream ended; its feed stops within WAIT_SLICE once it has no watchers."""
        with self._lock:
            feed = self._feeds.get(watcher.cluster)
            if feed is not None:
                feed.watchers.discard(watcher)
        watcher.inbox.put(CLOSED)  # wakes the stream if it is still waiting (a cancelled call)

    def latest(self, cluster: str) -> int | None:
        """The latest version a running feed has seen (None: nobody watches the cluster here)."""
        with self._lock:
            feed = self._feeds.get(cluster)
            return feed.latest if feed is not None else None

    def watching(self) -> int:
        """How many watchers are subscribed, over all clusters."""
        with self._lock:
            return sum(len(feed.watchers) for feed in self._feeds.values())

    def keep(self, feed: _Feed) -> bool:
        """Whether ``feed`` should keep waiting: the hub runs and it has watchers (else it is removed)."""
        with self._lock:
            if self.stopping.is_set() or not feed.watchers:
                if self._feeds.get(feed.cluster) is feed:
                    del self._feeds[feed.cluster]
                return False
            return True

    def publish(self, feed: _Feed, published: Published) -> None:
        """Make ``published`` the feed's current version and hand it to each of its watchers."""
        with self._lock:
            feed.current = published
            watchers = list(feed.watchers)
        for watcher in watchers:
            watcher.inbox.put(published)
        log.info("hub.feed.published", cluster=feed.cluster, version=published.version, watchers=len(watchers))

    def route(self, feed: _Feed, delivery: Delivery) -> None:
        """Hand ``delivery`` to each watcher of its node on this replica (none: it waits for the node's next
        stream, which reads it)."""
        with self._lock:
            watchers = [watcher for watcher in feed.watchers if watcher.node == delivery.node]
        for watcher in watchers:
            watcher.inbox.put(delivery)
        log.info("hub.feed.delivery_routed", cluster=feed.cluster, node=delivery.node,
                 delivery_id=delivery.delivery_id, watchers=len(watchers))

    def release(self) -> None:
        """Stop the store's threads (after the server stopped: no call may need them)."""
        self._readers.shutdown(wait=True)

    def close(self, timeout: float = 2.0) -> None:
        """Stop every feed and end every watcher's stream."""
        self.stopping.set()
        with self._lock:
            feeds = list(self._feeds.values())
            watchers = [watcher for feed in feeds for watcher in feed.watchers]
        for watcher in watchers:
            watcher.inbox.put(CLOSED)
        for feed in feeds:
            feed.join(timeout)
