"""The planner's domain values: read-only views of its input, and the plan it returns.

The input is read through structural views (``DesiredView``, ``ActualView``) rather than copied
into domain objects: a 50,000-guest snapshot copied into Python dicts costs more than its gRPC
transport. The generated protobuf messages satisfy these views as they are; the output, ~1% of
the input, is built as frozen dataclasses and converted to protobuf at the edge.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol


class RunState(enum.IntEnum):
    """Power state; values mirror ``planner.v1.RunState`` (a test pins them)."""

    UNSPECIFIED = 0
    RUNNING = 1
    STOPPED = 2
    PAUSED = 3


class GuestType(enum.IntEnum):
    """Guest kind; values mirror ``planner.v1.GuestType``."""

    UNSPECIFIED = 0
    QEMU = 1
    LXC = 2


class SkipReason(enum.IntEnum):
    """Why a guest or part of one was left alone; values mirror ``planner.v1.SkipReason``."""

    UNSPECIFIED = 0
    NOT_FOUND = 1
    CONFIG_UNKNOWN = 2
    LOCKED = 3
    DATA_BEARING_KEY = 4
    PAUSED = 5
    TEMPLATE = 6
    UNCOMPARABLE_KEY = 7


class SpecView(Protocol):
    """The managed config of a desired guest."""

    @property
    def config(self) -> Mapping[str, str]:
        """PVE key to desired value."""

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes:  # noqa: N802
        """A canonical fingerprint: equal specs give equal bytes (deterministic=True)."""


class DesiredView(Protocol):
    """One declared guest; ``HasField`` tells which parts are managed."""

    @property
    def vmid(self) -> int:
        """Guest id."""

    @property
    def run_state(self) -> int:
        """Wanted RunState (meaningful only when set)."""

    @property
    def spec(self) -> SpecView:
        """Wanted config (meaningful only when set)."""

    @property
    def description(self) -> str:
        """Wanted description (meaningful only when set)."""

    def HasField(self, field_name: Literal["run_state", "spec", "description"]) -> bool:  # noqa: N802
        """Whether a part is set, i.e. managed."""


class ActualView(Protocol):
    """One observed guest."""

    @property
    def vmid(self) -> int:
        """Guest id."""

    @property
    def type(self) -> int:
        """GuestType."""

    @property
    def run_state(self) -> int:
        """RunState."""

    @property
    def config_known(self) -> bool:
        """False when the config could not be read."""

    @property
    def config(self) -> Mapping[str, str]:
        """Pending-applied config."""

    @property
    def digest(self) -> str:
        """Digest read with the config."""

    @property
    def lock(self) -> str:
        """Lock name, empty when unlocked."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    """Power the guest on."""

    vmid: int
    guest_type: GuestType


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop:
    """Power the guest off."""

    vmid: int
    guest_type: GuestType


@dataclass(frozen=True, slots=True, kw_only=True)
class SetConfig:
    """Write ``set`` and remove ``delete``, guarded by ``digest``; both sorted by key."""

    vmid: int
    guest_type: GuestType
    set: tuple[tuple[str, str], ...]
    delete: tuple[str, ...]
    digest: str


Action = SetConfig | Start | Stop


@dataclass(frozen=True, slots=True, kw_only=True)
class Skip:
    """A guest, or part of one, deliberately left alone."""

    vmid: int
    reason: SkipReason
    detail: str
    keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Actions in execution order and skips, both by ascending vmid."""

    actions: tuple[Action, ...]
    skipped: tuple[Skip, ...]
