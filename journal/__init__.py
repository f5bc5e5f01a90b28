"""pve-reconcile journal: durable operation journal and idempotency store.

A leaf package: standard library only (checked by import-linter). The executor writes ``begun``
before each Proxmox call, ``task`` when the call returned a UPID and ``ended`` when it is done;
``in_flight()`` is what it re-checks on restart; ``already_applied(key)`` keeps one-shot
operations from running twice, and a burn key (``op:<op_id>``) is a nonce no outcome releases
(``NonceSpentError``); ``burn(key)`` spends one with no operation (a signed op refused for good).
``refuse()`` records a refused step; ``high_water`` is the largest record time seen, the floor of
the gate's clock.
"""

from journal.errors import (
    AlreadyAppliedError,
    IdempotencyConflictError,
    IdempotencyError,
    JournalClosedError,
    JournalCorruptError,
    JournalError,
    JournalInUseError,
    JournalOpenError,
    JournalWriteError,
    KeyInFlightError,
    NonceSpentError,
    OutcomeUnknownError,
)
from journal.records import Applied, Begun, Ended, Outcome, Record, RefusalRecord, TaskStarted
from journal.state import BURN_PREFIX, InFlight, KeyState, is_burn_key
from journal.store import Journal

__all__ = [
    "BURN_PREFIX", "AlreadyAppliedError", "Applied", "Begun", "Ended", "IdempotencyConflictError", "IdempotencyError",
    "InFlight", "Journal", "JournalClosedError", "JournalCorruptError", "JournalError", "JournalInUseError",
    "JournalOpenError", "JournalWriteError", "KeyInFlightError", "KeyState", "NonceSpentError", "Outcome",
    "OutcomeUnknownError",
    "Record", "RefusalRecord", "TaskStarted", "is_burn_key",
]
