"""The operator's documents (proposals, pending entries) and signed ops put into words a person checks.

A proposal is what ``op propose`` prints and ``op sign`` reads::

    {"action": {audience, vmid, guest_type, kind, params, class, precondition},
     "challenge": "<issued_at>.<64 hex>" | null, "class": ..., "rule": ..., "reasons": [...], "before": {...}}

``op sign`` also takes a ``pending --json`` entry (the same shape) and a ``plan --json`` "pending" entry
(the action part's fields at the top level, next to the step's ``action`` name and a ``challenge``).
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from safety import strictjson
from safety.opschema import plain
from safety.payload import OpPayload, action_of
from safety.refusal import Refused

ACTION_FIELDS = ("audience", "vmid", "guest_type", "kind", "params", "class", "precondition")


class OpError(Exception):
    """A command could not do what it was asked; ``code`` is its exit status (2: bad input, 1: refused)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True, kw_only=True)
class Proposal:
    """The unsigned action an operator signs and the executor's challenge for it (None: not issued)."""

    action: Mapping[str, object]
    challenge: str | None


def _field(doc: Mapping[str, object], name: str, where: str) -> object:
    if name not in doc:
        raise OpError(f"{where}: {name} is missing: give a proposal (op propose), a pending --json entry "
                      "or a plan --json pending entry")
    return doc[name]


def action_from(raw: Mapping[str, object], where: str) -> dict[str, object]:
    """The action part in ``raw``, checked and normalized as the executor builds it (params by the kind's schema)."""
    fields = {name: _field(raw, name, where) for name in ACTION_FIELDS}
    for name, kind in (("audience", str), ("guest_type", str), ("kind", str), ("class", str), ("vmid", int)):
        if type(fields[name]) is not kind:
            raise OpError(f"{where}.{name}: must be a {'string' if kind is str else 'integer'}")
    precondition = _object(fields["precondition"], f"{where}.precondition")
    digest, run_state = (_field(precondition, name, f"{where}.precondition") for name in ("digest", "run_state"))
    try:
        return action_of(audience=str(fields["audience"]), vmid=int(fields["vmid"]),  # type: ignore[call-overload]
                         guest_type=str(fields["guest_type"]), kind=str(fields["kind"]),
                         params=_object(fields["params"], f"{where}.params"), class_=str(fields["class"]),
                         digest=str(digest), run_state=str(run_state))
    except Refused as exc:
        raise OpError(f"{where}: {exc.detail}") from exc


