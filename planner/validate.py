"""Request validation: every rule PVE would enforce, reported with the offending field's path.

Each rule is written once, here. The plan calls these checks during its single pass over the
request (a second pass over a 50,000-guest snapshot would cost as much as its transport). The plan
is pure, so a request that fails a check is refused whole: nothing was applied, nothing is returned
but the error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar

from planner.model import ActualView, GuestType, RunState

VMID_MIN, VMID_MAX = 100, 999_999_999
DESCRIPTION_MAX = 8192
_KEY = re.compile(r"[a-z][a-z0-9_-]{0,63}")
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


class _Guest(Protocol):
    @property
    def vmid(self) -> int:
        """Guest id."""


G = TypeVar("G", bound=_Guest)


def index_guests(field: str, guests: Iterable[G]) -> dict[int, G]:
    """Guests by vmid, in input order (a guest's position is its index); each vmid in PVE's range, once.

    One loop over the list rather than a check per guest: a call costs more than the check.
    """
    by_vmid: dict[int, G] = {}
    for index, guest in enumerate(guests):
        vmid = guest.vmid
        if not VMID_MIN <= vmid <= VMID_MAX:
            raise InvalidRequestError(f"{field}[{index}].vmid", f"must be {VMID_MIN}..{VMID_MAX}, got {vmid}")
        if vmid in by_vmid:
            first = list(by_vmid).index(vmid)
            raise InvalidRequestError(f"{field}[{index}].vmid", f"duplicate vmid {vmid} (also {field}[{first}])")
        by_vmid[vmid] = guest
    return by_vmid


def index_actual(actual: Iterable[ActualView]) -> dict[int, ActualView]:
    """Actual guests by vmid, each checked: vmid, type and run state."""
    by_vmid = index_guests("actual", actual)
    for index, guest in enumerate(by_vmid.values()):
        if guest.type not in GUEST_TYPES:
            raise InvalidRequestError(f"actual[{index}].type", "required: GUEST_TYPE_QEMU or GUEST_TYPE_LXC")
        if guest.run_state not in ACTUAL_RUN_STATES:
            raise InvalidRequestError(f"actual[{index}].run_state", "required: RUN_STATE_RUNNING, _STOPPED or _PAUSED")
    return by_vmid


def check_desired(index: int, run_state: int | None, description: str | None) -> None:
    """A desired guest's parts, where set: the run state is RUNNING or STOPPED; the description (which
    may span lines) holds no NUL and fits PVE's limit."""
    if run_state is not None and run_state not in DESIRED_RUN_STATES:
        raise InvalidRequestError(f"desired[{index}].run_state",
                                  "must be RUN_STATE_RUNNING or RUN_STATE_STOPPED when set")
    if description is not None:
        if "\x00" in description:
            raise InvalidRequestError(f"desired[{index}].description", "contains NUL, which PVE refuses")
        if len(description) > DESCRIPTION_MAX:
            raise InvalidRequestError(f"desired[{index}].description",
                                      f"longer than PVE's {DESCRIPTION_MAX} characters")


def check_config(index: int, config: Mapping[str, str], known_keys: set[str]) -> None:
    """Key names and values of one desired config; ``known_keys`` holds names already checked."""
    for key, value in config.items():
        if key not in known_keys:
            check_key(index, key)
            known_keys.add(key)
        if _LINE_BREAK_OR_NUL.search(value):
            raise InvalidRequestError(f"desired[{index}].spec.config[{key!r}]",
                                      "value contains a line break or NUL, which PVE refuses")


def check_key(index: int, key: str) -> None:
    """A declarable PVE config key name."""
    if not _KEY.fullmatch(key):
        raise InvalidRequestError(f"desired[{index}].spec.config[{key!r}]",
                                  "not a PVE config key (lowercase letter, then [a-z0-9_-])")
    if key in READ_ONLY_KEYS:
        raise InvalidRequestError(f"desired[{index}].spec.config[{key!r}]", "is set by PVE and cannot be declared")
    if key == "description":
        raise InvalidRequestError(f"desired[{index}].spec.config[{key!r}]", "declare it in the description field")

