"""Waking the store's waiters: a condition with a generation per cluster, rung by appends and notifications."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Bell:
    """Waiters sleep until a cluster's bell (or every bell) rings, then re-check the database themselves.

    A ring carries no version on purpose: the database is the truth, a ring only says "look again",
    so a lost or duplicated ring costs a query, never a wrong answer. ``poll``, when given, is called
    by at most one waiter at a time, every ``interval`` seconds while someone waits, and returns
    True when another process may have written (it then rings every bell).
    """

    def __init__(self, poll: Callable[[], bool] | None = None, interval: float = 0.25) -> None:
        self._cond = threading.Condition()
        self._all = 0
        self._each: dict[str, int] = {}
        self._closed = False
        self._poll, self._interval = poll, interval
        self._next_poll = 0.0

    def ring(self, cluster: str | None = None) -> None:
        """Wake the waiters of ``cluster`` (None: every waiter)."""
        with self._cond:
            if cluster is None:
                self._all += 1
            else:
                self._each[cluster] = self._each.get(cluster, 0) + 1
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter for good: they return False."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _generation(self, cluster: str) -> tuple[int, int]:
        return self._all, self._each.get(cluster, 0)

    def wait(self, cluster: str, changed: Callable[[], bool], timeout: float) -> bool:
        """True as soon as ``changed()`` is, checked at first and after each ring; False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if self._closed:
                    return False
                seen = self._generation(cluster)
            # Read outside the lock: a ring between reading the generation and this check is not lost,
            # the generation has moved and the loop below falls through to check again.
            if changed():
                return True
            if not self._sleep(cluster, seen, deadline):
                return False

    def _sleep(self, cluster: str, seen: tuple[int, int], deadline: float) -> bool:
        """Sleep until the generation moves past ``seen`` (True) or the deadline or close (False)."""
        with self._cond:
            while self._generation(cluster) == seen and not self._closed:
                now = time.monotonic()
                if now >= deadline:
                    return False
                if self._poll is None:
                    self._cond.wait(deadline - now)
                    continue
                if now >= self._next_poll:
                    self._next_poll = now + self._interval
                    if self._poll():
                        self._all += 1
                        self._cond.notify_all()
                    continue
                self._cond.wait(min(deadline, self._next_poll) - now)
            return not self._closed
