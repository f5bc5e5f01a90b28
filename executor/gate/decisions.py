"""The gate's vocabulary: its settings, what it decides per step (admitted, refused, pending), and
the descriptor an approval binds. Values only; ``executor.gate.gate`` and ``executor.gate.lane`` decide.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from executor.gate.actions import SET_CONFIG, UNKNOWN, Step
from executor.gate.kinds import ACTION_KINDS, CallSettings
from executor.gate.steps import bound_action, params_of
from safety.classify import Action, Class, GuestFacts, Source, Verdict
from safety.keys import API_PARAMETERS
from safety.refusal import RefusalReason, Refused
from safety.scope import Declaration
from safety.signedop import VerifiedOp

# Refusal reasons: members of the one enum (the executor.v1 RefusalReason names without their prefix), so a
# misspelt one fails at import, never reaches a client as UNSPECIFIED.
APPROVAL_REQUIRED, OUT_OF_SCOPE, UNKNOWN_KIND, JOURNAL_UNAVAILABLE = (
    RefusalReason.APPROVAL_REQUIRED, RefusalReason.OUT_OF_SCOPE, RefusalReason.UNKNOWN_KIND,
    RefusalReason.JOURNAL_UNAVAILABLE)
DIGEST_STALE, CLASS_MISMATCH, BINDING_MISMATCH = (
    RefusalReason.DIGEST_STALE, RefusalReason.CLASS_MISMATCH, RefusalReason.BINDING_MISMATCH)
LOCKED, DEFERRED = RefusalReason.LOCKED, RefusalReason.DEFERRED
APPROVABLE = frozenset({APPROVAL_REQUIRED, JOURNAL_UNAVAILABLE})
# The refusals that can spend a signed op (``spends``): those for the guest's state.
SPENDING = frozenset({DIGEST_STALE, BINDING_MISMATCH, CLASS_MISMATCH})


@dataclass(frozen=True, slots=True, kw_only=True)
class GateSettings:
    """The gate's tunables."""

    calls: CallSettings = field(default_factory=CallSettings)
    task_timeout: float = 900.0
    lost_grace: float = 120.0  # seconds after a lost answer before a task list without its task proves it absent
    max_stops_per_tick: int | None = None  # None: unlimited for the local file, max(2, 10%) for remote sources
    stop_window: float = 30.0  # the stop limit holds per window (the daemon's interval), however many ticks run
    audience: str | None = None  # node@cluster, read once from /cluster/status when unset
    secret: bytes | None = None  # state_dir/gate.secret: keys the challenges of DESTRUCTIVE approvals


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A step the gate did not run, and why."""

    vmid: int
    op_kind: str
    cls: Class
    reason: str
    detail: str
    op_id: str = ""
    payload_sha256: str = ""  # a signed op's: with op_id, which op (another op may reuse an op id)


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingApproval:
    """A refused non-benign step an operator could approve: the exact action, as a descriptor."""

    vmid: int
    op_kind: str
    cls: Class
    rule: str
    reasons: tuple[str, ...]
    source: Source
    reason: str
    descriptor: bytes
    first_seen: float
    challenge: str = ""

    @property
    def descriptor_sha256(self) -> str:
        """What binds an approval to this exact action."""
        return hashlib.sha256(self.descriptor).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Admitted:
    """A step the gate admitted, with the verdict and facts it was admitted under."""

    step: Step
    verdict: Verdict
    source: Source
    facts: GuestFacts = field(default_factory=GuestFacts)
    op: VerifiedOp | None = None  # the signed op that approves it (source OPERATOR_OP)


@dataclass(frozen=True, slots=True, kw_only=True)
class Judged:
    """One step as the gate judged it: its verdict and the decision (reason None: admitted)."""

    step: Step
    verdict: Verdict
    reason: str | None = None
    detail: str = ""

    @property
    def decision(self) -> str:
        """admitted, refused or deferred."""
        return "admitted" if self.reason is None else ("deferred" if self.reason == DEFERRED else "refused")


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """What the gate made of one batch of steps."""

    admitted: dict[int, list[Admitted]]
    refused: tuple[Refusal, ...] = ()
    deferred: tuple[int, ...] = ()  # stops held back by the per-window limit
    held: tuple[Judged, ...] = ()  # steps after a refused step of their guest: they wait for it (DEFERRED)
    pending: tuple[PendingApproval, ...] = ()  # the refused steps an operator could approve
    judged: tuple[Judged, ...] = ()  # every step, in order, with its decision (for the dry run)


@dataclass(frozen=True, slots=True, kw_only=True)
class GateState:
    """What GetStatus reports of the gate."""

    signed_ops: bool
    journal_ok: bool
    pending: int
    refused: int
    deferred: int
    max_stops_per_tick: int | None


def lock_of(listed: str, config: Mapping[str, str] | None) -> str:
    """The guest's lock: the guest list's, else the ``lock:`` line of a config read (PVE writes it there too;
    a backup begun after the list was read shows only in the config)."""
    return listed or (config or {}).get("lock", "")


def held_by(refused: Judged) -> str:
    """Why a later step of the same guest waits: the refused step, named with its kind and reason."""
    step = refused.step
    what = f"config step ({refused.verdict.op_kind})" if step.kind == SET_CONFIG else f"{step.kind} step"
    return f"held: waits for {what}, refused {refused.reason}"


def spends(reason: str, op: VerifiedOp, guest_type: str | None, facts: GuestFacts | None) -> bool:
    """Whether refusing ``op`` for ``reason`` spends it: the guest is not in the state the op was signed for.

    That state can come back (a digest is content, not a version: protection set, then cleared by another
    op, restores it), so such an op never runs later; the operators re-sign. DIGEST_STALE always spends; a
    BINDING_MISMATCH or CLASS_MISMATCH spends when the guest is gone (``guest_type`` None), of another type,
    or at another digest or run state than signed; with the guest as signed it came from the gate's side
    (a pending approval no longer listed), which may change back. LOCKED, PROTECTED, EXPIRED, the trust
    store's and the journal's refusals never spend.
    """
    if reason == DIGEST_STALE:
        return True
    if reason not in SPENDING:
        return False
    signed = op.payload
    return (facts is None or guest_type != signed.guest_type or facts.digest != signed.precondition.digest
            or facts.run_state != signed.precondition.run_state)


def to_action(step: Step) -> Action:
    """The classifier's view of a step (ValueError for a step no action can describe)."""
    return Action(kind=step.kind, vmid=step.vmid, guest_type=step.guest_type, set=dict(step.set),
                  delete=tuple(step.delete), params=dict(step.params))


