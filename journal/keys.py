"""The idempotency rules: what a ``begin`` under a key that is already known must raise.

Ordinary keys: refused while in flight, after ok and after an unknown outcome; released by a
failure (a failed one-shot may run again); another payload under the same key is a conflict.
Burn keys (``op:...``, the nonces of signed operations): spent by their ``begin``; refused while
in flight and after any outcome, whatever the payload.
"""

from __future__ import annotations

from journal.errors import (
    AlreadyAppliedError,
    IdempotencyConflictError,
    IdempotencyError,
    KeyInFlightError,
    NonceSpentError,
    OutcomeUnknownError,
)
from journal.records import Outcome
from journal.state import KeyState, is_burn_key

# An ordinary key's refusal by how its operation ended (None: still in flight). FAILED is absent:
# a failure releases the key.
_REFUSALS: dict[Outcome | None, tuple[type[IdempotencyError], str]] = {
    None: (KeyInFlightError, "key {key!r} is in flight as operation {op}"),
    Outcome.OK: (AlreadyAppliedError, "key {key!r} was applied by operation {op}"),
    Outcome.UNKNOWN: (OutcomeUnknownError, "key {key!r}: operation {op} ended with an unknown outcome"),
}


def refusal(key: str, known: KeyState | None, digest: bytes | None) -> IdempotencyError | None:
    """The error a ``begin`` under ``key`` meets, given what the journal knows of it (None: it may begin).

    ``known`` is the key's live state (None when unknown or out of the retention window); ``digest``
    the new payload's hash (None: do not compare payloads).
    """
    if not key:
        raise ValueError("an idempotency key must not be empty")
    if known is None:
        return None
    if is_burn_key(key):
        if known.outcome is None:
            return KeyInFlightError(f"key {key!r} is in flight as operation {known.op_id}")
        return NonceSpentError(key, known.op_id, known.outcome)
    if digest is not None and digest != known.payload_hash:
        return IdempotencyConflictError(f"key {key!r} was used with a different payload")
    if (rule := _REFUSALS.get(known.outcome)) is None:
        return None
    error, message = rule
    return error(message.format(key=key, op=known.op_id))
