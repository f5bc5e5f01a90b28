"""The desired guests of two document versions, compared guest by guest and key by key."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from desiredfile.parse import Declared, DesiredFileError, parse
from hub.store import Version
from safety import desireddoc
from safety.refusal import Refused

ABSENT = None  # a key the version does not declare: shown as <absent>


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One key of one guest: its value before and after (None: not declared)."""

    key: str
    old: str | None
    new: str | None


@dataclass(frozen=True, slots=True)
class GuestChange:
    """One guest whose declaration changed: added, removed or changed, with its keys."""

    vmid: int
    kind: str  # added | removed | changed
    keys: tuple[KeyChange, ...]


@dataclass(frozen=True, slots=True)
class Declaration:
    """A version's desired guests by vmid (key -> value), or why its text does not parse."""

    text: str
    guests: Mapping[int, Mapping[str, str]]
    problem: str = ""


def flatten(guest: Declared) -> dict[str, str]:
    """A declared guest as key -> value: ``state``, ``description`` and each config key (unmanaged: left out)."""
    keys: dict[str, str] = dict(guest.config or {})
    if guest.state is not None:
        keys["state"] = guest.state
    if guest.description is not None:
        keys["description"] = guest.description
    return keys


def declaration(envelope: bytes, name: str) -> Declaration:
    """The desired guests inside a stored envelope (read, not verified: the nodes verify)."""
    try:
        text = desireddoc.parse_payload(desireddoc.parse_envelope(envelope).payload).desired
    except Refused as exc:
        return Declaration(text="", guests={}, problem=f"the envelope does not parse: {exc.detail}")
    try:
        return Declaration(text=text, guests={g.vmid: flatten(g) for g in parse(text, name)})
    except DesiredFileError as exc:
        return Declaration(text=text, guests={}, problem=str(exc))


# Stored versions never change: a parsed one is kept (a 10,000-guest document takes a while to parse, and every
# open page asks again at each refresh). A few versions: the latest and the ones being compared.
_PARSED: OrderedDict[tuple[str, int, str], Declaration] = OrderedDict()
_PARSED_MAX = 8
_PARSED_LOCK = threading.Lock()


def of_version(version: Version) -> Declaration:
    """``declaration`` of a stored version, parsed once per process."""
    key = (version.cluster, version.version, version.sha256)
    with _PARSED_LOCK:
        if key in _PARSED:
            _PARSED.move_to_end(key)
            return _PARSED[key]
    found = declaration(version.envelope, f"version {version.version}")
    with _PARSED_LOCK:
        _PARSED[key] = found
        while len(_PARSED) > _PARSED_MAX:
            _PARSED.popitem(last=False)
    return found


def _keys(old: Mapping[str, str], new: Mapping[str, str]) -> tuple[KeyChange, ...]:
    return tuple(KeyChange(key, old.get(key), new.get(key)) for key in sorted({*old, *new})
                 if old.get(key) != new.get(key))


def compare(old: Mapping[int, Mapping[str, str]], new: Mapping[int, Mapping[str, str]]) -> list[GuestChange]:
    """Every guest whose declaration differs between ``old`` and ``new``, by vmid."""
    changes = []
    for vmid in sorted({*old, *new}):
        kind = "added" if vmid not in old else "removed" if vmid not in new else "changed"
        keys = _keys(old.get(vmid, {}), new.get(vmid, {}))
        if keys or kind != "changed":
            changes.append(GuestChange(vmid, kind, keys))
    return changes
