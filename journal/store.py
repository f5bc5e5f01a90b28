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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
    Applied,
    Ended,
    Outcome,
    Record,
    TaskStarted,
    encode_obj,
    from_json,
    payload_hash,
    to_json,
)

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


class _Waiter:
    """One queued record and how its thread learns the outcome."""

    __slots__ = ("error", "event", "frame", "lead", "obj")

    def __init__(self, frame: bytes, obj: dict[str, Any]) -> None:
        self.frame, self.obj = frame, obj
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


@dataclass(frozen=True, slots=True)
class _KeyState:
    """An idempotency key: its payload, its operation, and how that ended (None: in flight)."""

    payload_hash: str
    op_id: str
    outcome: Outcome | None
    at: float


class Journal:
    """The executor's memory across crashes. Use ``Journal.open(directory)``; thread-safe."""

    def __init__(self, directory: Path, segment: segments.ActiveSegment, lock_fd: int, sequence: int, *,
                 retention: float, segment_bytes: int, clock: Callable[[], float], keep_recent: int) -> None:
        self.directory = directory
        self._segment, self._lock_fd, self._sequence = segment, lock_fd, sequence
        self._retention, self._segment_bytes, self._clock = retention, segment_bytes, clock
        # State is kept as the records' JSON objects: replay folds them without building objects.
        self._ops: dict[str, dict[str, Any]] = {}
        self._upids: dict[str, str] = {}
        self._keys: dict[str, _KeyState] = {}
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep_recent)
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
            records, sequence = segments.recover(path)
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
        journal = cls(path, segment, lock_fd, sequence, retention=retention, segment_bytes=segment_bytes,
                      clock=clock, keep_recent=keep_recent)
        apply = journal._apply
        for obj in records:
            apply(obj)
        return journal

    # --- the operation lifecycle -----------------------------------------------------------

    def begin(self, *, vmid: int, kind: str, payload: Mapping[str, Any], key: str | None = None,
              op_id: str | None = None) -> str:
        """Record an operation about to run; return its id once durable.

        With ``key`` (one-shot operations), refuses a key that ended ok (AlreadyAppliedError), is
        in flight (KeyInFlightError), ended unknown (OutcomeUnknownError), or came with another
        payload (IdempotencyConflictError).
        """
        op_id, at = op_id or os.urandom(16).hex(), self._clock()
        obj = {"t": "begun", "op": op_id, "vmid": vmid, "kind": kind, "payload": dict(payload), "key": key, "at": at}
        frame = encode_obj(obj)
        with self._cond:
            self._check_open()
            if op_id in self._ops:
                raise JournalError(f"operation {op_id} is already in flight")
            if key is not None:
                self._reserve(key, payload_hash(payload), op_id, at)
            try:
                self._commit(frame, obj)
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
        obj = to_json(record)
        frame = encode_obj(obj)
        with self._cond:
            self._check_open()
            if op_id not in self._ops:
                raise JournalError(f"operation {op_id} is not in flight")
            self._commit(frame, obj)

    # --- queries ------------------------------------------------------------------------------

    def in_flight(self) -> list[InFlight]:
        """Operations begun and not ended, oldest first."""
        with self._cond:
            return [InFlight(op_id=op["op"], vmid=op["vmid"], kind=op["kind"], payload=op["payload"], key=op["key"],
                             begun_at=op["at"], upid=self._upids.get(op["op"]))
                    for op in sorted(self._ops.values(), key=lambda op: op["at"])]

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
            objects = list(self._recent)[-limit:] if limit > 0 else []
        return [from_json(obj) for obj in objects]

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

    def _commit(self, frame: bytes, obj: dict[str, Any]) -> None:
        """Queue ``frame`` and return once it is durable. Called with the lock held.

        Group commit: with nobody syncing, this thread leads: it writes and syncs everything
        queued, then hands the lead to the first thread that queued meanwhile. Every other thread
        sleeps on its own event and is woken once, when its record is durable (or the lead is
        handed to it), never by every sync.
        """
        waiter = _Waiter(frame, obj)
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
                self._apply(waiter.obj)
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

    def _apply(self, obj: dict[str, Any]) -> None:
        """Fold a durable record's JSON object into the in-memory state (idempotent, for replay)."""
        self._recent.append(obj)
        kind, keys = obj["t"], self._keys
        if kind == "begun":
            self._ops[obj["op"]] = obj
            if (key := obj["key"]) is not None:
                keys[key] = _KeyState(payload_hash(obj["payload"]), obj["op"], None, obj["at"])
        elif kind == "task":
            if obj["op"] in self._ops:
                self._upids[obj["op"]] = obj["upid"]
        elif kind == "ended":
            op = self._ops.pop(obj["op"], None)
            self._upids.pop(obj["op"], None)
            if op is not None and (key := op["key"]) is not None:
                if obj["outcome"] == Outcome.FAILED.value:
                    keys.pop(key, None)  # a failed one-shot may be retried
                else:
                    known = keys.get(key)
                    digest = known.payload_hash if known is not None else payload_hash(op["payload"])
                    keys[key] = _KeyState(digest, op["op"], Outcome(obj["outcome"]), obj["at"])
        elif kind == "applied":
            keys[obj["key"]] = _KeyState(obj["hash"], obj["op"], Outcome(obj["outcome"]), obj["at"])

    def _compact(self) -> OSError | None:
        """Start a new segment holding only what recovery and idempotency need; drop the old ones.

        The snapshot is written to a temporary file, synced and renamed before any old segment is
        removed: a crash at any point leaves either the old segments or the new one (or both,
        which replay folds idempotently).
        """
        now = self._clock()
        live: list[dict[str, Any]] = []
        for op in sorted(self._ops.values(), key=lambda o: o["at"]):
            live.append(op)
            if (upid := self._upids.get(op["op"])) is not None:
                live.append(to_json(TaskStarted(op_id=op["op"], upid=upid, at=op["at"])))
        for key, state in list(self._keys.items()):
            if state.outcome is None:
                continue
            if now - state.at > self._retention:
                del self._keys[key]
                continue
            live.append(to_json(Applied(key=key, payload_hash=state.payload_hash, op_id=state.op_id,
                                        outcome=state.outcome, at=state.at)))
        try:
            segment = segments.rotate(self.directory, self._sequence + 1, b"".join(encode_obj(o) for o in live))
        except OSError as exc:
            return exc
        self._segment.close()
        self._segment, self._sequence = segment, self._sequence + 1
        segments.remove_before(self.directory, self._sequence)
        return None

