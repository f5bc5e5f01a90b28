"""The plan: a pure function from desired and actual snapshots to a minimal action list.

Only guests present in both snapshots are considered; only the parts a desired guest sets are
managed. Nothing is provisioned, destroyed, or written to a data-bearing key. The request is
validated during the same single pass (see ``planner.validate``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

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
    SpecView,
    Start,
    Stop,
)
from planner.normalize import DEFAULT_REGISTRY, Registry, canon_bool, is_blank
from planner.validate import check_config, check_desired, index_actual, index_guests

DESCRIPTION_KEY = "description"
SpecForm = tuple[tuple[str, ...], tuple[str, ...]]
Judged = tuple[int, str, str, str | None]  # (guest type, key, desired, actual)


class Verdict(Enum):
    """What one declared key needs."""

    EQUAL = "equal"
    SET = "set"
    DELETE = "delete"
    DATA_BEARING = "data_bearing"
    UNCOMPARABLE = "uncomparable"


def judge(registry: Registry, guest_type: int, key: str, desired: str, actual: str | None) -> tuple[Verdict, str]:
    """The verdict and, for SET, the value in PVE's write form (merged over ``actual``)."""
    rule = registry.lookup(guest_type, key)
    if not rule.comparable:
        return Verdict.UNCOMPARABLE, ""
    if rule.same(desired, actual):
        return Verdict.EQUAL, ""
    if rule.data_bearing:
        return Verdict.DATA_BEARING, ""
    if is_blank(desired):
        return Verdict.DELETE, ""
    return Verdict.SET, rule.write(desired, actual)


class Verdicts(dict[Judged, tuple[Verdict, str]]):
    """``verdicts[type, key, desired, actual]``: judged on the first lookup, then remembered.

    Snapshots repeat the same values; a dict whose ``__missing__`` judges makes a repeat one
    C-level lookup, with no Python call.
    """

    __slots__ = ("registry",)

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry

    def __missing__(self, judged: Judged) -> tuple[Verdict, str]:
        guest_type, key, desired, actual = judged  # a plain call: a star-call takes a slower path
        verdict = self[judged] = judge(self.registry, guest_type, key, desired, actual)
        return verdict


@dataclass(slots=True)
class Comparer:
    """Judges (type, key, desired, actual) once per plan: snapshots repeat the same values."""

    verdicts: Verdicts
    specs: dict[bytes, SpecForm] = field(default_factory=dict)

    def spec_form(self, index: int, spec: SpecView, known_keys: set[str]) -> SpecForm:
        """A desired spec as (keys, values), checked once: fleets repeat the same spec."""
        # Only a cache key: equal bytes are equal maps; unequal bytes for equal maps are a miss.
        fingerprint = spec.SerializeToString()
        form = self.specs.get(fingerprint)
        if form is None:
            config = spec.config
            check_config(index, config, known_keys)
            keys = tuple(config)
            form = self.specs[fingerprint] = (keys, tuple(config[k] for k in keys))
        return form


@dataclass(slots=True)
class _Diff:
    """One guest's config differences, by verdict."""

    to_set: dict[str, str] = field(default_factory=dict)
    to_delete: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    uncomparable: list[str] = field(default_factory=list)

    def add(self, key: str, verdict: Verdict, value: str) -> None:
        """Record a non-EQUAL verdict."""
        if verdict is Verdict.SET:
            self.to_set[key] = value
        elif verdict is Verdict.DELETE:
            self.to_delete.append(key)
        elif verdict is Verdict.DATA_BEARING:
            self.data.append(key)
        elif verdict is Verdict.UNCOMPARABLE:
            self.uncomparable.append(key)


@dataclass(slots=True)
class _Planning:
    """The state of one plan() call: the keys checked so far, and what it has produced."""

    comparer: Comparer
    known_keys: set[str] = field(default_factory=set)
    actions: list[Action] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    def skip(self, vmid: int, reason: SkipReason, detail: str, keys: tuple[str, ...] = ()) -> None:
        """Record a skip."""
        self.skipped.append(Skip(vmid=vmid, reason=reason, detail=detail, keys=keys))


