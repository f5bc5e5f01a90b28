"""The journal: an fsync'd, checksummed, self-compacting log of operations and idempotency keys.

Every append returns only once its bytes are on disk (``fdatasync``). Concurrent appends are
group-committed (``journal.commit``). A failed write or sync poisons the journal: it refuses every
later write, since a retried fsync can report success for data the kernel already dropped.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from journal import keys, segments
from journal.commit import GroupCommit
from journal.errors import (
    IdempotencyConflictError,
    JournalClosedError,
    JournalError,
    JournalInUseError,
    JournalOpenError,
    JournalWriteError,
    KeyInFlightError,
)
from journal.records import (
    BEGUN_PAYLOAD,
    FIELDS,
    Applied,
    Begun,
    Body,
    Ended,
    Outcome,
    Record,
    RefusalRecord,
    TaskStarted,
    encode_body,
    fields_of,
    payload_hash,
    record_of,
)
from journal.state import BURN_PREFIX, InFlight, KeyState, State, is_burn_key

DEFAULT_RETENTION = 7 * 24 * 3600.0
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
# The reason ``mark_ran`` writes: a later try of the same action is refused as a spent nonce would be.
RAN_REASON = "NONCE_SPENT"


class Journal:
    """The executor's memory across crashes. Use ``Journal.open(directory)``; thread-safe."""

    def __init__(self, directory: Path, segment: segments.ActiveSegment, lock_fd: int, sequence: int, state: State, *,
                 retention: float, segment_bytes: int, clock: Callable[[], float]) -> None:
        self.directory = directory
        self._segment, self._lock_fd, self._sequence = segment, lock_fd, sequence
        self._retention, self._segment_bytes, self._clock = retention, segment_bytes, clock
        self._state = state
        self._cond = threading.Condition()
        # A lambda, not the bound method: compaction replaces the segment.
        self._group = GroupCommit(self._cond, lambda data: self._segment.append(data), self._publish)  # noqa: PLW0108
        self._closed = False
        self._beginning: set[str] = set()  # op ids whose begun record is being written (the lock is released then)
        self._snapshot_bytes = 0  # the last compaction's snapshot: compact again only once it has doubled

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
            raise JournalInUseError(f"journal {path} is in use by another process") from exc
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
        payload (IdempotencyConflictError). A burn key (``op:...``) is spent by this record: once it
        ended, whatever the outcome, it raises NonceSpentError until the retention window passes.
        """
        op_id, at = op_id or os.urandom(16).hex(), self._clock()
        body = fields_of(Begun(op_id=op_id, vmid=vmid, kind=kind, payload=payload, key=key, at=at))
        frame = encode_body(body)
        with self._cond:
            self._check_open()
            # A caller's own id (a signed op's) may collide: refused like its key. Reserved until its record is
            # folded, as keys are: the commit releases the lock while it writes, and a second begun record under
            # an id in flight would make the first's end that of the second (and the second's end fail).
            if op_id in self._state.ops or op_id in self._beginning:
                raise KeyInFlightError(f"operation {op_id} is already in flight")
            if key is not None:
                canonical_payload = body[FIELDS][BEGUN_PAYLOAD]
                assert canonical_payload is not None
                self._reserve(key, payload_hash(canonical_payload), op_id, at)
            self._beginning.add(op_id)
            try:
                self._commit(frame, body)
            except BaseException:
                if key is not None and op_id not in self._state.ops:
                    self._state.keys.pop(key, None)  # release the reservation: nothing was recorded
                raise
            finally:
                self._beginning.discard(op_id)
        return op_id

    def task(self, op_id: str, upid: str) -> None:
        """Record the UPID the Proxmox call returned."""
        self._append_for(op_id, TaskStarted(op_id=op_id, upid=upid, at=self._clock()))

    def end(self, op_id: str, outcome: Outcome, error: str = "") -> None:
        """Record how the operation ended."""
        self._append_for(op_id, Ended(op_id=op_id, outcome=outcome, error=error, at=self._clock()))

    def burn(self, key: str, *, op_id: str, why: str) -> bool:
        """Spend the burn key ``key`` with no operation (a signed op refused for good); True when written.

        One durable record, the one compaction carries a spent key forward as (``Applied``, outcome
        FAILED): from then on ``begin`` and ``check_key`` raise NonceSpentError for ``key``, across
        restarts. A key already known (spent, or in flight: spent by its end) is left as it is.
        ``why`` is hashed as the record's payload (the refusal it comes from).
        """
        if not is_burn_key(key):
            raise ValueError(f"only a burn key ({BURN_PREFIX}...) can be burned, not {key!r}")
        record = Applied(key=key, payload_hash=payload_hash(why.encode()), op_id=op_id, outcome=Outcome.FAILED,
                         at=self._clock())
        body = fields_of(record)
        frame = encode_body(body)
        with self._cond:
            self._check_open()
            if self._live_key(key) is not None:
                return False
            # Reserved before the write, as keys are: a begin racing this burn meets the key already spent.
            self._state.keys[key] = KeyState(record.payload_hash, op_id, Outcome.FAILED, record.at)
            try:
                self._commit(frame, body)
            except BaseException:
                self._state.keys.pop(key, None)
                raise
        return True

    def refuse(self, *, vmid: int, kind: str, reason: str, detail: str = "", op_id: str | None = None,
               key: str | None = None) -> None:
        """Record, durably, that a step was refused (no operation begins; nothing is in flight).

        ``key`` names the refusal for ``last_refusal``; ``op_id`` is the signed op refused, if any.
        """
        self._refuse(RefusalRecord(vmid=vmid, kind=kind, reason=reason, detail=detail, op_id=op_id, key=key,
                             at=self._clock()), only_if_new=False)

    def mark_ran(self, *, vmid: int, kind: str, op_id: str, key: str, detail: str = "") -> None:
        """Record, durably, that signed op ``op_id``'s action ran, so the same action is refused from now on.

        Written as the refusal record it always was (reason ``RAN_REASON``, under the action's ``key``),
        so journals written before this call existed read the same; ``last_refusal(key)`` finds it.
        """
        self.refuse(vmid=vmid, kind=kind, reason=RAN_REASON, detail=detail, op_id=op_id, key=key)

    def refuse_if_new(self, *, vmid: int, kind: str, reason: str, key: str, detail: str = "",
                      op_id: str | None = None) -> bool:
        """``refuse`` unless ``key``'s last refusal had the same reason; True when it was written.

        How a refusal is journaled when first seen and when its reason changes, not on every tick
        (atomic: of two threads with the same new refusal, one writes it).
        """
        return self._refuse(RefusalRecord(vmid=vmid, kind=kind, reason=reason, detail=detail, op_id=op_id, key=key,
                                    at=self._clock()), only_if_new=True)

    def _refuse(self, record: RefusalRecord, *, only_if_new: bool) -> bool:
        if record.key == "":
            raise ValueError("a refusal key must not be empty (None for no key)")
        body = fields_of(record)
        frame = encode_body(body)
        with self._cond:
            self._check_open()
            if record.key is None:
                self._commit(frame, body)
                return True
            last = self._live_refusal(record.key)
            if only_if_new and last is not None and last[0] == record.reason:
                return False
            # Reserved before the write, as keys are: a second thread with the same refusal sees it.
            previous = self._state.refusals.get(record.key)
            self._state.refusals[record.key] = body
            try:
                self._commit(frame, body)
            except BaseException:
                if previous is None:
                    self._state.refusals.pop(record.key, None)
                else:
                    self._state.refusals[record.key] = previous
                raise
        return True

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

    def check_key(self, key: str, payload: Mapping[str, Any] | None = None) -> None:
        """Raise what ``begin(key=key, payload=payload)`` would raise for the key, writing nothing.

        The read-only look-up before an op is queued (NonceSpentError, KeyInFlightError...).
        Without ``payload``, payloads are not compared.
        """
        digest = payload_hash(payload) if payload is not None else None
        with self._cond:
            error = keys.refusal(key, self._live_key(key), digest)
        if error is not None:
            raise error

    def last_refusal(self, key: str) -> tuple[str, str] | None:
        """(reason, detail) of the last refusal journaled under ``key`` within the retention window."""
        with self._cond:
            last = self._live_refusal(key)
        return None if last is None else (last[0], last[1])

    def keys_of(self, op_id: str) -> dict[str, KeyState]:
        """The burn keys (nonces) operation ``op_id`` holds in flight or spent within the retention window, by key,
        oldest first: how a signed op's end is found once its records left ``recent`` (no scan: an index)."""
        with self._cond:
            return {key: state for key in self._state.burns_of(op_id) if (state := self._live_key(key)) is not None}

    def refusals_of(self, op_id: str) -> list[RefusalRecord]:
        """The last refusal under each key whose refusal names operation ``op_id``, within the retention window,
        oldest first (no scan: an index)."""
        with self._cond:
            bodies = [body for key, body in self._state.refusals_of(op_id) if self._live_refusal(key) is not None]
        return [record for body in bodies if isinstance(record := record_of(body), RefusalRecord)]

    def recent(self, limit: int = 100) -> list[Record]:
        """The last ``limit`` records, oldest first."""
        with self._cond:
            bodies = list(self._state.recent)[-limit:] if limit > 0 else []
        return [record_of(body) for body in bodies]

    @property
    def stats(self) -> tuple[int, int]:
        """(records appended, syncs) since open: appends per sync shows the group commit at work."""
        return self._group.appends, self._group.syncs

    @property
    def high_water(self) -> float:
        """The largest record time (``at``) this journal has seen, replayed or appended: never goes back.

        Survives reopen and compaction; 0.0 for an empty journal. The gate's clock is
        ``max(time.time(), journal.high_water - offset)`` (the offset of a ``clock-reset``, else 0).
        """
        with self._cond:
            return self._state.high_water

    @property
    def retention(self) -> float:
        """Seconds an ended key (and a spent nonce, and a refusal) is remembered."""
        return self._retention

    @property
    def failed(self) -> bool:
        """True once a write or sync failed: the journal takes no more writes."""
        return self._group.failure is not None

    def close(self) -> None:
        """Wait for a running sync, then close the files; later calls raise JournalClosedError."""
        with self._cond:
            while self._group.leading:
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
        if (failure := self._group.failure) is not None:
            raise JournalWriteError(f"journal {self.directory} failed earlier and takes no more writes: "
                                    f"{failure}") from failure

    def _live_key(self, key: str) -> KeyState | None:
        state = self._state.keys.get(key)
        if state is not None and state.outcome is not None and self._clock() - state.at > self._retention:
            return None
        return state

    def _live_refusal(self, key: str) -> tuple[str, str, float] | None:
        last = self._state.last_refusal(key)
        if last is not None and self._clock() - last[2] > self._retention:
            return None
        return last

    def _reserve(self, key: str, digest: bytes, op_id: str, at: float) -> None:
        error = keys.refusal(key, self._live_key(key), digest)
        if error is not None:
            raise error
        self._state.keys[key] = KeyState(digest, op_id, None, at)

    def _commit(self, frame: bytes, body: Body) -> None:
        self._group.commit(frame, body)

    def _publish(self, bodies: list[Body]) -> OSError | None:
        """Fold records now durable; compact when the segment has grown enough."""
        for body in bodies:
            self._state.apply(body)
        if self._segment.size > max(self._segment_bytes, 2 * self._snapshot_bytes):
            return self._compact()
        return None

    def _compact(self) -> OSError | None:
        """Start a new segment holding only what recovery and idempotency need; drop the old ones.

        Runs when the segment passes ``segment_bytes`` and twice the last snapshot: a live set
        larger than a segment then costs a compaction per doubling, not one per append.

        The snapshot is written to a temporary file, synced and renamed before any old segment is
        removed: a crash at any point leaves either the old segments or the new one (or both,
        which replay folds idempotently).
        """
        now = self._clock()
        live = self._state.live(lambda at: now - at > self._retention)
        snapshot = b"".join(encode_body(body) for body in live)
        try:
            segment = segments.rotate(self.directory, self._sequence + 1, snapshot)
        except OSError as exc:
            return exc
        self._snapshot_bytes = len(snapshot)
        self._segment.close()
        self._segment, self._sequence = segment, self._sequence + 1
        segments.remove_before(self.directory, self._sequence)
        return None

