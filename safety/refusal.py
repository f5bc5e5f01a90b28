"""Typed refusals: why the safety core said no (docs/SAFETY.md §10), as one enum and one exception.

The names are ``executor.v1.RefusalReason`` without its ``REFUSAL_REASON_`` prefix, so the service edge
maps them by name. ``Refused`` is raised by pure checks (signature, payload, trust store, challenge) and
caught once by the gate, which journals and reports it.
"""

from __future__ import annotations

from enum import StrEnum


class RefusalReason(StrEnum):
    """Why an action or a signed op was refused; the value equals the name."""

    APPROVAL_REQUIRED = "APPROVAL_REQUIRED"
    MALFORMED = "MALFORMED"
    PAYLOAD_TYPE = "PAYLOAD_TYPE"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    KEY_EXPIRED = "KEY_EXPIRED"
    KEY_REVOKED = "KEY_REVOKED"
    OP_REVOKED = "OP_REVOKED"
    ROLE_DENIES = "ROLE_DENIES"
    THRESHOLD_NOT_MET = "THRESHOLD_NOT_MET"
    NOT_YET_VALID = "NOT_YET_VALID"
    EXPIRED = "EXPIRED"
    TTL_TOO_LONG = "TTL_TOO_LONG"
    WRONG_AUDIENCE = "WRONG_AUDIENCE"
    CLASS_MISMATCH = "CLASS_MISMATCH"
    BINDING_MISMATCH = "BINDING_MISMATCH"
    DIGEST_STALE = "DIGEST_STALE"
    LOCKED = "LOCKED"
    PROTECTED = "PROTECTED"
    CHALLENGE_INVALID = "CHALLENGE_INVALID"
    NONCE_SPENT = "NONCE_SPENT"
    NONCE_IN_FLIGHT = "NONCE_IN_FLIGHT"
    JOURNAL_UNAVAILABLE = "JOURNAL_UNAVAILABLE"
    TRUST_STORE_INVALID = "TRUST_STORE_INVALID"
    OUT_OF_SCOPE = "OUT_OF_SCOPE"
    UNKNOWN_KIND = "UNKNOWN_KIND"
    ROLLBACK = "ROLLBACK"
    FORK = "FORK"
    DOCUMENT_REVOKED = "DOCUMENT_REVOKED"
    VERSION_JUMP = "VERSION_JUMP"
    DEFERRED = "DEFERRED"


class Refused(Exception):  # noqa: N818 - a decision, not an error: "raise Refused(...)" reads as what happened
    """A refusal with its typed reason and a detail for the operator (never a secret)."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