def plan(
    desired: Iterable[DesiredView],
    actual: Iterable[ActualView],
    registry: Registry = DEFAULT_REGISTRY,
) -> Plan:
    """Actions converging ``actual`` to ``desired``: ascending vmid, config before run state.

    Raises InvalidRequestError naming the first bad field; the input order does not matter.
    """
    by_vmid = index_actual(actual)
    wanted = index_guests("desired", desired)
    state = _Planning(Comparer(Verdicts(registry)))
    # Each message field is read once: a protobuf attribute read costs a name lookup, and this
    # loop runs once per guest of a snapshot of up to 50,000.
    for vmid, index, want in sorted((vmid, index, want) for index, (vmid, want) in enumerate(wanted.items())):
        _plan_guest(state, index, vmid, want, by_vmid.get(vmid))
    state.skipped.sort(key=lambda s: (s.vmid, s.reason))
    return Plan(actions=tuple(state.actions), skipped=tuple(state.skipped))


def _plan_guest(state: _Planning, index: int, vmid: int, want: DesiredView, have: ActualView | None) -> None:
    """Check one desired guest, then append its actions (config first) and skips."""
    want_power = want.run_state if want.HasField("run_state") else None
    description = want.description if want.HasField("description") else None
    check_desired(index, want_power, description)
    form = state.comparer.spec_form(index, want.spec, state.known_keys) if want.HasField("spec") else None
    if have is None:
        state.skip(vmid, SkipReason.NOT_FOUND, "declared guest not found on the node")
        return
    lock = have.lock
    if lock:
        state.skip(vmid, SkipReason.LOCKED, f"guest is locked ({lock})")
        return
    config_known = have.config_known
    if form is not None or description is not None:
        if config_known:
            _plan_config(state, vmid, form, description, have)
        else:
            state.skip(vmid, SkipReason.CONFIG_UNKNOWN, "config could not be read; config and description not planned")
    if want_power is not None:
        have_power = have.run_state
        if want_power != have_power:
            _plan_power(state, vmid, want_power, have_power, have, config_known=config_known)


def _plan_config(state: _Planning, vmid: int, form: SpecForm | None, description: str | None,
                 have: ActualView) -> None:
    """Compare the declared keys with the actual config; emit what differs.

    The actual values are read in one C-level pass; only keys whose text differs are judged,
    each distinct (key, desired, actual) once.
    """
    keys, values = form or ((), ())
    if description is not None:
        keys, values = (*keys, DESCRIPTION_KEY), (*values, description)
    current = have.config
    found = tuple(map(current.get, keys))
    if found == values:
        return
    diff: _Diff | None = None  # most guests differ only in spelling: no diff at all
    guest_type = have.type
    verdicts = state.comparer.verdicts
    for key, value, actual in zip(keys, values, found):  # noqa: B905 (equal lengths by construction)
        if value != actual:
            verdict, written = verdicts[guest_type, key, value, actual]
            if verdict is not Verdict.EQUAL:
                diff = diff or _Diff()
                diff.add(key, verdict, written)
    if diff is not None:
        _emit_config(state, vmid, dict(zip(keys, values, strict=True)), have, diff)


def _emit_config(state: _Planning, vmid: int, wanted: dict[str, str], have: ActualView, diff: _Diff) -> None:
    """Append a SetConfig with the differing keys and skips for what must not be written."""
    if diff.to_set or diff.to_delete:
        state.actions.append(SetConfig(
            vmid=vmid, guest_type=GuestType(have.type), set=tuple(sorted(diff.to_set.items())),
            delete=tuple(sorted(diff.to_delete)), digest=have.digest,
        ))
    if diff.data:
        keys = tuple(sorted(diff.data))
        state.skip(vmid, SkipReason.DATA_BEARING_KEY, "data-bearing keys differ and are never written: " + "; ".join(
            f"{k}: {have.config.get(k, '<absent>')!r} -> {wanted[k]!r}" for k in keys), keys)
    if diff.uncomparable:
        state.skip(vmid, SkipReason.UNCOMPARABLE_KEY, "write-only or generated keys cannot be compared and are "
                   "not written", tuple(sorted(diff.uncomparable)))


def _plan_power(state: _Planning, vmid: int, want: int, have_power: int, have: ActualView, *,
                config_known: bool) -> None:
    """Append Start or Stop for a run state that differs."""
    if want == RunState.RUNNING:
        if have_power == RunState.PAUSED:
            state.skip(vmid, SkipReason.PAUSED, "guest is paused; resuming is not planned")
        elif config_known and canon_bool(have.config.get("template", "0")) == "1":
            state.skip(vmid, SkipReason.TEMPLATE, "guest is a template and cannot be started")
        else:
            state.actions.append(Start(vmid=vmid, guest_type=GuestType(have.type)))
    elif want == RunState.STOPPED:
        state.actions.append(Stop(vmid=vmid, guest_type=GuestType(have.type)))
