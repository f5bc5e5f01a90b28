"""The per-guest serializer queue: the single choke point of every mutation.

Jobs of one vmid run strictly one at a time in submit order; jobs of different vmids run in
parallel, at most ``max_parallel`` at once. When a worker frees up it takes the lane that has
waited longest for a worker (a lane that just ran goes to the back), so a guest with a long queue
cannot starve the others. Submitting never blocks. A later safety gate can wrap
``run`` (the one function every job passes through) without touching the queue.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from executor.errors import PermanentError


@dataclass(slots=True)
class Job:
    """Work for one guest; ``seq`` orders it globally by submission."""

    vmid: int
    run: Callable[[], object]
    label: str = ""
    seq: int = 0
    submitted: float = field(default_factory=time.monotonic)


class QueueClosedError(PermanentError, RuntimeError):
    """Submitted after close()."""


class GuestQueue:
    """Lanes per vmid, a global bound, oldest-waiting-first fairness."""

    def __init__(self, max_parallel: int, on_error: Callable[[Job, BaseException], None] | None = None) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self._max_parallel = max_parallel
        self._on_error = on_error
        self._lock = threading.Condition()
        self._lanes: dict[int, deque[Job]] = {}
        self._ready: list[tuple[int, int]] = []  # (when the lane became ready, as a seq; vmid): a heap
        self._running: set[int] = set()
        self._workers: list[threading.Thread] = []
        self._seq = itertools.count()
        self._closed = False

    def submit(self, job: Job) -> None:
        """Queue ``job`` behind the jobs of its vmid; returns at once."""
        with self._lock:
            if self._closed:
                raise QueueClosedError("queue is closed")
            job.seq = next(self._seq)
            lane = self._lanes.setdefault(job.vmid, deque())
            lane.append(job)
            if len(lane) == 1 and job.vmid not in self._running:
                heapq.heappush(self._ready, (job.seq, job.vmid))
            if len(self._workers) < self._max_parallel and len(self._workers) < self._pending_lanes():
                worker = threading.Thread(target=self._work, name=f"guest-queue-{len(self._workers)}", daemon=True)
                self._workers.append(worker)
                worker.start()
            self._lock.notify()

    @property
    def max_parallel(self) -> int:
        """How many lanes run at once."""
        return self._max_parallel

    def _pending_lanes(self) -> int:
        return len(self._ready) + len(self._running)

    def busy(self) -> dict[int, int]:
        """vmid -> jobs queued or running, for every guest with work."""
        with self._lock:
            return {vmid: len(lane) for vmid, lane in self._lanes.items() if lane}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running (True), or ``timeout`` passes (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._lanes, timeout)

    def close(self, grace: float) -> list[Job]:
        """Stop taking jobs, let queued ones run for up to ``grace`` seconds; return the unfinished."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            self._lock.wait_for(lambda: not self._lanes, grace)
            unfinished = [job for lane in self._lanes.values() for job in lane]
            for lane in self._lanes.values():
                # Queued jobs that never started are dropped; a running one finishes on its own.
                while len(lane) > (1 if lane and lane[0].vmid in self._running else 0):
                    lane.pop()
            self._ready.clear()
            self._lock.notify_all()
        return unfinished

    def _work(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._ready or (self._closed and not self._running and not self._lanes))
                if not self._ready:
                    return
                _, vmid = heapq.heappop(self._ready)
                job = self._lanes[vmid][0]
                self._running.add(vmid)
            try:
                job.run()
            except BaseException as exc:  # a job's failure is its lane's, never the worker's
                if self._on_error is not None:
                    self._on_error(job, exc)
            with self._lock:
                self._running.discard(vmid)
                lane = self._lanes[vmid]
                if lane and lane[0] is job:
                    lane.popleft()
                if lane:
                    heapq.heappush(self._ready, (next(self._seq), vmid))  # to the back of the line
                else:
                    del self._lanes[vmid]
                self._lock.notify_all()
