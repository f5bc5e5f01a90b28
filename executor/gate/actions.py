"""Actions as the executor runs them: converted once from the planner's wire type.

A planner action this executor cannot read (a kind or guest type added by a newer planner, or
none at all) still becomes a ``Step``, of kind ``unknown``: the safety gate refuses it, counts it
and logs it; it never crashes a queue worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from executor.pve.node import LXC, QEMU
from planner.v1 import planner_pb2 as pb

START, STOP, SET_CONFIG, UNKNOWN = "start", "stop", "set_config", "unknown"
TYPES = {pb.GUEST_TYPE_QEMU: QEMU, pb.GUEST_TYPE_LXC: LXC}
VMID_MIN, VMID_MAX = 100, 999_999_999


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One mutation of one guest."""

    vmid: int
    guest_type: str
    kind: str
    set: tuple[tuple[str, str], ...] = ()
    delete: tuple[str, ...] = ()
    digest: str = ""
    params: tuple[tuple[str, Any], ...] = ()  # other kinds' parameters (a signed op's), sorted by name
    detail: str = ""  # for an unknown step: what could not be read

    def payload(self) -> dict[str, Any]:
        """What the journal records of it."""
        body: dict[str, Any] = {"type": self.guest_type}
        if self.kind == SET_CONFIG:
            body.update({"set": dict(self.set), "delete": list(self.delete), "digest": self.digest})
        if self.params:
            body["params"] = dict(self.params)
        return body


def _unread(message: Message) -> bool:
    """Whether ``message`` carries fields this executor's contract does not know (a newer planner's)."""
    return len(UnknownFieldSet(message)) > 0


def step_from_proto(action: pb.Action) -> Step:
    """A planner.v1 Action as a Step (kind ``unknown`` when this executor cannot read all of it).

    Nothing of an action is silently dropped: a field added by a newer planner (a condition, a
    ``force``) could change what the action means, so an action with one is not run at all.
    """
    guest_type = TYPES.get(action.type)
    kind = action.WhichOneof("kind")
    problem = (f"guest type {action.type}" if guest_type is None
               else f"vmid {action.vmid} is outside 100..999999999" if not VMID_MIN <= action.vmid <= VMID_MAX
               else "an action kind this executor does not know" if kind is None
               else f"{kind} fields this executor does not know" if _unread(action) or _unread(getattr(action, kind))
               else "")
    if problem or kind is None or guest_type is None:
        return Step(vmid=action.vmid, guest_type=guest_type or "unknown", kind=UNKNOWN, detail=problem)
    match kind:
        case "start":
            return Step(vmid=action.vmid, guest_type=guest_type, kind=START)
        case "stop":
            return Step(vmid=action.vmid, guest_type=guest_type, kind=STOP)
        case "set_config":
            change = action.set_config
            return Step(vmid=action.vmid, guest_type=guest_type, kind=SET_CONFIG,
                        set=tuple(sorted(change.set.items())), delete=tuple(change.delete), digest=change.digest)
    return Step(vmid=action.vmid, guest_type=guest_type, kind=UNKNOWN, detail=f"action kind {kind!r}")


def by_guest(actions: Iterable[pb.Action]) -> dict[int, list[Step]]:
    """Steps grouped per vmid, each guest's in plan order."""
    grouped: dict[int, list[Step]] = {}
    for action in actions:
        step = step_from_proto(action)
        grouped.setdefault(step.vmid, []).append(step)
    return grouped
