"""A declared config key and value, checked against PVE's own API schema before anything is planned.

The schema is ``safety.pvegrammar_data`` (generated from PVE's apidoc), read through ``safety.grammar``:
the key must be a config key of the guest's type (``net0`` is found as ``net[n]``), not an argument of the
config write (``digest``, ``delete``, ``skiplock``...) nor a key PVE sets itself; its value must have the
key's type, range, enum, pattern and length, and a property string must parse as PVE parses it. A blank
value is a delete and only the key is checked. Each function returns the reason as text (None: fine), so a
caller can collect every mistake of a file and report them at once.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation

from safety.grammar import KeySpec as Spec
from safety.grammar import UnreadableError, key_spec, parse_format, schema_keys
from safety.pvegrammar_data import FORMATS

GUEST_TYPES = ("qemu", "lxc")
_TRUE_FALSE = frozenset({"0", "1", "on", "off", "yes", "no", "true", "false"})
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_NUMBERED = re.compile(r"(.*?)([0-9]+)", re.ASCII)

# Keys PVE's schema lets a write name that a desired file must not declare (the planner refuses them too).
DECLARED_ELSEWHERE: Mapping[str, str] = {
    "description": "declare it as the guest's `description:` (beside `config:`)",
    "lock": "set by PVE while a task runs; it cannot be declared",
}
# Why an argument of PVE's config write is not a config key, where there is more to say than that.
PARAMETER_WHY: Mapping[str, str] = {
    "digest": "the executor conditions each write on the digest it read",
    "delete": "a key set to null (`key: ~`) is deleted",
    "vmid": "the guest's vmid is its `vmid:` field",
}


def key_problem(guest_types: Iterable[str], key: str, value: str) -> str | None:
    """Why ``key: value`` is no config a guest of any of ``guest_types`` takes; None when one takes it."""
    types = tuple(guest_types)
    specs = [spec for t in types if (spec := key_spec(t, key)) is not None]
    if not specs:
        return unknown_key(types, key)
    for check in (_parameter, _read_only, _elsewhere):
        problem = check(key, specs[0])
        if problem is not None:
            return problem
    if value == "":
        return None  # a delete: only the key matters
    problems = [value_problem(key, spec, value) for spec in specs]
    # Fine for one type is fine (the file does not say which type a guest is; check_types knows later);
    # else the plainest of the reasons.
    found = [p for p in problems if p is not None]
    return None if len(found) < len(problems) else min(found, key=lambda p: (len(p), p))


def unknown_key(guest_types: Iterable[str], key: str) -> str:
    """The message for a key no guest type has, with the closest key of the schema when there is one."""
    types = tuple(guest_types)
    numbered = _NUMBERED.fullmatch(key)
    number = numbered.group(2) if numbered else "0"
    names = {name.replace("[n]", number) for t in types for name, spec in schema_keys(t).items()
             if spec.writable and not spec.parameter and name not in DECLARED_ELSEWHERE}
    close = difflib.get_close_matches(key, sorted(names), n=1)
    of = f" of a {types[0]} guest" if len(types) == 1 else ""
    return f"not a Proxmox config key{of}" + (f"; did you mean `{close[0]}`?" if close else "")


def _parameter(key: str, spec: Spec) -> str | None:
    if not spec.parameter:
        return None
    why = PARAMETER_WHY.get(key)
    return "reserved: a parameter of PVE's config write, not a config key" + (f" ({why})" if why else "")


def _read_only(key: str, spec: Spec) -> str | None:
    return None if spec.writable else "read-only: PVE sets it and no write takes it"


def _elsewhere(key: str, spec: Spec) -> str | None:
    return DECLARED_ELSEWHERE.get(key)


def value_problem(key: str, spec: Spec, value: str) -> str | None:
    """Why PVE would refuse ``value`` for the key ``spec`` describes; None when it takes it."""
    if any(c in value for c in "\n\r\x00"):
        return "the value holds a line break or NUL, which PVE refuses"
    if spec.max_length is not None and len(value) > spec.max_length:
        return f"longer than PVE's {spec.max_length} characters"
    problem = TYPE_CHECKS.get(spec.type, _no_check)(spec, value)
    if problem is None and spec.enum and value not in spec.enum:
        problem = f"must be one of {', '.join(spec.enum)}, got {value!r}"
    if problem is None and spec.pattern is not None and not re.fullmatch(spec.pattern, value, re.ASCII):
        problem = f"{value!r} does not match PVE's pattern {spec.pattern}"
    if problem is None and spec.format is not None:
        problem = property_problem(spec.format, value)
    return problem


def _no_check(spec: Spec, value: str) -> str | None:
    return None


def _boolean(spec: Spec, value: str) -> str | None:
    return None if value.lower() in _TRUE_FALSE else f"must be a boolean (true/false, 1/0), got {value!r}"


def _integer(spec: Spec, value: str) -> str | None:
    if not _INTEGER.fullmatch(value):
        return f"must be an integer{_range_note(spec)}, got {value!r}"
    return _range(Decimal(value), spec.minimum, spec.maximum, value)


def _number(spec: Spec, value: str) -> str | None:
    try:
        number = Decimal(value)
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():
        return f"must be a number{_range_note(spec)}, got {value!r}"
    return _range(number, spec.minimum, spec.maximum, value)


TYPE_CHECKS: Mapping[str, Callable[[Spec, str], str | None]] = {
    "boolean": _boolean, "integer": _integer, "number": _number}


def _range_words(minimum: object, maximum: object) -> str:
    if minimum is not None and maximum is not None:
        return f"from {minimum} to {maximum}"
    return f"at least {minimum}" if minimum is not None else f"at most {maximum}"


def _range_note(spec: Spec) -> str:
    has_range = spec.minimum is not None or spec.maximum is not None
    return f" ({_range_words(spec.minimum, spec.maximum)})" if has_range else ""


def _range(number: Decimal, minimum: object, maximum: object, value: str) -> str | None:
    low = Decimal(str(minimum)) if minimum is not None else None
    high = Decimal(str(maximum)) if maximum is not None else None
    if (low is not None and number < low) or (high is not None and number > high):
        return f"must be {_range_words(minimum, maximum)}, got {value}"
    return None


def property_problem(fmt: str, value: str) -> str | None:
    """Why PVE's property-string parser refuses ``value`` as format ``fmt`` (fields' ranges too); None: it parses."""
    try:
        fields = parse_format(fmt, value)
    except UnreadableError as exc:
        return f"not a value PVE reads: {exc}"
    for field, text in fields.items():
        spec = FORMATS[fmt].get(field, {})
        if spec.get("type") in ("integer", "number") and ("minimum" in spec or "maximum" in spec):
            problem = _range(Decimal(text), spec.get("minimum"), spec.get("maximum"), text)
            if problem is not None:
                return f"{field}: {problem}"
    return None
