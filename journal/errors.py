"""The journal's errors: one root, so the executor can catch a journal problem as one thing."""

from __future__ import annotations

from journal.records import Outcome


class JournalError(Exception):
    """Any journal failure."""


class JournalOpenError(JournalError):
    """The journal cannot be opened (unwritable directory, disk full...): run journal-less."""


class JournalInUseError(JournalOpenError):
    """Another process (a running executor) holds the journal's lock."""


class JournalCorruptError(JournalOpenError):
    """A damaged record with valid records after it: never skipped silently.

    ``copy`` is where the damaged file was preserved before this was raised.
    """

    def __init__(self, path: str, offset: int, copy: str, reason: str) -> None:
        super().__init__(f"{path}: corrupt record at offset {offset} ({reason}); copy kept at {copy}")
        self.path, self.offset, self.copy = path, offset, copy


class JournalWriteError(JournalError):
    """A write or sync failed: the journal refuses every later write (a failed fsync is not retried)."""


class JournalClosedError(JournalError):
    """The journal was closed."""


class IdempotencyError(JournalError):
    """A one-shot operation that must not run (again) under this key."""


class AlreadyAppliedError(IdempotencyError):
    """An operation with this key ended ok."""


class KeyInFlightError(IdempotencyError):
    """An operation with this key is begun and not ended."""


class OutcomeUnknownError(IdempotencyError):
    """An operation with this key ended with an unknown outcome: it may have run; never re-run blindly."""


class IdempotencyConflictError(IdempotencyError):
    """The same key was used with a different payload."""


class NonceSpentError(IdempotencyError):
    """A burn key (``op:...``) was already used: its operation ran, failed or was cut short; never again.

    ``op_id`` is the operation that spent it and ``outcome`` how that ended.
    """

    def __init__(self, key: str, op_id: str, outcome: Outcome) -> None:
        super().__init__(f"key {key!r} is spent: operation {op_id} used it and ended {outcome.value}")
        self.key, self.op_id, self.outcome = key, op_id, outcome
