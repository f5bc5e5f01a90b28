"""The plan: a pure function from desired and actual snapshots to a minimal action list.

Only guests present in both snapshots are considered; only the parts a desired guest sets are
managed. Nothing is provisioned, destroyed, or written to a data-bearing key. The request is
validated during the same single pass (see ``planner.validate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
from planner.validate import LINE_BREAK_OR_NUL, check_desired, check_key, index_actual, refuse_value

DESCRIPTION_KEY = "description"


class Verdict(Enum):
    """What one declared key needs."""

    EQUAL = "equal"
    SET = "set"
    DELETE = "delete"
    DATA_BEARING = "data_bearing"
    UNCOMPARABLE = "uncomparable"


@dataclass(slots=True)
class Comparer:
    """Judges (type, key, desired, actual) once per plan: snapshots repeat the same values."""

    registry: Registry
    memo: dict[tuple[int, str, str, str | None], tuple[Verdict, str]] = field(default_factory=dict)
    specs: dict[bytes, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)

    def spec_form(self, index: int, spec: SpecView, known_keys: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """A desired spec as (keys, values), checked once: fleets repeat the same spec."""
        fingerprint = spec.SerializeToString(deterministic=True)
        form = self.specs.get(fingerprint)
        if form is None:
            config = spec.config
            _check_items(index, config, known_keys)
            keys = tuple(config)
            form = self.specs[fingerprint] = (keys, tuple(config[k] for k in keys))
        return form

    def judge(self, guest_type: int, key: str, desired: str, actual: str | None) -> tuple[Verdict, str]:
        """The verdict and, for SET, the value in PVE's write form."""
        memo_key = (guest_type, key, desired, actual)
        verdict = self.memo.get(memo_key)
        if verdict is None:
            verdict = self.memo[memo_key] = self._judge(guest_type, key, desired, actual)
        return verdict

    def _judge(self, guest_type: int, key: str, desired: str, actual: str | None) -> tuple[Verdict, str]:
        rule = self.registry.lookup(guest_type, key)
        if not rule.comparable:
            return Verdict.UNCOMPARABLE, ""
        if rule.same(desired, actual):
            return Verdict.EQUAL, ""
        if rule.data_bearing:
            return Verdict.DATA_BEARING, ""
        if is_blank(desired):
            return Verdict.DELETE, ""
        return Verdict.SET, rule.write(desired)


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


NO_DIFF = _Diff()  # shared, never mutated: "compared, nothing differs"


def plan(
    desired: Iterable[DesiredView],
    actual: Iterable[ActualView],
    registry: Registry = DEFAULT_REGISTRY,
) -> Plan:
    """Actions converging ``actual`` to ``desired``: ascending vmid, config before run state.

    Raises InvalidRequestError naming the first bad field; the input order does not matter.
    """
    by_vmid = index_actual(actual)
    comparer = Comparer(registry)
    seen: dict[int, int] = {}
    known_keys: set[str] = set()
    actions: list[Action] = []
    skipped: list[Skip] = []
    for index, want in sorted(enumerate(desired), key=lambda pair: pair[1].vmid):
        has_power, has_spec = want.HasField("run_state"), want.HasField("spec")
        has_description = want.HasField("description")
        check_desired(index, want, seen, has_power, has_description)
        have = by_vmid.get(want.vmid)
        lock = have.lock if have is not None else ""
        writable = have is not None and not lock and have.config_known
        diff = _diff_config(index, want, have if writable else None, comparer, known_keys,
                            has_spec=has_spec, has_description=has_description)
        if have is None:
            skipped.append(Skip(vmid=want.vmid, reason=SkipReason.NOT_FOUND,
                                detail="declared guest not found on the node"))
        elif lock:
            skipped.append(Skip(vmid=want.vmid, reason=SkipReason.LOCKED, detail=f"guest is locked ({lock})"))
        else:
            if diff is not None:
                if diff is not NO_DIFF:
                    _emit_config(want, have, diff, actions, skipped)
            elif has_spec or has_description:
                skipped.append(Skip(vmid=want.vmid, reason=SkipReason.CONFIG_UNKNOWN,
                                    detail="config could not be read; config and description not planned"))
            if has_power and want.run_state != have.run_state:
                _plan_power(want, have, actions, skipped)
    skipped.sort(key=lambda s: (s.vmid, s.reason))
    return Plan(actions=tuple(actions), skipped=tuple(skipped))


def _diff_config(index: int, want: DesiredView, have: ActualView | None, comparer: Comparer,
                 known_keys: set[str], *, has_spec: bool, has_description: bool) -> _Diff | None:
    """Check every declared key; compare them when ``have`` (writable actual) is given.

    None when config and description are unmanaged or cannot be compared. This runs once per
    guest of a whole snapshot, so it works on the spec's cached (keys, values) form and reads
    the actual values in one C-level pass; only the keys whose text differs reach the normalizers.
    """
    keys, values = comparer.spec_form(index, want.spec, known_keys) if has_spec else ((), ())
    if have is None or not (has_spec or has_description):
        return None
    diff: _Diff | None = None  # created on the first difference: most guests have none
    current, guest_type = have.config, have.type
    if has_description:
        keys, values = (*keys, DESCRIPTION_KEY), (*values, want.description)
    found = tuple(map(current.get, keys))
    if found != values:
        for key, value, actual in zip(keys, values, found, strict=True):
            if value != actual:
                verdict, written = comparer.judge(guest_type, key, value, actual)
                if verdict is not Verdict.EQUAL:
                    diff = diff or _Diff()
                    diff.add(key, verdict, written)
    return diff or NO_DIFF


def _check_items(index: int, config: Mapping[str, str], known_keys: set[str]) -> None:
    """Key names and values of one desired config (names are checked once per snapshot)."""
    search = LINE_BREAK_OR_NUL.search
    for key in config:
        if key not in known_keys:
            check_key(index, key)
            known_keys.add(key)
        if search(config[key]):
            refuse_value(index, key)


def _emit_config(want: DesiredView, have: ActualView, diff: _Diff, actions: list[Action],
                 skipped: list[Skip]) -> None:
    """Append a SetConfig with the differing keys and skips for what must not be written."""
    if diff.to_set or diff.to_delete:
        actions.append(SetConfig(
            vmid=want.vmid, guest_type=GuestType(have.type), set=tuple(sorted(diff.to_set.items())),
            delete=tuple(sorted(diff.to_delete)), digest=have.digest,
        ))
    if diff.data:
        keys = tuple(sorted(diff.data))
        wanted = want.spec.config
        skipped.append(Skip(
            vmid=want.vmid, reason=SkipReason.DATA_BEARING_KEY, keys=keys,
            detail="data-bearing keys differ and are never written: "
            + "; ".join(f"{k}: {have.config.get(k, '<absent>')!r} -> {wanted.get(k)!r}" for k in keys),
        ))
    if diff.uncomparable:
        skipped.append(Skip(
            vmid=want.vmid, reason=SkipReason.UNCOMPARABLE_KEY, keys=tuple(sorted(diff.uncomparable)),
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
