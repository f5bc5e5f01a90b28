"""Group commit: many threads' records written and synced together, each told when its own is durable.

The first writer to find no sync running leads: it writes and syncs everything queued so far
with the lock released, publishes it, then hands the lead to the first thread that queued
meanwhile. Every other thread sleeps on its own event and is woken once, when its record is
durable (or the lead is handed to it), never by every sync. A failed write or sync is kept: every
later commit is refused by the journal, since a retried fsync can report success for data the
kernel already dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from journal.errors import JournalWriteError
from journal.records import Body


class _Waiter:
    """One queued record and how its thread learns the outcome."""

    __slots__ = ("body", "error", "event", "frame", "lead")

    def __init__(self, frame: bytes, body: Body) -> None:
        self.frame, self.body = frame, body
        self.event: threading.Event | None = None  # only a thread that must sleep gets one
        self.lead = False
        self.error: OSError | None = None

    def wake(self) -> None:
        """Wake the thread if it sleeps."""
        if self.event is not None:
            self.event.set()

    def raise_error(self) -> None:
        """Raise the write failure this record met, if any."""
        if self.error is not None:
            raise JournalWriteError(f"journal write failed, journal now refuses writes: "
                                    f"{self.error.strerror or self.error}") from self.error


class GroupCommit:
    """The queue, the lead and the failure of one journal, guarded by the journal's condition.

    ``write(data)`` appends and syncs (called with the lock released); ``publish(bodies)`` folds
    what is now durable (with the lock held) and returns a failure of its own (a compaction's), if any.
    """

    def __init__(self, cond: threading.Condition, write: Callable[[bytes], None],
                 publish: Callable[[list[Body]], OSError | None]) -> None:
        self._cond, self._write, self._publish = cond, write, publish
        self._queue: list[_Waiter] = []
        self.leading = False
        self.failure: OSError | None = None
        self.appends = self.syncs = 0

    def commit(self, frame: bytes, body: Body) -> None:
        """Queue ``frame`` and return once it is durable (JournalWriteError if not). Called with the lock held."""
        waiter = _Waiter(frame, body)
        self._queue.append(waiter)
        if self.leading:
            waiter.event = threading.Event()
            self._cond.release()
            try:
                waiter.event.wait()
            finally:
                self._cond.acquire()
            if not waiter.lead:
                waiter.raise_error()
                return
        self.leading = True
        self._lead()
        waiter.raise_error()

    def _lead(self) -> None:
        """Write and sync the queue with the lock released, publish it, then hand the lead on."""
        batch, self._queue = self._queue, []
        error: OSError | None = None
        self._cond.release()
        try:
            self._write(b"".join(w.frame for w in batch))
        except OSError as exc:
            error = exc
        finally:
            self._cond.acquire()
        if error is None:
            self.syncs += 1
            self.appends += len(batch)
            error = self._publish([w.body for w in batch])
        if error is not None:
            self.failure = error
            batch += self._queue  # nobody may write after a failure: fail the queued ones too
            self._queue = []
        for waiter in batch:
            waiter.error = error
            waiter.wake()
        if self._queue:
            self._queue[0].lead = True
            self._queue[0].wake()
        else:
            self.leading = False
            self._cond.notify_all()  # close() may be waiting for the lead to end
