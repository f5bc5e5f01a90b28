"""Blast radius: how many stops one tick may run, by source (docs/SAFETY.md §4).

A rate that gives a person time to notice a bad edit: the node's own desired file is trusted with
any number of stops, a remote source with max(2, 10% of the managed guests) per tick, the rest
deferred to later ticks. A remote source asking to stop more than half of the managed guests at
once gets every one of those stops refused as needing approval: a hub gone wrong must not drain a node.

The count is of what the node has, not of what is declared (``settle``): a guest a remote source
stopped stays counted, as managed and stopped, when the source then stops declaring it or drops
its run state, until it runs again or is gone from the node. Un-managing what it stopped never
frees budget for more stops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, replace

from safety.model import Source

REMOTE_FLOOR = 2
REMOTE_PERCENT = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class StopBudget:
    """This tick's stops split three ways; each vmid is in exactly one, each tuple ascending."""

    admitted: tuple[int, ...]
    deferred: tuple[int, ...]
    need_approval: tuple[int, ...]


def default_limit(*, managed: int, source: Source) -> int | None:
    """Stops per tick when none is configured: None (unlimited) for the local file, else max(2, 10%)."""
    if source is Source.LOCAL_FILE:
        return None
    return max(REMOTE_FLOOR, managed * REMOTE_PERCENT // 100)


def limit_stops(stop_vmids: Sequence[int], *, managed: int, source: Source,
                max_stops_per_tick: int | None, already_stopped: int = 0, used: int = 0) -> StopBudget:
    """Admit the lowest vmids up to the limit, defer the rest; a remote mass stop needs approval.

    ``already_stopped``: managed guests stopped now and declared stopped (a hub that drains a node
    half at a time still drains it). ``used``: stops this source already ran in the current limit
    window (ticks on demand must not multiply the rate).
    """
    for name, count in (("managed", managed), ("already_stopped", already_stopped), ("used", used)):
        if count < 0:
            raise ValueError(f"{name} must not be negative, got {count}")
    if max_stops_per_tick is not None and max_stops_per_tick < 1:
        raise ValueError(f"max_stops_per_tick must be at least 1 (or unset), got {max_stops_per_tick}")
    vmids = tuple(sorted(set(stop_vmids)))
    if source is not Source.LOCAL_FILE and 2 * (len(vmids) + already_stopped) > managed:
        return StopBudget(admitted=(), deferred=(), need_approval=vmids)
    limit = max_stops_per_tick if max_stops_per_tick is not None else default_limit(managed=managed, source=source)
    if limit is None:
        return StopBudget(admitted=vmids, deferred=(), need_approval=())
    room = max(0, limit - used)
    return StopBudget(admitted=vmids[:room], deferred=vmids[room:], need_approval=())


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteStop:
    """A guest a remote source stopped: when its stop was admitted, and whether it was seen stopped since."""

    at: float
    seen: bool = False


def settle(stops: Mapping[int, RemoteStop], *, status: Mapping[int, str], present: Set[int], held: Set[int],
           now: float, grace: float) -> dict[int, RemoteStop]:
    """The remote stops that still count, after a read of the whole node.

    ``status``: run state by vmid, as read; ``present``: every vmid on the node's lists, whatever
    its state; ``held``: guests whose state is in motion (a job queued or running, a task past its
    deadline, a read older than their last job): kept as they are. A guest gone from the node no
    longer counts; one seen stopped is confirmed; one seen running (or paused) after it was seen
    stopped runs again (someone started it). One never seen stopped and running counts until
    ``grace`` after its stop was admitted (the stop may still be under way, say across a restart).
    """
    kept = {}
    for vmid, stop in stops.items():
        state = status.get(vmid)
        if vmid not in present:
            continue
        if vmid in held or state is None:  # in motion, or a state this rule cannot read: it still counts
            kept[vmid] = stop
        elif state == "stopped":
            kept[vmid] = stop if stop.seen else replace(stop, seen=True)
        elif not stop.seen and now < stop.at + grace:
            kept[vmid] = stop
    return kept