def _object(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise OpError(f"{where}: must be an object")
    return value


def read_proposal(data: bytes, where: str) -> Proposal:
    """A proposal, pending entry or plan pending entry, parsed strictly (duplicate keys and floats refused)."""
    try:
        doc = strictjson.loads(data, what=where)
    except Refused as exc:
        hint = " (a list? give one entry, e.g. jq '.[0]')" if data.lstrip().startswith(b"[") else ""
        raise OpError(f"{exc.detail}{hint}") from exc
    nested = doc.get("action")
    action = action_from(nested if isinstance(nested, dict) else doc, f"{where}.action"
                         if isinstance(nested, dict) else where)
    challenge = doc.get("challenge")
    if challenge is not None and not isinstance(challenge, str):
        raise OpError(f"{where}.challenge: must be a string or null")
    return Proposal(action=action, challenge=challenge or None)


def proposal_document(action: Mapping[str, object], challenge: str | None, *, cls: str, rule: str,
                      reasons: list[str], before: Mapping[str, str], **extra: object) -> dict[str, object]:
    """The JSON document ``op propose``, ``op undo`` and ``pending --json`` print."""
    return {"action": dict(action), "challenge": challenge, "class": cls, "rule": rule, "reasons": reasons,
            "before": dict(sorted(before.items())), **extra}


def parse_action_json(data: bytes, where: str) -> dict[str, object]:
    """The executor's action part (ProposeOpResponse.action, a pending descriptor), strictly."""
    try:
        raw = strictjson.loads(data, what=where)
    except Refused as exc:
        raise OpError(f"the executor sent a bad action: {exc.detail}", code=1) from exc
    return action_from(raw, where)


# --- words ---------------------------------------------------------------------------------------

VERBS: Mapping[str, str] = {
    "guest.destroy": "DESTROY guest",
    "guest.template": "CONVERT TO A TEMPLATE (irreversible) guest",
    "guest.migrate": "MIGRATE guest",
    "config.disk_detach": "DETACH DISKS of guest",
    "config.unused_delete": "DELETE UNUSED VOLUMES of guest",
    "config.protection_off": "TURN OFF PROTECTION of guest",
    "config.guest_credentials": "CHANGE WHO LOGS IN (cloud-init) to guest",
    "config.nic_firewall_off": "TURN OFF A NIC'S FIREWALL of guest",
    "config.guest_identity": "CHANGE THE IDENTITY (vmgenid, SMBIOS uuid) of guest",
    "config.unreadable": "WRITE A VALUE PVE'S GRAMMAR DOES NOT READ AS WE DO to guest",
    "disk.resize": "GROW A DISK of guest",
    "disk.move": "MOVE A DISK of guest",
    "disk.move_delete": "MOVE A DISK AND DELETE ITS SOURCE of guest",
    "disk.reassign": "HAND A DISK TO ANOTHER GUEST from guest",
    "snapshot.create": "TAKE A SNAPSHOT of guest",
    "snapshot.rollback": "ROLL BACK (losing all state since the snapshot) guest",
    "snapshot.delete": "DELETE A SNAPSHOT of guest",
    "start": "START guest",
    "stop": "STOP guest",
    "op.revoke": "REVOKE A SIGNED OP for guest",
}


_HIDDEN = frozenset({"Cc", "Cf", "Co", "Cs", "Zl", "Zp"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")  # Hangul fillers: letters that print as nothing


def visible(text: str) -> str:
    """``text`` with every character a terminal would hide or draw blank escaped: the signer sees what is signed."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in _HIDDEN or c in _BLANK_LETTERS else c
                   for c in text)


def _size(value: object) -> str:
    number = int(str(value))
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if number >= 1 << shift:
            return f"to {number / (1 << shift):g} {unit} ({number} bytes)"
    return f"to {number} bytes"


def _set(value: object) -> str:
    assert isinstance(value, dict)
    return "set " + "; ".join(f"{key}={visible(str(item))}" for key, item in value.items()) if value else ""


def _delete(value: object) -> str:
    assert isinstance(value, list)
    return "remove " + ", ".join(str(item) for item in value) if value else ""


PARAM_WORDS: Mapping[str, Callable[[object], str]] = {"size": _size, "set": _set, "delete": _delete}


def _param(name: str, value: object) -> str:
    render = PARAM_WORDS.get(name)
    if render is not None:
        return render(value)
    label = name.replace("_", " ")
    if isinstance(value, bool):
        return f"{label}={'yes' if value else 'NO'}"
    return f"{label} {visible(str(value))}"


def action_words(action: Mapping[str, object]) -> str:
    """One line: the verb, the guest and where, then each parameter (``DESTROY guest 105 (qemu) on ...``)."""
    kind = str(action["kind"])
    verb = VERBS.get(kind) or (f"CHANGE THE CONFIG ({kind}) of guest" if kind.startswith("config") else
                               f"{kind.upper()} guest")
    params = plain(action["params"])
    assert isinstance(params, dict)
    words = [f"{verb} {action['vmid']} ({action['guest_type']}) on {action['audience']}"]
    words += [text for name, value in params.items() if (text := _param(name, value))]
    return ", ".join(words)


def when(seconds: float) -> str:
    """A Unix time as ``2025-11-27 10:55 UTC``."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def summary(payload: OpPayload, *, now: float) -> str:
    """What a signer checks before signing: the action, its precondition, its window, role and reason."""
    action = {"audience": payload.audience, "vmid": payload.vmid, "guest_type": payload.guest_type,
              "kind": payload.kind, "params": payload.params}
    left = max(0, round((payload.not_after - now) / 60))
    digest = payload.precondition.digest
    planned = ("bound to no config version" if digest == "0" * 40 else
               f"planned from config digest {digest[:8]}... while {payload.precondition.run_state}")
    return "\n".join([
        action_words(action),
        f"  class {payload.class_}, {planned}",
        f"  valid {left} min, until {when(payload.not_after)}; role {payload.role}; op {payload.op_id}",
        f"  challenge {'from the executor' if payload.challenge else 'none'}; reason: {visible(payload.reason)}",
    ])


def api_error(exc: Exception) -> str:
    """A gRPC failure as the operator reads it: the status and the server's details."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    status = code().name if callable(code) else "ERROR"
    return f"executor API: {status}: {details() if callable(details) else exc}"


def refusal_text(exc: Refused) -> str:
    """A refusal as the operator reads it: the reason's name, then the detail."""
    return f"{exc.reason.value}: {exc.detail}"


__all__ = [
    "ACTION_FIELDS",
    "PARAM_WORDS",
    "VERBS",
    "OpError",
    "Proposal",
    "action_from",
    "action_words",
    "api_error",
    "parse_action_json",
    "proposal_document",
    "read_proposal",
    "refusal_text",
    "summary",
    "visible",
    "when",
]
