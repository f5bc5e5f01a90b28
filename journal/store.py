"""The journal: an fsync'd, checksummed, self-compacting log of operations and idempotency keys.

Every append returns only once its bytes are on disk (``fdatasync``). Concurrent appends are
group-committed: the first writer to find no sync running writes and syncs everything queued so
far, the others wait for it. A failed write or sync poisons the journal: it refuses every later
write, since a retried fsync can report success for data the kernel already dropped.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from journal import segments
from journal.errors import (
    AlreadyAppliedError,
    IdempotencyConflictError,
    JournalClosedError,
    JournalError,
    JournalOpenError,
    JournalWriteError,
    KeyInFlightError,
    OutcomeUnknownError,
)
from journal.records import (
    BEGUN_PAYLOAD,
    FIELDS,
    Begun,
    Body,
    Ended,
    Outcome,
    Record,
    TaskStarted,
    encode_body,
    fields_of,
    payload_hash,
    record_of,
)
from journal.state import InFlight, KeyState, State

DEFAULT_RETENTION = 7 * 24 * 3600.0
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024


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


class Journal:
    """The executor's memory across crashes. Use ``Journal.open(directory)``; thread-safe."""

    def __init__(self, directory: Path, segment: segments.ActiveSegment, lock_fd: int, sequence: int, state: State, *,
                 retention: float, segment_bytes: int, clock: Callable[[], float]) -> None:
        self.directory = directory
        self._segment, self._lock_fd, self._sequence = segment, lock_fd, sequence
        self._retention, self._segment_bytes, self._clock = retention, segment_bytes, clock
        self._state = state
        self._cond = threading.Condition()
        self._queue: list[_Waiter] = []
        self._leading = False
        self._failure: BaseException | None = None
        self._closed = False
        self._appends = self._syncs = 0

    # --- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, retention: float = DEFAULT_RETENTION,
             segment_bytes: int = DEFAULT_SEGMENT_BYTES, clock: Callable[[], float] = time.time,
             keep_recent: int = 1000) -> Journal:
        """Open (creating if needed) and recover the journal in ``directory``.

        Raises JournalOpenError (unwritable, full, in use) or JournalCorruptError (a damaged
        record with valid ones after it; the file is copied aside first).
        """
        path = Path(directory)
        lock_fd = -1
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock_fd = segments.lock(path)
            segments.check_space(path)
            state = State(keep_recent)
            sequence = segments.recover(path, state.apply)
            segment = segments.ActiveSegment.open(path, sequence)
        except BlockingIOError as exc:
            segments.close_quietly(lock_fd)
            raise JournalOpenError(f"journal {path} is in use by another process") from exc
        except OSError as exc:
            segments.close_quietly(lock_fd)
            raise JournalOpenError(f"cannot open journal {path}: {exc.strerror or exc}") from exc
        except JournalError:
            segments.close_quietly(lock_fd)
            raise
        return cls(path, segment, lock_fd, sequence, state, retention=retention, segment_bytes=segment_bytes,
                   clock=clock)

    # --- the operation lifecycle -----------------------------------------------------------

    def begin(self, *, vmid: int, kind: str, payload: Mapping[str, Any], key: str | None = None,
              op_id: str | None = None) -> str:
        """Record an operation about to run; return its id once durable.

        With ``key`` (one-shot operations), refuses a key that ended ok (AlreadyAppliedError), is
        in flight (KeyInFlightError), ended unknown (OutcomeUnknownError), or came with another
        payload (IdempotencyConflictError).
        """
        op_id, at = op_id or os.urandom(16).hex(), self._clock()
        body = fields_of(Begun(op_id=op_id, vmid=vmid, kind=kind, payload=payload, key=key, at=at))
        frame = encode_body(body)
        with self._cond:
            self._check_open()
            if op_id in self._state.ops:
                raise JournalError(f"operation {op_id} is already in flight")
            if key is not None:
                canonical_payload = body[FIELDS][BEGUN_PAYLOAD]
                assert canonical_payload is not None
                self._reserve(key, payload_hash(canonical_payload), op_id, at)
            try:
                self._commit(frame, body)
            except BaseException:
                if key is not None and op_id not in self._state.ops:
                    self._state.keys.pop(key, None)  # release the reservation: nothing was recorded
                raise
        return op_id

    def task(self, op_id: str, upid: str) -> None:
        """Record the UPID the Proxmox call returned."""
        self._append_for(op_id, TaskStarted(op_id=op_id, upid=upid, at=self._clock()))

    def end(self, op_id: str, outcome: Outcome, error: str = "") -> None:
        """Record how the operation ended."""
        self._append_for(op_id, Ended(op_id=op_id, outcome=outcome, error=error, at=self._clock()))

    def _append_for(self, op_id: str, record: TaskStarted | Ended) -> None:
        body = fields_of(record)
        frame = encode_body(body)
        with self._cond:
            self._check_open()
            if op_id not in self._state.ops:
                raise JournalError(f"operation {op_id} is not in flight")
            self._commit(frame, body)

    # --- queries ------------------------------------------------------------------------------

    def in_flight(self) -> list[InFlight]:
        """Operations begun and not ended, oldest first."""
        with self._cond:
            return self._state.in_flight()

    def already_applied(self, key: str, payload: Mapping[str, Any] | None = None) -> bool:
        """Whether an operation with ``key`` ended ok within the retention window.

        With ``payload``, a different payload under the same key raises IdempotencyConflictError.
        """
        if not key:
            raise ValueError("an idempotency key must not be empty")
        with self._cond:
            state = self._live_key(key)
        if state is None:
            return False
        if payload is not None and payload_hash(payload) != state.payload_hash:
            raise IdempotencyConflictError(f"key {key!r} was used with a different payload")
        return state.outcome is Outcome.OK

    def recent(self, limit: int = 100) -> list[Record]:
        """The last ``limit`` records, oldest first."""
        with self._cond:
            bodies = list(self._state.recent)[-limit:] if limit > 0 else []
        return [record_of(body) for body in bodies]

    @property
    def stats(self) -> tuple[int, int]:
        """(records appended, syncs) since open: appends per sync shows the group commit at work."""
        return self._appends, self._syncs

    @property
    def failed(self) -> bool:
        """True once a write or sync failed: the journal takes no more writes."""
        return self._failure is not None

    def close(self) -> None:
        """Wait for a running sync, then close the files; later calls raise JournalClosedError."""
        with self._cond:
            while self._leading:
                self._cond.wait()
            if self._closed:
                return
            self._closed = True
            self._segment.close()
            segments.close_quietly(self._lock_fd)
            self._cond.notify_all()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- internals (called with self._cond held) ------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise JournalClosedError(f"journal {self.directory} is closed")
        if self._failure is not None:
            raise JournalWriteError(f"journal {self.directory} failed earlier and takes no more writes: "
                                    f"{self._failure}") from self._failure

    def _live_key(self, key: str) -> KeyState | None:
        state = self._state.keys.get(key)
        if state is not None and state.outcome is not None and self._clock() - state.at > self._retention:
            return None
        return state

    def _reserve(self, key: str, digest: bytes, op_id: str, at: float) -> None:
        if not key:
            raise ValueError("an idempotency key must not be empty")
        state = self._live_key(key)
        if state is not None:
            if state.payload_hash != digest:
                raise IdempotencyConflictError(f"key {key!r} was used with a different payload")
            if state.outcome is None:
                raise KeyInFlightError(f"key {key!r} is in flight as operation {state.op_id}")
            if state.outcome is Outcome.OK:
                raise AlreadyAppliedError(f"key {key!r} was applied by operation {state.op_id}")
            raise OutcomeUnknownError(f"key {key!r}: operation {state.op_id} ended with an unknown outcome")
        self._state.keys[key] = KeyState(digest, op_id, None, at)

    def _commit(self, frame: bytes, body: Body) -> None:
        """Queue ``frame`` and return once it is durable. Called with the lock held.

        Group commit: with nobody syncing, this thread leads: it writes and syncs everything
        queued, then hands the lead to the first thread that queued meanwhile. Every other thread
        sleeps on its own event and is woken once, when its record is durable (or the lead is
        handed to it), never by every sync.
        """
        waiter = _Waiter(frame, body)
        self._queue.append(waiter)
        if self._leading:
            waiter.event = threading.Event()
            self._cond.release()
            try:
                waiter.event.wait()
            finally:
                self._cond.acquire()
            if not waiter.lead:
                waiter.raise_error()
                return
        self._leading = True
        self._lead()
        waiter.raise_error()

    def _lead(self) -> None:
        """Write and sync the queue with the lock released, publish it, then hand the lead on."""
        batch, self._queue = self._queue, []
        error: OSError | None = None
        self._cond.release()
        try:
            self._segment.append(b"".join(w.frame for w in batch))
        except OSError as exc:
            error = exc
        finally:
            self._cond.acquire()
        if error is None:
            self._syncs += 1
            self._appends += len(batch)
            for waiter in batch:
                self._state.apply(waiter.body)
            if self._segment.size > self._segment_bytes:
                error = self._compact()
        if error is not None:
            self._failure = error
            batch += self._queue  # nobody may write after a failure: fail the queued ones too
            self._queue = []
        for waiter in batch:
            waiter.error = error
            waiter.wake()
        if self._queue:
            self._queue[0].lead = True
            self._queue[0].wake()
        else:
            self._leading = False
            self._cond.notify_all()  # close() may be waiting for the lead to end

    def _compact(self) -> OSError | None:
        """Start a new segment holding only what recovery and idempotency need; drop the old ones.

        The snapshot is written to a temporary file, synced and renamed before any old segment is
        removed: a crash at any point leaves either the old segments or the new one (or both,
        which replay folds idempotently).
        """
        now = self._clock()
        live = self._state.live(lambda state: now - state.at > self._retention)
        try:
            segment = segments.rotate(self.directory, self._sequence + 1, b"".join(encode_body(body) for body in live))
        except OSError as exc:
            return exc
        self._segment.close()
        self._segment, self._sequence = segment, self._sequence + 1
        segments.remove_before(self.directory, self._sequence)
        return None

