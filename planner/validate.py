"""Request validation: every rule PVE would enforce, reported with the offending field's path.

Runs before planning so a bad request is refused whole, never half-planned.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from planner.model import ActualView, DesiredView, GuestType, RunState

VMID_MIN, VMID_MAX = 100, 999_999_999
DESCRIPTION_MAX = 8192
_KEY = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_NUL = re.compile("\x00")
_LINE_BREAK_OR_NUL = re.compile("[\x00\r\n]")
# Keys PVE reports but never accepts as config: declaring one is a mistake, not drift.
READ_ONLY_KEYS = frozenset({"digest", "lock", "pending", "meta", "parent", "snaptime"})
DESIRED_RUN_STATES = frozenset({RunState.RUNNING, RunState.STOPPED})
ACTUAL_RUN_STATES = frozenset({RunState.RUNNING, RunState.STOPPED, RunState.PAUSED})
GUEST_TYPES = frozenset({GuestType.QEMU, GuestType.LXC})


class InvalidRequestError(ValueError):
    """A request field breaks a rule; ``field`` is its path, e.g. ``desired[3].vmid``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def validate(desired: Iterable[DesiredView], actual: Iterable[ActualView]) -> None:
    """Raise InvalidRequestError naming the first bad field."""
    _check_desired(desired)
    _check_actual(actual)


def _check_vmid(field: str, vmid: int, seen: dict[int, int], index: int) -> None:
    if not VMID_MIN <= vmid <= VMID_MAX:
        raise InvalidRequestError(f"{field}[{index}].vmid", f"must be {VMID_MIN}..{VMID_MAX}, got {vmid}")
    first = seen.setdefault(vmid, index)
    if first != index:
        raise InvalidRequestError(f"{field}[{index}].vmid", f"duplicate vmid {vmid} (also {field}[{first}])")


def _check_desired(desired: Iterable[DesiredView]) -> None:
    seen: dict[int, int] = {}
    keys_ok: set[str] = set()
    for i, guest in enumerate(desired):
        _check_vmid("desired", guest.vmid, seen, i)
        if guest.HasField("run_state") and guest.run_state not in DESIRED_RUN_STATES:
            raise InvalidRequestError(f"desired[{i}].run_state",
                                 "must be RUN_STATE_RUNNING or RUN_STATE_STOPPED when set")
        if guest.HasField("spec"):
            _check_config(f"desired[{i}].spec.config", guest.spec.config.items(), keys_ok)
            if guest.HasField("description") and "description" in guest.spec.config:
                raise InvalidRequestError(f'desired[{i}].spec.config["description"]',
                                     "set the description field instead, not both")
        if guest.HasField("description"):
            _check_description(f"desired[{i}].description", guest.description)


def _check_config(field: str, items: Iterable[tuple[str, str]], keys_ok: set[str]) -> None:
    for key, value in items:
        if key not in keys_ok:
            if not _KEY.fullmatch(key):
                raise InvalidRequestError(f"{field}[{key!r}]",
                                     "not a PVE config key (lowercase letter, then [a-z0-9_-])")
            if key in READ_ONLY_KEYS:
                raise InvalidRequestError(f"{field}[{key!r}]", "is set by PVE and cannot be declared")
            keys_ok.add(key)
        if key == "description":
            _check_description(f"{field}[{key!r}]", value)
        elif _LINE_BREAK_OR_NUL.search(value):
            raise InvalidRequestError(f"{field}[{key!r}]", "value contains a line break or NUL, which PVE refuses")


def _check_description(field: str, value: str) -> None:
    if _NUL.search(value):
        raise InvalidRequestError(field, "contains NUL, which PVE refuses")
    if len(value) > DESCRIPTION_MAX:
        raise InvalidRequestError(field, f"longer than PVE's {DESCRIPTION_MAX} characters")


def _check_actual(actual: Iterable[ActualView]) -> None:
    seen: dict[int, int] = {}
    for i, guest in enumerate(actual):
        _check_vmid("actual", guest.vmid, seen, i)
        if guest.type not in GUEST_TYPES:
            raise InvalidRequestError(f"actual[{i}].type", "required: GUEST_TYPE_QEMU or GUEST_TYPE_LXC")
        if guest.run_state not in ACTUAL_RUN_STATES:
            raise InvalidRequestError(f"actual[{i}].run_state", "required: RUN_STATE_RUNNING, _STOPPED or _PAUSED")
