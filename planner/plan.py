"""The plan: a pure function from desired and actual snapshots to a minimal action list.

Only guests present in both snapshots are considered; only the parts a desired guest sets are
managed. Nothing is provisioned, destroyed, or written to a data-bearing key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from operator import attrgetter

from planner.model import (
    Action,
    ActualView,
    DesiredView,
    GuestType,
    Plan,
    RunState,
    SetConfig,
    Skip,
    SkipReason,
    Start,
    Stop,
)
from planner.normalize import DEFAULT_REGISTRY, Registry, canon_bool, is_blank

DESCRIPTION_KEY = "description"


def plan(
    desired: Iterable[DesiredView],
    actual: Iterable[ActualView],
    registry: Registry = DEFAULT_REGISTRY,
) -> Plan:
    """Actions converging ``actual`` to ``desired``: ascending vmid, config before run state.

    Inputs are assumed valid (see ``planner.validate``); their order does not matter.
    """
    by_vmid = {guest.vmid: guest for guest in actual}
    actions: list[Action] = []
    skipped: list[Skip] = []
    for want in sorted(desired, key=attrgetter("vmid")):
        have = by_vmid.get(want.vmid)
        if have is None:
            skipped.append(Skip(vmid=want.vmid, reason=SkipReason.NOT_FOUND,
                                detail="declared guest not found on the node"))
        elif have.lock:
            skipped.append(Skip(vmid=want.vmid, reason=SkipReason.LOCKED,
                                detail=f"guest is locked ({have.lock})"))
        else:
            _plan_guest(want, have, registry, actions, skipped)
    skipped.sort(key=attrgetter("vmid", "reason"))
    return Plan(actions=tuple(actions), skipped=tuple(skipped))


def _plan_guest(
    want: DesiredView,
    have: ActualView,
    registry: Registry,
    actions: list[Action],
    skipped: list[Skip],
) -> None:
    """Append one guest's actions (config first) and skips."""
    if want.HasField("spec") or want.HasField("description"):
        if have.config_known:
            _plan_config(want, have, registry, actions, skipped)
        else:
            skipped.append(Skip(vmid=want.vmid, reason=SkipReason.CONFIG_UNKNOWN,
                                detail="config could not be read; config and description not planned"))
    if want.HasField("run_state"):
        _plan_power(want, have, actions, skipped)


def desired_config(want: DesiredView) -> Iterable[tuple[str, str]]:
    """The managed keys of a desired guest: its spec plus its description."""
    if want.HasField("spec"):
        yield from want.spec.config.items()
    if want.HasField("description"):
        yield DESCRIPTION_KEY, want.description


def _plan_config(
    want: DesiredView,
    have: ActualView,
    registry: Registry,
    actions: list[Action],
    skipped: list[Skip],
) -> None:
    """Append a SetConfig with the keys that differ; skips for keys it must not write."""
    current: Mapping[str, str] = have.config
    to_set: dict[str, str] = {}
    to_delete: list[str] = []
    data: list[str] = []
    uncomparable: list[str] = []
    for key, value in desired_config(want):
        actual_value = current.get(key)
        if value == actual_value:
            continue
        rule = registry.lookup(have.type, key)
        if not rule.comparable:
            uncomparable.append(key)
        elif rule.same(value, actual_value):
            continue
        elif rule.data_bearing:
            data.append(key)
        elif is_blank(value):
            to_delete.append(key)
        else:
            to_set[key] = rule.write(value)
    if to_set or to_delete:
        actions.append(SetConfig(
            vmid=want.vmid, guest_type=GuestType(have.type), set=tuple(sorted(to_set.items())),
            delete=tuple(sorted(to_delete)), digest=have.digest,
        ))
    if data:
        skipped.append(Skip(
            vmid=want.vmid, reason=SkipReason.DATA_BEARING_KEY, keys=tuple(sorted(data)),
            detail="data-bearing keys differ and are never written: "
            + "; ".join(f"{k}: {current.get(k, '<absent>')!r} -> {dict(desired_config(want))[k]!r}"
                        for k in sorted(data)),
        ))
    if uncomparable:
        skipped.append(Skip(
            vmid=want.vmid, reason=SkipReason.UNCOMPARABLE_KEY, keys=tuple(sorted(uncomparable)),
            detail="write-only or generated keys cannot be compared and are not written",
        ))


def _plan_power(want: DesiredView, have: ActualView, actions: list[Action], skipped: list[Skip]) -> None:
    """Append Start or Stop when the run state differs."""
    guest_type = GuestType(have.type)
    if want.run_state == RunState.RUNNING:
        if have.run_state == RunState.PAUSED:
            skipped.append(Skip(vmid=want.vmid, reason=SkipReason.PAUSED,
                                detail="guest is paused; resuming is not planned"))
        elif have.run_state == RunState.STOPPED:
            if have.config_known and canon_bool(have.config.get("template", "0")) == "1":
                skipped.append(Skip(vmid=want.vmid, reason=SkipReason.TEMPLATE,
                                    detail="guest is a template and cannot be started"))
            else:
                actions.append(Start(vmid=want.vmid, guest_type=guest_type))
    elif want.run_state == RunState.STOPPED and have.run_state != RunState.STOPPED:
        actions.append(Stop(vmid=want.vmid, guest_type=guest_type))
