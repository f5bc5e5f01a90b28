"""Request validation: every rule PVE would enforce, reported with the offending field's path.

Each rule is written once, here. The plan calls these checks during its single pass over the
request (a second pass over a 50,000-guest snapshot would cost as much as its transport). The plan
is pure, so a request that fails a check is refused whole: nothing was applied, nothing is returned
but the error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

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


def check_vmid(field: str, index: int, vmid: int, seen: dict[int, int]) -> None:
    """vmid in PVE's range and not seen before; records it in ``seen`` (vmid -> index)."""
    if not VMID_MIN <= vmid <= VMID_MAX:
        raise InvalidRequestError(f"{field}[{index}].vmid", f"must be {VMID_MIN}..{VMID_MAX}, got {vmid}")
    first = seen.setdefault(vmid, index)
    if first != index:
        raise InvalidRequestError(f"{field}[{index}].vmid", f"duplicate vmid {vmid} (also {field}[{first}])")


def index_actual(actual: Iterable[ActualView]) -> dict[int, ActualView]:
    """Actual guests by vmid, each checked: vmid, type and run state."""
    by_vmid: dict[int, ActualView] = {}
    seen: dict[int, int] = {}
    for i, guest in enumerate(actual):
        vmid = guest.vmid
        check_vmid("actual", i, vmid, seen)
        if guest.type not in GUEST_TYPES:
            raise InvalidRequestError(f"actual[{i}].type", "required: GUEST_TYPE_QEMU or GUEST_TYPE_LXC")
        if guest.run_state not in ACTUAL_RUN_STATES:
            raise InvalidRequestError(f"actual[{i}].run_state", "required: RUN_STATE_RUNNING, _STOPPED or _PAUSED")
        by_vmid[vmid] = guest
    return by_vmid


def check_run_state(index: int, run_state: int) -> None:
    """A desired run state, when set, is RUNNING or STOPPED."""
    if run_state not in DESIRED_RUN_STATES:
        raise InvalidRequestError(f"desired[{index}].run_state",
                                  "must be RUN_STATE_RUNNING or RUN_STATE_STOPPED when set")


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


def check_description(field: str, value: str) -> None:
    """Descriptions may span lines, but hold no NUL and fit PVE's limit."""
    if "\x00" in value:
        raise InvalidRequestError(field, "contains NUL, which PVE refuses")
    if len(value) > DESCRIPTION_MAX:
        raise InvalidRequestError(field, f"longer than PVE's {DESCRIPTION_MAX} characters")
