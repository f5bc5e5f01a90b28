"""The scope check, before classification: an action may touch only what the desired state declared.

A start or stop only where a run state is declared, and in its direction; a config write only of
declared keys (and ``description`` when it is declared), only with the declared value, and a
delete only of a key declared blank; an undeclared guest, or any other kind, is out of scope of
desired state, whatever its class.

"The declared value" allows the spellings the planner writes: the same number, boolean or tag set
in another form, and text equal but for trailing whitespace and line endings. A property string
(``net0``, ``cpu``, ``agent``...) is in scope only when it *means* the declared fields laid over the
value the guest has now (the merge the planner does: a kept MAC, the fields the declaration does not
pin), both read with PVE's grammar: a write that drops a declared field (``firewall=1``, ``tag=10``)
or one the guest has is out of scope, however it is spelled. Any other value is the planner's
invention, and refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from safety import grammar
from safety.model import Action

_POWER = {"start": "running", "stop": "stopped"}
_CONFIG_KINDS = frozenset({"set_config"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Declaration:
    """What the desired state declares for one guest."""

    vmid: int
    state: str | None  # "running" | "stopped" | None: power not managed
    config_keys: frozenset[str] | None  # None: config not managed
    description: bool  # description managed
    values: Mapping[str, str] = field(default_factory=dict)  # the declared values (description included)


def out_of_scope(action: Action, declared: Declaration | None,
                 actual: Mapping[str, str] | None = None) -> str | None:
    """None when ``action`` stays inside what ``declared`` manages; otherwise why it does not.

    ``actual``: the config as read, for the fields a written property string may keep from it.
    """
    what = f"{action.kind} for guest {action.vmid}"
    if declared is None:
        return f"{what}: the guest is not declared in the desired state"
    if declared.vmid != action.vmid:
        return f"{what}: checked against the declaration of guest {declared.vmid}"
    wanted = _POWER.get(action.kind)
    if wanted is not None:
        return _power(what, wanted, declared)
    if action.kind in _CONFIG_KINDS:
        return _config(what, action, declared) or _values(what, action, declared, actual or {})
    return f"{what}: desired state never declares a {action.kind!r} action"


def _power(what: str, wanted: str, declared: Declaration) -> str | None:
    if declared.state is None:
        return f"{what}: the guest's run state is not managed"
    if declared.state != wanted:
        return f"{what}: the declared run state is {declared.state}"
    return None


def _config(what: str, action: Action, declared: Declaration) -> str | None:
    allowed = set(declared.config_keys or ())
    if declared.description:
        allowed.add("description")
    if declared.config_keys is None and not declared.description:
        return f"{what}: neither config nor description is managed"
    touched = set(action.set) | set(action.delete)
    extra = sorted(touched - allowed)
    if extra:
        return f"{what}: keys not declared: {', '.join(extra)}"
    return None


_TRUE, _FALSE = frozenset({"1", "on", "yes", "true"}), frozenset({"0", "off", "no", "false"})
_TAGS = re.compile(r"[;,\s]+")


def _values(what: str, action: Action, declared: Declaration, actual: Mapping[str, str]) -> str | None:
    """Each written value is a spelling of the declared one; a deleted key is declared blank."""
    for key, value in sorted(action.set.items()):
        wanted = declared.values.get(key)
        if wanted is not None and not same_value(wanted, value, actual.get(key), guest_type=action.guest_type,
                                                 key=key):
            return f"{what}: {key}: writes {value[:80]!r}, the declared value is {wanted[:80]!r}"
    for key in action.delete:
        wanted = declared.values.get(key)
        if wanted is not None and wanted.strip():
            return f"{what}: {key}: deletes a key declared as {wanted[:80]!r}"
    return None


def same_value(declared: str, written: str, actual: str | None, *, guest_type: str = "qemu", key: str = "") -> bool:
    """Whether ``written`` is a spelling of ``declared`` (a property string: laid over ``actual``)."""
    spec = grammar.key_spec(guest_type, key)
    if spec is not None and spec.format is not None:
        return _same_merge(spec.format, declared, written, actual)
    if _canon(declared) == _canon(written) or _text(declared) == _text(written):
        return True
    return _tags(declared) == _tags(written) and ";" in written


def _same_merge(fmt: str, declared: str, written: str, actual: str | None) -> bool:
    """``written`` means exactly the declared fields laid over ``actual``'s, by PVE's grammar."""
    if not declared.strip():
        return False  # declared blank is a delete, never a write
    try:
        merged = grammar.parse_format(fmt, actual) if actual is not None and actual.strip() else {}
        merged.update(grammar.parse_format(fmt, declared))
        return grammar.meaning(fmt, grammar.parse_format(fmt, written)) == grammar.meaning(fmt, merged)
    except grammar.UnreadableError:
        return False


def _canon(value: str) -> str:
    text = value.strip().lower()
    if text in _TRUE:
        return "1"
    if text in _FALSE:
        return "0"
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text
    return format(number.normalize(), "f") if number.is_finite() else text


def _text(value: str) -> str:
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip()


def _tags(value: str) -> frozenset[str]:
    return frozenset(t.lower() for t in _TAGS.split(value) if t)
