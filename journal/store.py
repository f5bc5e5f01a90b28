"""The journal: an fsync'd, checksummed, self-compacting log of operations and idempotency keys.

Every append returns only once its bytes are on disk (``fdatasync``). Concurrent appends are
group-committed: the first writer to find no sync running writes and syncs everything queued so
far, the others wait for it. A failed write or sync poisons the journal: it refuses every later
write, since a retried fsync can report success for data the kernel already dropped.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
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
from journal.records import Applied, Begun, Ended, Outcome, Record, TaskStarted, encode, payload_hash

DEFAULT_RETENTION = 7 * 24 * 3600.0
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class InFlight:
    """An operation begun and not ended: what the executor re-checks on restart."""

    op_id: str
    vmid: int
    kind: str
    payload: Mapping[str, Any]
    key: str | None
    begun_at: float
    upid: str | None = None


@dataclass(frozen=True, slots=True)
class _KeyState:
    """An idempotency key: its payload, its operation, and how that ended (None: in flight)."""

    payload_hash: str
    op_id: str
    outcome: Outcome | None
    at: float


class Journal:
    """The executor's memory across crashes. Use ``Journal.open(directory)``; thread-safe."""

    def __init__(self, directory: Path, fd: int, lock_fd: int, sequence: int, size: int, *,
                 retention: float, segment_bytes: int, clock: Callable[[], float], keep_recent: int) -> None:
        self.directory = directory
        self._fd, self._lock_fd, self._sequence, self._size = fd, lock_fd, sequence, size
        self._retention, self._segment_bytes, self._clock = retention, segment_bytes, clock
        self._ops: dict[str, InFlight] = {}
        self._keys: dict[str, _KeyState] = {}
        self._recent: collections.deque[Record] = collections.deque(maxlen=keep_recent)
        self._cond = threading.Condition()
        self._pending: list[tuple[bytes, Record]] = []
        self._queued = self._durable = 0
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
            records, sequence = segments.recover(path)
            fd, size = segments.open_active(path, sequence)
        except BlockingIOError as exc:
            segments.close_quietly(lock_fd)
            raise JournalOpenError(f"journal {path} is in use by another process") from exc
        except OSError as exc:
            segments.close_quietly(lock_fd)
            raise JournalOpenError(f"cannot open journal {path}: {exc.strerror or exc}") from exc
        except JournalError:
            segments.close_quietly(lock_fd)
            raise
        journal = cls(path, fd, lock_fd, sequence, size, retention=retention, segment_bytes=segment_bytes,
                      clock=clock, keep_recent=keep_recent)
        for record in records:
            journal._apply(record)
        return journal

    # --- the operation lifecycle -----------------------------------------------------------

    def begin(self, *, vmid: int, kind: str, payload: Mapping[str, Any], key: str | None = None,
              op_id: str | None = None) -> str:
        """Record an operation about to run; return its id once durable.

        With ``key`` (one-shot operations), refuses a key that ended ok (AlreadyAppliedError), is
        in flight (KeyInFlightError), ended unknown (OutcomeUnknownError), or came with another
        payload (IdempotencyConflictError).
        """
        op_id = op_id or uuid.uuid4().hex
        record = Begun(op_id=op_id, vmid=vmid, kind=kind, payload=dict(payload), key=key, at=self._clock())
        frame = encode(record)
        with self._cond:
            self._check_open()
            if op_id in self._ops:
                raise JournalError(f"operation {op_id} is already in flight")
            if key is not None:
                self._reserve(key, payload_hash(record.payload), op_id, record.at)
            try:
                self._commit(frame, record)
            except BaseException:
                if key is not None and op_id not in self._ops:
                    self._keys.pop(key, None)  # release the reservation: nothing was recorded
                raise
        return op_id

    def task(self, op_id: str, upid: str) -> None:
        """Record the UPID the Proxmox call returned."""
        self._append_for(op_id, TaskStarted(op_id=op_id, upid=upid, at=self._clock()))

    def end(self, op_id: str, outcome: Outcome, error: str = "") -> None:
        """Record how the operation ended."""
        self._append_for(op_id, Ended(op_id=op_id, outcome=outcome, error=error, at=self._clock()))

    def _append_for(self, op_id: str, record: TaskStarted | Ended) -> None:
        frame = encode(record)
        with self._cond:
            self._check_open()
            if op_id not in self._ops:
                raise JournalError(f"operation {op_id} is not in flight")
            self._commit(frame, record)

    # --- queries ------------------------------------------------------------------------------

    def in_flight(self) -> list[InFlight]:
        """Operations begun and not ended, oldest first."""
        with self._cond:
            return sorted(self._ops.values(), key=lambda op: op.begun_at)

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
            return list(self._recent)[-limit:] if limit > 0 else []

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
            segments.close_quietly(self._fd)
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

    def _live_key(self, key: str) -> _KeyState | None:
        state = self._keys.get(key)
        if state is not None and state.outcome is not None and self._clock() - state.at > self._retention:
            return None
        return state

    def _reserve(self, key: str, digest: str, op_id: str, at: float) -> None:
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
        self._keys[key] = _KeyState(digest, op_id, None, at)

    def _commit(self, frame: bytes, record: Record) -> None:
        """Queue ``frame`` and return once it is durable (leading the sync if nobody is)."""
        self._pending.append((frame, record))
        self._queued += 1
        ticket = self._queued
        while self._durable < ticket:
            self._check_open()
            if self._leading:
                self._cond.wait()
            else:
                self._lead()

    def _lead(self) -> None:
        """Write and sync every queued frame with the lock released, then publish them."""
        batch, upto = self._pending, self._queued
        self._pending = []
        self._leading = True
        error: OSError | None = None
        self._cond.release()
        try:
            self._size += segments.write_all(self._fd, b"".join(frame for frame, _ in batch))
            self._syncs += 1
            self._appends += len(batch)
        except OSError as exc:
            error = exc
        finally:
            self._cond.acquire()
            self._leading = False
            self._cond.notify_all()
        if error is not None:
            self._failure = error
            raise JournalWriteError(f"journal {self.directory}: write failed, journal now refuses writes: "
                                    f"{error.strerror or error}") from error
        for _, record in batch:
            self._apply(record)
        self._durable = upto
        if self._size > self._segment_bytes:
            self._compact()

    def _apply(self, record: Record) -> None:
        """Fold a durable record into the in-memory state (idempotent, for replay)."""
        self._recent.append(record)
        match record:
            case Begun():
                self._ops[record.op_id] = InFlight(op_id=record.op_id, vmid=record.vmid, kind=record.kind,
                                                   payload=record.payload, key=record.key, begun_at=record.at)
                if record.key is not None:
                    self._keys[record.key] = _KeyState(payload_hash(record.payload), record.op_id, None, record.at)
            case TaskStarted():
                if (op := self._ops.get(record.op_id)) is not None:
                    self._ops[record.op_id] = replace(op, upid=record.upid)
            case Ended():
                op = self._ops.pop(record.op_id, None)
                if op is not None and op.key is not None:
                    if record.outcome is Outcome.FAILED:
                        self._keys.pop(op.key, None)  # a failed one-shot may be retried
                    else:
                        self._keys[op.key] = _KeyState(payload_hash(op.payload), op.op_id, record.outcome,
                                                       record.at)
            case Applied():
                self._keys[record.key] = _KeyState(record.payload_hash, record.op_id, record.outcome, record.at)

    def _compact(self) -> None:
        """Start a new segment holding only what recovery and idempotency need; drop the old ones.

        The snapshot is written to a temporary file, synced and renamed before any old segment is
        removed: a crash at any point leaves either the old segments or the new one (or both,
        which replay folds idempotently).
        """
        now = self._clock()
        live: list[Record] = []
        for op in sorted(self._ops.values(), key=lambda o: o.begun_at):
            live.append(Begun(op_id=op.op_id, vmid=op.vmid, kind=op.kind, payload=op.payload, key=op.key,
                              at=op.begun_at))
            if op.upid is not None:
                live.append(TaskStarted(op_id=op.op_id, upid=op.upid, at=op.begun_at))
        for key, state in list(self._keys.items()):
            if state.outcome is None:
                continue
            if now - state.at > self._retention:
                del self._keys[key]
                continue
            live.append(Applied(key=key, payload_hash=state.payload_hash, op_id=state.op_id, outcome=state.outcome,
                                at=state.at))
        try:
            fd, size = segments.rotate(self.directory, self._sequence + 1, b"".join(encode(r) for r in live))
        except OSError as exc:
            self._failure = exc
            raise JournalWriteError(f"journal {self.directory}: compaction failed, journal now refuses writes: "
                                    f"{exc.strerror or exc}") from exc
        segments.close_quietly(self._fd)
        self._fd, self._size, self._sequence = fd, size, self._sequence + 1
        segments.remove_before(self.directory, self._sequence)

