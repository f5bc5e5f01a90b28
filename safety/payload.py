"""The signed op payload: strict parsing, encoding, the action part, the binding comparison (docs/SAFETY.md §6.2-§6.3).

The payload is parsed only after its exact bytes verified (``signedop.verify`` step 5). Every field is
required (``challenge`` may be null), every unknown field is refused, identifiers are ASCII, and only
``reason`` and config values may hold other characters.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from safety import opschema as s
from safety import strictjson
from safety.refusal import RefusalReason, Refused

VERSION = 1
GUEST_TYPES = frozenset({"qemu", "lxc"})
RUN_STATES = frozenset({"running", "stopped", "paused"})
TIME_MAX = 1 << 40  # epoch seconds; far beyond any real clock, small enough to stay exact
REASON_MAX = 1024
OP_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
DIGEST = re.compile(r"[0-9a-f]{40}", re.ASCII)
CHALLENGE = re.compile(r"[0-9]{1,12}\.[0-9a-f]{64}", re.ASCII)
FIELDS = ("v", "op_id", "audience", "vmid", "guest_type", "kind", "params", "class", "precondition",
          "challenge", "role", "not_before", "not_after", "reason")


@dataclass(frozen=True, slots=True, kw_only=True)
class Precondition:
    """The state the op was planned from: the config digest as read and the run state."""

    digest: str
    run_state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OpPayload:
    """One signed operation, as parsed from its verified bytes."""

    v: int
    op_id: str
    audience: str
    vmid: int
    guest_type: str
    kind: str
    params: Mapping[str, object]
    class_: str
    precondition: Precondition
    challenge: str | None
    role: str
    not_before: int
    not_after: int
    reason: str


def _choice(allowed: frozenset[str]) -> s.Validator:
    def check(path: str, value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise s.malformed(path, f"must be one of {sorted(allowed)}")
        return value
    return check


def _version(path: str, value: object) -> int:
    if type(value) is not int or value != VERSION:
        raise s.malformed(path, f"must be {VERSION}")
    return value


_CHALLENGE_TEXT = s.text(CHALLENGE, "null or <issued_at>.<64 hex>")
_DIGEST_TEXT = s.text(DIGEST, "40 lowercase hex (the config digest)")


def _challenge(path: str, value: object) -> object:
    return None if value is None else _CHALLENGE_TEXT(path, value)


def _reason(path: str, value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= REASON_MAX:
        raise s.malformed(path, f"must be a string of 1..{REASON_MAX} characters")
    # Control and format characters (NUL, bidi overrides, zero-width) could make a signer read another text.
    if not value.isascii() or not value.isprintable():
        bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cf")), None)
        if bad is not None:
            raise s.malformed(path, f"holds the control or format character U+{ord(bad):04X}")
    return value


def _precondition(path: str, value: object) -> Precondition:
    if not isinstance(value, dict) or set(value) != {"digest", "run_state"}:
        raise s.malformed(path, "must be an object with exactly digest and run_state")
    digest: Any = _DIGEST_TEXT(f"{path}.digest", value["digest"])
    run_state: Any = _choice(RUN_STATES)(f"{path}.run_state", value["run_state"])
    return Precondition(digest=digest, run_state=run_state)


_TIME = s.integer(0, TIME_MAX)
_VALIDATORS: dict[str, s.Validator] = {
    "v": _version,
    "op_id": s.text(OP_ID, "32 lowercase hex"),
    "audience": s.text(s.AUDIENCE, "an ASCII node[@cluster] name"),
    "vmid": s.integer(s.VMID_MIN, s.VMID_MAX),
    "guest_type": _choice(GUEST_TYPES),
    "kind": s.text(s.KIND, "an ASCII op kind such as guest.destroy"),
    "class": _choice(s.SIGNABLE_CLASSES),
    "precondition": _precondition,
    "challenge": _challenge,
    "role": s.text(s.ROLE, "an ASCII role name"),
    "not_before": _TIME,
    "not_after": _TIME,
    "reason": _reason,
}


def parse_payload(data: bytes) -> OpPayload:
    """The payload in ``data``, strictly; Refused(MALFORMED or UNKNOWN_KIND) names the field at fault."""
    raw = strictjson.loads(data, what="payload")
    values = s.checked_fields(raw, FIELDS, _VALIDATORS, "payload")
    params = s.canonical_params(values["kind"], raw["params"], path="payload.params")
    if values["not_after"] <= values["not_before"]:
        raise s.malformed("payload.not_after", "must be later than not_before")
    class_ = values.pop("class")
    return OpPayload(params=params, class_=class_, **values)


def to_json(payload: OpPayload) -> bytes:
    """The payload as UTF-8 JSON (sorted keys, compact): what a signer signs. Verification never calls this."""
    document = {**action_part(payload), "v": payload.v, "op_id": payload.op_id, "challenge": payload.challenge,
                "role": payload.role, "not_before": payload.not_before, "not_after": payload.not_after,
                "reason": payload.reason}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def action_of(*, audience: str, vmid: int, guest_type: str, kind: str, params: Mapping[str, object], class_: str,
              digest: str, run_state: str) -> dict[str, object]:
    """The action part as plain JSON values, params normalized by the kind's schema (the proposer and gate build it).

    Unlike a signed payload, a live step may list keys in any order: lists are sorted here before the check.
    """
    raw = s.plain(params)
    assert isinstance(raw, dict)
    ordered = {name: sorted(value) if isinstance(value, list) else value for name, value in raw.items()}
    return {"audience": audience, "vmid": vmid, "guest_type": guest_type, "kind": kind,
            "params": s.plain(s.canonical_params(kind, ordered)), "class": class_,
            "precondition": {"digest": digest, "run_state": run_state}}


def action_part(payload: OpPayload) -> dict[str, object]:
    """What the challenge and the gate bind: audience, vmid, guest type, kind, params, class, precondition."""
    return {"audience": payload.audience, "vmid": payload.vmid, "guest_type": payload.guest_type,
            "kind": payload.kind, "params": s.plain(payload.params), "class": payload.class_,
            "precondition": {"digest": payload.precondition.digest, "run_state": payload.precondition.run_state}}


# Compared in this order, so a kind or class change is named as such before the digest or params differ.
_BINDING = (
    ("audience", RefusalReason.WRONG_AUDIENCE),
    ("vmid", RefusalReason.BINDING_MISMATCH),
    ("guest_type", RefusalReason.BINDING_MISMATCH),
    ("kind", RefusalReason.BINDING_MISMATCH),
    ("class", RefusalReason.CLASS_MISMATCH),
    ("digest", RefusalReason.DIGEST_STALE),
    ("params", RefusalReason.BINDING_MISMATCH),
    ("run_state", RefusalReason.BINDING_MISMATCH),
)


def _flat(action: Mapping[str, object]) -> dict[str, object]:
    precondition = action["precondition"]
    assert isinstance(precondition, Mapping)
    return {**action, "params": s.plain(action["params"]), **precondition}


def check_binding(payload: OpPayload, expected: Mapping[str, object]) -> None:
    """The signed action equals ``expected`` (an ``action_of`` for the live step and fresh facts), by meaning.

    Typed fields are compared, never bytes (docs/SAFETY.md §6.3). Raises Refused naming the first field that differs.
    """
    signed, live = _flat(action_part(payload)), _flat(expected)
    for name, reason in _BINDING:
        if signed[name] != live[name]:
            raise Refused(reason, f"{name}: signed {_short(signed[name])}, live {_short(live[name])}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
