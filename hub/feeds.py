"""One feed per watched cluster: a single thread waits on the store and fans each new version out to every watcher.

A thousand watchers of one cluster cost one thread and one store wait (a LISTEN connection on PostgreSQL), not a
thousand pollers: each watcher only blocks on its own queue. The feed sends the whole ``Version``; a watcher
skips any it already holds, so a version seen twice (subscribe races an append) is sent once.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import structlog

from hub.store import Store, StoreError, Version

log = structlog.get_logger("hub.feeds")
WAIT_SLICE = 1.0  # seconds per store wait: how soon a feed with no watchers left stops
RETRY_AFTER = 1.0  # seconds before a feed asks a failing store again
CLOSED = None  # what a watcher's queue gets when the hub stops


@dataclass(eq=False)
class Watcher:
    """A watcher's queue: new versions of its cluster, or CLOSED."""

    cluster: str
    inbox: queue.SimpleQueue[Version | None] = field(default_factory=queue.SimpleQueue)


class _Feed:
    """The thread that waits on one cluster and hands each new version to its watchers."""

    def __init__(self, feeds: Feeds, cluster: str, latest: int) -> None:
        self.cluster, self.latest = cluster, latest
        self.watchers: set[Watcher] = set()
        self._feeds = feeds
        self._thread = threading.Thread(target=self._run, name=f"hub-feed-{cluster}", daemon=True)

    def start(self) -> None:
        self._thread.start()

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
                self.latest = version.version
                self._feeds.publish(self, version)
        log.info("hub.feed.stopped", cluster=self.cluster)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Feeds:
    """The hub's feeds, one per cluster with watchers; ``subscribe`` / ``unsubscribe`` per Watch stream."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._feeds: dict[str, _Feed] = {}

    def subscribe(self, cluster: str) -> Watcher:
        """A new watcher of ``cluster``; its feed starts if it is the first (StoreError if the store is down)."""
        watcher = Watcher(cluster)
        with self._lock:
            feed = self._feeds.get(cluster)
            if feed is None:
                feed = _Feed(self, cluster, self.store.latest(cluster))
                self._feeds[cluster] = feed
                feed.start()
            feed.watchers.add(watcher)
        if self.stopping.is_set():
            watcher.inbox.put(CLOSED)
        return watcher

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

    def publish(self, feed: _Feed, version: Version) -> None:
        """Hand ``version`` to each of the feed's watchers."""
        with self._lock:
            watchers = list(feed.watchers)
        for watcher in watchers:
            watcher.inbox.put(version)
        log.info("hub.feed.published", cluster=feed.cluster, version=version.version, watchers=len(watchers))

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
