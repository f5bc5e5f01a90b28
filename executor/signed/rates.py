"""The API's rate limits: ``TokenBucket``, and ``RateBuckets``, one bucket per caller."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class TokenBucket:
    """``rate`` per second, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate, self._burst = rate, float(burst)
        self._tokens, self._at = float(burst), time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """One token, if there is one."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


class RateBuckets:
    """A ``TokenBucket`` per caller key, so one caller's flood never spends another's tokens.

    At most ``max_keys`` are held: past that the least recently used is forgotten. Forgetting is safe
    for the limit only when the bucket had refilled (a forgotten caller comes back with a full bucket),
    so a caller can regain tokens early only by being pushed out by ``max_keys`` busier ones.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 1024) -> None:
        self._rate, self._burst, self._max = rate, burst, max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        """One token from ``key``'s bucket, if there is one."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self._rate, self._burst)
                while len(self._buckets) > self._max:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
        return bucket.take()

    def keys_held(self) -> list[str]:
        """The callers with a bucket now, least recently used first."""
        with self._lock:
            return list(self._buckets)

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)
