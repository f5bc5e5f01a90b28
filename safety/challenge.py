"""The executor challenge: ties a DESTRUCTIVE op to this executor and a fresh proposal (docs/SAFETY.md §6.4).

``challenge = issued_at "." hex(HMAC-SHA256(secret, sha256(action part) || issued_at))``. It is stateless,
like DPoP's server nonce: the executor keeps only its secret (state_dir/gate.secret) and recomputes the MAC.
Valid for one hour from issue, so approvals cannot be stockpiled; one executor's challenge does not verify
on another, whose secret differs. The action part is dumped by our own code with sorted keys, so the MAC
input is deterministic (this is a local MAC over our own encoding, not verification of foreign bytes).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping

from safety.refusal import RefusalReason, Refused

VALIDITY = 3600.0  # seconds
SKEW = 120.0  # an issue time this far ahead of now is tolerated (the same clock, read twice)
SECRET_BYTES = 32
_FORMAT = re.compile(r"([0-9]{1,12})\.([0-9a-f]{64})", re.ASCII)


def new_secret() -> bytes:
    """A fresh gate secret (32 random bytes) for state_dir/gate.secret."""
    return secrets.token_bytes(SECRET_BYTES)


def action_digest(action: Mapping[str, object]) -> bytes:
    """SHA-256 of the action part as our canonical JSON (sorted keys, compact, ASCII)."""
    encoded = json.dumps(action, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode("ascii")).digest()


def _mac(secret: bytes, action: Mapping[str, object], issued_at: int) -> str:
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"the gate secret must be at least {SECRET_BYTES} bytes")
    # The digest is fixed-length, so digest || decimal issued_at is unambiguous.
    return hmac.new(secret, action_digest(action) + str(issued_at).encode("ascii"), hashlib.sha256).hexdigest()


def issue(secret: bytes, action: Mapping[str, object], *, now: float) -> str:
    """A challenge for ``action`` (an ``action_of``/``action_part`` dict), issued at ``now``."""
    issued_at = int(now)
    return f"{issued_at}.{_mac(secret, action, issued_at)}"


def verify(secret: bytes, challenge: str, action: Mapping[str, object], *, now: float,
           validity: float = VALIDITY) -> None:
    """Raise Refused(CHALLENGE_INVALID) unless this executor issued ``challenge`` for ``action`` < 1 h ago."""
    match = _FORMAT.fullmatch(challenge)
    if match is None:
        raise Refused(RefusalReason.CHALLENGE_INVALID, "challenge is not <issued_at>.<64 hex>")
    issued_at = int(match[1])
    if not hmac.compare_digest(match[2], _mac(secret, action, issued_at)):
        raise Refused(RefusalReason.CHALLENGE_INVALID,
                      "challenge was not issued by this executor for this action (re-propose the op)")
    if issued_at > now + SKEW:
        raise Refused(RefusalReason.CHALLENGE_INVALID, f"challenge issued at {issued_at}, after now ({now:.0f})")
    if now - issued_at >= validity:
        raise Refused(RefusalReason.CHALLENGE_INVALID,
                      f"challenge issued at {issued_at} is {now - issued_at:.0f}s old (valid {validity:.0f}s)")
