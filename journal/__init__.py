"""pve-reconcile journal: durable operation journal and idempotency store.

A leaf package: standard library only (checked by import-linter). The executor writes ``begun``
before each Proxmox call, ``task`` when the call returned a UPID and ``ended`` when it is done;
``in_flight()`` is what it re-checks on restart; ``already_applied(key)`` keeps one-shot
operations from running twice.
"""

from journal.errors import (
    AlreadyAppliedError,
    IdempotencyConflictError,
    IdempotencyError,
    JournalClosedError,
    JournalCorruptError,
    JournalError,
    JournalOpenError,
    JournalWriteError,
    KeyInFlightError,
    OutcomeUnknownError,
)
from journal.records import Applied, Begun, Ended, Outcome, Record, TaskStarted
from journal.state import InFlight
from journal.store import Journal

__all__ = [
    "AlreadyAppliedError", "Applied", "Begun", "Ended", "IdempotencyConflictError", "IdempotencyError",
    "InFlight", "Journal", "JournalClosedError", "JournalCorruptError", "JournalError", "JournalOpenError",
    "JournalWriteError", "KeyInFlightError", "Outcome", "OutcomeUnknownError", "Record", "TaskStarted",
]
