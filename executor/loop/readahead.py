"""The next starts' pending sections, read while the lanes run.

A start applies PVE's pending section, so the lane judges every start on a read of ``/pending``.
Made in the lane, that read is one more request on every start's path (at 50 ms per request, a
start's two requests become three). ``ReadAhead`` makes it in the engine's reader threads instead,
a few guests ahead of the lanes, so it overlaps the calls and task waits of the starts before it.

It never reads further ahead than a lane would wait, so a read is about as fresh as one made in
the lane: at most ``window`` reads (one per lane) are ahead of the lanes, the next one begins when a
lane takes its read, and a read older than ``fresh`` seconds is not used (the lane reads again).
Lanes that slow (long tasks, where one read more is little) turn reading ahead off for the rest of
their batch, so a read is wasted once per lane at most; otherwise each start's section is read once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import structlog

from executor.gate.actions import START
from executor.gate.decisions import Admitted
from executor.pve.node import PendingSection, PveError, PveReader
from safety.classify import Source

log = structlog.get_logger("executor.readahead")


@dataclass(frozen=True, slots=True)
class _Read:
    """A read begun (its answer to come) and when it began."""

    answer: Future[PendingSection]
    began: float


class ReadAhead:
    """Reads the pending sections of the planned starts, ``window`` guests ahead of the lanes."""

    def __init__(self, reader: PveReader, pool: Executor, *, window: int, fresh: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._reader, self._pool, self._window, self._fresh, self._clock = reader, pool, window, fresh, clock
        self._lock = threading.Lock()
        self._planned: dict[int, str] = {}  # vmid -> guest type, in queue order: reads not begun yet
        self._reads: dict[int, _Read] = {}  # begun, not yet taken by the guest's lane

    def plan(self, admitted: Mapping[int, Sequence[Admitted]]) -> None:
        """Read ahead for the guests whose job begins with a start from the local file, in queue order.

        A job that writes before it starts is not read ahead: its start must see its own write's effect.
        A remote source's start, and a signed op's, read right before the call (their protection check).
        """
        if self._window < 1 or self._fresh <= 0:
            return
        with self._lock:
            for vmid, steps in admitted.items():
                first = steps[0] if steps else None
                if first is not None and first.step.kind == START and first.op is None \
                        and first.source is Source.LOCAL_FILE:
                    self._reads.pop(vmid, None)  # an older tick's read that was never taken
                    self._planned[vmid] = steps[0].step.guest_type
        self._fill()

    def take(self, vmid: int) -> PendingSection | None:
        """The guest's pending section as read ahead, if it was and is still fresh; None: read it in the lane.

        Either way the guest leaves the window, and the next planned guest's read begins (unless this
        one is already too old: then the lanes read for themselves until the next batch).
        """
        with self._lock:
            self._planned.pop(vmid, None)
            read = self._reads.pop(vmid, None)
        if read is not None and not self._fresh_enough(read):
            return None
        self._fill()
        if read is None:
            return None
        try:
            pending = read.answer.result()
        except PveError as exc:  # the lane reads again: its own failure is the one that counts
            log.info("read_ahead_failed", vmid=vmid, error=str(exc))
            return None
        return pending if self._fresh_enough(read) else None

    def _fresh_enough(self, read: _Read) -> bool:
        """Whether ``read`` is young enough to judge a start on; if not, no more reads ahead in this batch."""
        if self._clock() - read.began <= self._fresh:
            return True
        with self._lock:
            self._planned.clear()
        return False

    def _fill(self) -> None:
        """Begin reads until ``window`` are ahead of the lanes; reads too old to be used leave the window."""
        with self._lock:
            now = self._clock()
            for vmid in [v for v, read in self._reads.items() if now - read.began > self._fresh]:
                del self._reads[vmid]  # its lane never came (the queue closed, the job was dropped)
            while self._planned and len(self._reads) < self._window:
                vmid = next(iter(self._planned))
                guest_type = self._planned.pop(vmid)
                try:
                    answer = self._pool.submit(self._reader.pending, guest_type, vmid)
                except RuntimeError:  # the reader threads were shut down: the lanes read for themselves
                    self._planned.clear()
                    return
                self._reads[vmid] = _Read(answer, now)
