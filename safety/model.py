"""The classifier's values: classes, sources, the action as the executor would run it, facts, verdicts.

Re-exported by ``safety.classify``, which is where callers import them from; they live here so that
the key table (``safety.keys``) and the rules (``safety.classify``) share them without a cycle.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

GUEST_TYPES = frozenset({"qemu", "lxc"})
_ON = frozenset({"1", "on", "yes", "true"})


class Class(enum.IntEnum):
    """How much an action can lose; ordered, so ``max()`` of classes is the strictest."""

    BENIGN = 0
    APPROVAL = 1
    DESTRUCTIVE = 2


class Source(enum.Enum):
    """Where a mutation came from; it can only raise a class, never lower it."""

    LOCAL_FILE = "local_file"
    HUB = "hub"
    OPERATOR_OP = "operator_op"
    SELFTEST = "selftest"


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    """One mutation as the executor would run it (kind names as in docs/SAFETY.md §1.3)."""

    kind: str
    vmid: int
    guest_type: str
    set: Mapping[str, str] = field(default_factory=dict)
    delete: tuple[str, ...] = ()
    params: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.vmid) is not int or self.vmid < 1:
            raise ValueError(f"Action.vmid must be a positive integer, got {self.vmid!r}")
        if self.guest_type not in GUEST_TYPES:
            raise ValueError(f"Action.guest_type must be 'qemu' or 'lxc', got {self.guest_type!r}")
        if isinstance(self.delete, str):
            # A bare string would be classified letter by letter.
            raise ValueError(f"Action.delete must be a tuple of keys, got the string {self.delete!r}")


def is_on(value: str | None) -> bool:
    """A PVE boolean as PVE reads it: 1/on/yes/true (any case) is on, anything else off."""
    return value is not None and value.strip().lower() in _ON


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestFacts:
    """What the executor already read of the guest; the classifier makes no reads of its own."""

    config: Mapping[str, str] | None = None
    digest: str = ""
    run_state: str = ""
    lock: str = ""
    pending_drive_keys: frozenset[str] = frozenset()

    @property
    def protection(self) -> bool:
        """PVE's ``protection`` flag from the config as read (absent or not read: off)."""
        return self.config is not None and is_on(self.config.get("protection"))

    def actual(self, key: str) -> str | None:
        """The value of ``key`` as read; None when absent or blank (PVE reads an emptied value as " ")."""
        if self.config is None:
            return None
        value = self.config.get(key)
        return value if value is not None and value.strip() else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Judgment:
    """One rule's finding: the candidates ``classify`` takes the maximum of."""

    cls: Class
    op_kind: str
    rule: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The classifier's answer: the strictest class found, the rule that found it, and every reason."""

    cls: Class
    op_kind: str
    rule: str
    reasons: tuple[str, ...]