def declaration_of(vmid: int, state: str | None, config: Mapping[str, str] | None,
                   description: str | None) -> Declaration:
    """What the desired state declares for one guest, as the scope check reads it."""
    values = dict(config or {})
    if description is not None:
        values["description"] = description
    return Declaration(vmid=vmid, state=state, config_keys=frozenset(config) if config is not None else None,
                       description=description is not None, values=values)


def descriptor(step: Step, verdict: Verdict, facts: GuestFacts, audience: str, cls: Class | None = None) -> bytes:
    """The exact action as canonical JSON: the action part a signed approval must name (``op sign`` takes it)."""
    try:
        body = bound_action(step, verdict, facts, audience, cls_name=cls.name if cls is not None else None)
    except Refused:  # a kind or value no op can name: still shown, never signable
        body = {"audience": audience, "vmid": step.vmid, "guest_type": step.guest_type, "kind": verdict.op_kind,
                "params": params_of(step, verdict.op_kind), "class": verdict.cls.name,
                "precondition": {"digest": facts.digest, "run_state": facts.run_state}}
    return canonical(body)


def canonical(body: Mapping[str, object]) -> bytes:
    """Sorted, compact, ASCII JSON: one spelling per action."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def readable(step: Step) -> tuple[Action | None, str]:
    """The classifier's view of a step, or why there is none (an unknown kind, a value no action holds)."""
    if step.kind == UNKNOWN or step.kind not in ACTION_KINDS:
        return None, step.detail or f"action kind {step.kind!r}"
    reserved = sorted({k for k, _ in step.set} & API_PARAMETERS)
    if reserved:
        return None, f"{', '.join(reserved)}: a parameter of PVE's config call, never a config key"
    try:
        return to_action(step), ""
    except ValueError as exc:
        return None, str(exc)


def unknown(step: Step, detail: str) -> Verdict:
    """The verdict of a step no rule can read: destructive (fail closed), never classified further."""
    return Verdict(cls=Class.DESTRUCTIVE, op_kind=UNKNOWN, rule="unknown_kind", reasons=(detail,))
