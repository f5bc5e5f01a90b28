"""Each guest's sync state after a tick, for the hub's fleet view: a pure function of what the tick knew.

``TickView`` is what one tick read and decided (the declared guests, the node as read, the plan's skips and steps,
the gate's admission, the guests left out of planning, the staged keys, the approvals waiting and the guests backing
off after a failure); ``guest_states`` turns it into one hub.v1 ``GuestState`` per declared guest. First match wins:

    elsewhere > skipped (entry unreadable) > pending approval > failed > in progress (held) > refused > drifted
    > skipped (the planner's) > staged > in sync

A guest left out of planning (a job queued or running, a signed op waiting, a step that failed and backs off) was
not read this tick: its diffs and run state are the previous report's. A secret key's value (a cloud-init password,
a description: ``executor.gate.steps.SECRET_KEYS``) is never sent, only that it differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from executor.gate.actions import SET_CONFIG, START, STOP, Step
from executor.gate.decisions import Admission, PendingApproval, Refusal
from executor.gate.steps import SECRET_KEYS
from executor.loop.desired import Declared
from executor.loop.observe import Observed, StagedKey
from hub.v1 import hub_pb2 as pb
from planner.v1 import planner_pb2 as planner_pb
from safety.opschema import NOT_SHOWN

RUN_STATE = "run_state"  # the KeyDiff key of a start or stop
RUN_STATES = {START: "running", STOP: "stopped"}


@dataclass(frozen=True, slots=True, kw_only=True)
class TickView:
    """What one tick knew of each declared guest (an empty ``declared``: nothing is declared here any more)."""

    declared: tuple[Declared, ...]
    observed: Observed | None = None
    skipped: tuple[planner_pb.Skip, ...] = ()
    planned: Mapping[int, Sequence[Step]] = field(default_factory=dict)
    admission: Admission | None = None
    refusals: tuple[Refusal, ...] = ()  # the gate's and the lanes' (a tick that waited)
    held: frozenset[int] = frozenset()  # left out of planning: busy, a signed op waiting, backing off
    staged: Mapping[int, tuple[StagedKey, ...]] = field(default_factory=dict)
    pending: tuple[PendingApproval, ...] = ()  # the gate's approval book
    failing: Mapping[int, str] = field(default_factory=dict)  # guests whose last step failed -> why


def _shown(key: str, value: str | None) -> str | None:
    return NOT_SHOWN if key in SECRET_KEYS and value is not None else value


def _diff(key: str, declared: str | None, actual: str | None) -> pb.KeyDiff:
    declared, actual = _shown(key, declared), _shown(key, actual)
    return pb.KeyDiff(key=key, declared=declared or "", actual=actual or "", declared_absent=declared is None,
                      actual_absent=actual is None)


def step_diffs(step: Step, config: Mapping[str, str], run_state: str) -> list[pb.KeyDiff]:
    """The keys a step changes, declared against actual (a start or stop: ``run_state``)."""
    if step.kind in RUN_STATES:
        return [_diff(RUN_STATE, RUN_STATES[step.kind], run_state or None)]
    if step.kind != SET_CONFIG:
        return []
    changes = [(key, value) for key, value in step.set] + [(key, None) for key in step.delete]
    return [_diff(key, value, config.get(key)) for key, value in sorted(changes, key=lambda change: change[0])]


def _pending(entry: PendingApproval, audience: str) -> pb.PendingApproval:
    return pb.PendingApproval(node=audience, vmid=entry.vmid, op_kind=entry.op_kind, action_class=entry.cls.name,
                              rule=entry.rule, reasons=list(entry.reasons), descriptor=entry.descriptor,
                              descriptor_sha256=entry.descriptor_sha256, challenge=entry.challenge,
                              first_seen_unix_ms=int(entry.first_seen * 1000), audience=audience)


def _reason(value: object) -> str:
    return str(getattr(value, "value", value))


@dataclass(frozen=True, slots=True)
class _Guest:
    """One declared guest and everything the view says of it."""

    declared: Declared
    view: TickView
    audience: str
    previous: pb.GuestState | None

    @property
    def vmid(self) -> int:
        return self.declared.vmid

    def diffs(self) -> list[pb.KeyDiff]:
        observed = self.view.observed
        config = observed.configs.get(self.vmid, ({}, ""))[0] if observed is not None else {}
        guest = observed.guests.get(self.vmid) if observed is not None else None
        return [diff for step in self.view.planned.get(self.vmid, ())
                for diff in step_diffs(step, config, guest.status if guest is not None else "")]

    def carried(self) -> list[pb.KeyDiff]:
        return list(self.previous.diffs) if self.previous is not None else []


Rule = Callable[[_Guest], pb.GuestState | None]


def _elsewhere(g: _Guest) -> pb.GuestState | None:
    observed = g.view.observed
    if observed is None or g.vmid not in observed.elsewhere:
        return None
    return pb.GuestState(state=pb.SYNC_STATE_ELSEWHERE, detail="on another node of the cluster: its executor owns it")


def _unreadable(g: _Guest) -> pb.GuestState | None:
    observed = g.view.observed
    if observed is None or g.vmid not in observed.unreadable:
        return None
    return pb.GuestState(state=pb.SYNC_STATE_SKIPPED, reason="UNREADABLE", detail=observed.unreadable[g.vmid])


def _waiting(g: _Guest) -> pb.GuestState | None:
    entries = [p for p in g.view.pending if p.vmid == g.vmid]
    if not entries:
        return None
    return pb.GuestState(state=pb.SYNC_STATE_PENDING_APPROVAL, reason=_reason(entries[0].reason),
                         detail="; ".join(f"{e.op_kind} [{e.cls.name}]: {e.rule}" for e in entries),
                         diffs=g.diffs() or g.carried(), pending=[_pending(e, g.audience) for e in entries])


def _failed(g: _Guest) -> pb.GuestState | None:
    if g.vmid not in g.view.failing or g.vmid not in g.view.held:
        return None
    return pb.GuestState(state=pb.SYNC_STATE_FAILED, reason="ACTION_FAILED",
                         detail=g.view.failing[g.vmid] or "its last step failed: retried after a backoff",
                         diffs=g.carried())


def _busy(g: _Guest) -> pb.GuestState | None:
    if g.vmid not in g.view.held:
        return None
    return pb.GuestState(state=pb.SYNC_STATE_DRIFTED, reason="IN_PROGRESS",
                         detail="a job is queued or running for it (not read this tick)", diffs=g.carried())


def _refused(g: _Guest) -> pb.GuestState | None:
    refusals = [r for r in g.view.refusals if r.vmid == g.vmid]
    if not refusals:
        return None
    return pb.GuestState(state=pb.SYNC_STATE_REFUSED, reason=_reason(refusals[0].reason),
                         detail="; ".join(r.detail for r in refusals), diffs=g.diffs())


def _drifted(g: _Guest) -> pb.GuestState | None:
    if not g.view.planned.get(g.vmid):
        return None
    admission = g.view.admission
    later = admission is not None and (g.vmid in admission.deferred or any(j.step.vmid == g.vmid
                                                                          for j in admission.held))
    return pb.GuestState(state=pb.SYNC_STATE_DRIFTED, reason="DEFERRED" if later else "",
                         detail="held for a later tick" if later else "being converged", diffs=g.diffs())


def _skipped(g: _Guest) -> pb.GuestState | None:
    skips = [s for s in g.view.skipped if s.vmid == g.vmid]
    if not skips:
        return None
    name = planner_pb.SkipReason.Name(skips[0].reason).removeprefix("SKIP_REASON_")
    return pb.GuestState(state=pb.SYNC_STATE_SKIPPED, reason=name, detail="; ".join(s.detail for s in skips),
                         diffs=[pb.KeyDiff(key=key) for s in skips for key in s.keys])


def _staged(g: _Guest) -> pb.GuestState | None:
    keys = g.view.staged.get(g.vmid)
    if not keys:
        return None
    return pb.GuestState(state=pb.SYNC_STATE_STAGED, detail="staged, applies at the next restart",
                         diffs=[_diff(k.key, k.next, k.now) for k in keys])


RULES: tuple[Rule, ...] = (_elsewhere, _unreadable, _waiting, _failed, _busy, _refused, _drifted, _skipped, _staged)


def _one(g: _Guest) -> pb.GuestState:
    state = next((found for rule in RULES if (found := rule(g)) is not None),
                 pb.GuestState(state=pb.SYNC_STATE_IN_SYNC))
    observed = g.view.observed
    guest = observed.guests.get(g.vmid) if observed is not None else None
    state.vmid = g.vmid
    if guest is not None:
        state.name, state.type, state.actual_run_state = guest.name, guest.type, guest.status
    elif g.previous is not None and g.vmid in g.view.held:  # not read this tick: as last seen
        state.name, state.type, state.actual_run_state = (g.previous.name, g.previous.type,
                                                          g.previous.actual_run_state)
    state.declared_run_state = g.declared.state or ""
    return state


def guest_states(view: TickView, *, audience: str,
                 previous: Mapping[int, pb.GuestState] | None = None) -> dict[int, pb.GuestState]:
    """Each declared guest's state after the tick ``view`` describes, by vmid (``previous``: the last report's)."""
    before = previous or {}
    return {d.vmid: _one(_Guest(d, view, audience, before.get(d.vmid))) for d in view.declared}
