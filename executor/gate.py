"""The safety gate: the one place where the executor mutates Proxmox.

Every mutation source (the tick, the executor API, selftest; later the hub and signed operations)
reaches Proxmox through ``Engine.submit``, which asks the gate to *admit* each step, and the gate
alone holds the ``PveWriter`` that *executes* them. What the planner (or any remote part) returns
is never trusted: each step is scope-checked against what was declared, classified by its effect
(``safety.classify``), and only benign steps run. Anything else is refused with a typed reason
and, where an operator could approve it, listed as a pending approval with a descriptor of the
exact action. A refused step never stops the other guests. Without a working journal only benign
steps run (nothing non-benign may run that a crash could not account for).

Admission makes no Proxmox reads. In the guest's lane, right before the call, ``authorize`` reads
what a start or a remote stop still needs (a start applies PVE's pending section, pending disk
changes included; a remote source's power action needs ``protection``): those reads run in
parallel across lanes, and config writes need none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import structlog

from executor.actions import START, STOP, UNKNOWN, Step
from executor.kinds import KINDS, CallSettings
from executor.metrics import ExecutorMetrics
from executor.observe import Observed
from executor.opsteps import PROTECTION_BLOCKS, before_image, bound_action, params_of
from executor.pve import PveError, PveReader, PveWriter, TaskOutcome, TaskResult, wait_task
from journal import BURN_PREFIX, Journal, JournalError, KeyInFlightError, NonceSpentError, Outcome
from safety import challenge as challenges
from safety.blast import limit_stops
from safety.classify import Action, Class, GuestFacts, Source, Verdict, classify
from safety.payload import check_binding
from safety.refusal import Refused
from safety.scope import Declaration, out_of_scope
from safety.signedop import VerifiedOp

log = structlog.get_logger("executor.gate")
OUTCOMES = {TaskResult.OK: Outcome.OK, TaskResult.FAILED: Outcome.FAILED, TaskResult.UNKNOWN: Outcome.UNKNOWN}
DRIVE_KEY = re.compile(r"(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0|rootfs|mp\d+|unused\d+|vmstate")

# Refusal reasons (the executor.v1 RefusalReason names without their prefix).
APPROVAL_REQUIRED, OUT_OF_SCOPE, UNKNOWN_KIND, JOURNAL_UNAVAILABLE = (
    "APPROVAL_REQUIRED", "OUT_OF_SCOPE", "UNKNOWN_KIND", "JOURNAL_UNAVAILABLE")


@dataclass(frozen=True, slots=True, kw_only=True)
class GateSettings:
    """The gate's tunables."""

    calls: CallSettings = field(default_factory=CallSettings)
    task_timeout: float = 900.0
    max_stops_per_tick: int | None = None  # None: unlimited for the local file, max(2, 10%) for remote sources
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Pending:
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
    """A step the gate admitted, with the verdict it was admitted under."""

    step: Step
    verdict: Verdict
    source: Source
    facts: GuestFacts = field(default_factory=GuestFacts)
    op: VerifiedOp | None = None  # the signed op that approves it (source OPERATOR_OP)


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """What the gate made of one batch of steps."""

    admitted: dict[int, list[Admitted]]
    refused: tuple[Refusal, ...] = ()
    deferred: tuple[int, ...] = ()  # stops held back by the per-tick limit
    pending: tuple[Pending, ...] = ()  # the refused steps an operator could approve
    verdicts: tuple[tuple[Step, Verdict], ...] = ()  # every classified step, in order (for the dry run)


@dataclass(frozen=True, slots=True, kw_only=True)
class GateState:
    """What GetStatus reports of the gate."""

    signed_ops: bool
    journal_ok: bool
    pending: int
    refused: int
    deferred: int
    max_stops_per_tick: int | None


def to_action(step: Step) -> Action:
    """The classifier's view of a step."""
    return Action(kind=step.kind, vmid=step.vmid, guest_type=step.guest_type, set=dict(step.set),
                  delete=tuple(step.delete))


def declaration_of(vmid: int, state: str | None, config: Mapping[str, str] | None, description: bool) -> Declaration:
    """What the desired state declares for one guest, as the scope check reads it."""
    return Declaration(vmid=vmid, state=state, config_keys=frozenset(config) if config is not None else None,
                       description=description)


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


class Gate:
    """Admits steps by scope and class; the only holder of the Proxmox writer."""

    def __init__(self, *, reader: PveReader, writer: PveWriter | None, journal: Journal | None,
                 settings: GateSettings | None = None, metrics: ExecutorMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, dry_run: bool = False,
                 wall: Callable[[], float] = time.time) -> None:
        self._reader, self._writer, self._dry_run = reader, writer, dry_run
        self.wall = wall  # the gate's time: never before the journal's high-water mark (the daemon wires it)
        self.journal = journal
        self.settings = settings or GateSettings()
        self.metrics = metrics or ExecutorMetrics()
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._before: dict[str, dict[str, str | None]] = {}  # op_id -> before-image, from the lane's read
        self._audience = self.settings.audience
        self.counters: Counter[tuple[str, str]] = Counter()
        self.refused_total = 0
        self.deferred_total = 0

    # --- admission ----------------------------------------------------------------------------

    def admit(self, steps: Mapping[int, Sequence[Step]], *, observed: Observed,
              declared: Mapping[int, Declaration], source: Source, managed: int, record: bool = True,
              op: VerifiedOp | None = None) -> Admission:
        """Scope-check and classify every step; admit the benign ones within the stop limit.

        ``record``: journal refusals, keep pending approvals and count (False for the dry run).
        ``op``: the verified signed op the steps come from (source OPERATOR_OP): it admits exactly
        the action it names, whatever its class.
        """
        admitted: dict[int, list[Admitted]] = {}
        refused: list[Refusal] = []
        pending: list[Pending] = []
        verdicts: list[tuple[Step, Verdict]] = []
        for vmid, guest_steps in steps.items():
            facts = self._facts(vmid, observed)
            for step in guest_steps:
                verdict, reason, detail = self._judge(step, facts, declared.get(vmid), source, op)
                verdicts.append((step, verdict))
                if reason is None:
                    assert facts is not None  # a step for a guest not on this node is never admitted
                    admitted.setdefault(vmid, []).append(Admitted(step=step, verdict=verdict, source=source,
                                                                  facts=facts, op=op))
                    continue
                refused.append(Refusal(vmid=vmid, op_kind=verdict.op_kind, cls=verdict.cls, reason=reason,
                                       detail=detail))
                if reason in (APPROVAL_REQUIRED, JOURNAL_UNAVAILABLE) and facts is not None:
                    pending.append(self._pending_of(step, verdict, facts, source, reason))
        deferred = self._limit_stops(admitted, refused, pending, observed=observed, source=source, managed=managed)
        if record:
            self._record(refused, pending, deferred, set(steps), observed)
        return Admission(admitted=admitted, refused=tuple(refused), deferred=deferred, pending=tuple(pending),
                         verdicts=tuple(verdicts))

    def _judge(self, step: Step, facts: GuestFacts | None, declared: Declaration | None,
               source: Source, op: VerifiedOp | None = None) -> tuple[Verdict, str | None, str]:
        """The verdict, and the refusal reason (None: admitted) with its detail."""
        if step.kind == UNKNOWN or step.kind not in KINDS or facts is None:
            verdict = classify(to_action(step), facts or GuestFacts(), source)
            if facts is None and step.kind in KINDS:
                return verdict, OUT_OF_SCOPE, "the guest is not on this node"
            return verdict, UNKNOWN_KIND, step.detail or f"action kind {step.kind!r}"
        action = to_action(step)
        if source in (Source.LOCAL_FILE, Source.HUB, Source.SELFTEST):
            why = out_of_scope(action, declared)
            if why is not None:
                return classify(action, facts, source), OUT_OF_SCOPE, why
        if step.kind in (START, STOP) and facts.config is None:
            # The plan did not read this guest's config; the lane reads it (``authorize``) before the call.
            verdict = classify(action, replace(facts, config={}), source)
        else:
            verdict = classify(action, facts, source)
        if op is not None:
            return self._judge_op(step, verdict, facts, op)
        if verdict.cls is Class.BENIGN:
            return verdict, None, ""
        detail = f"{verdict.rule}: " + "; ".join(verdict.reasons)
        if self.journal is None and not self._dry_run:
            return verdict, JOURNAL_UNAVAILABLE, detail
        return verdict, APPROVAL_REQUIRED, detail

    def _judge_op(self, step: Step, verdict: Verdict, facts: GuestFacts, op: VerifiedOp) -> tuple[Verdict, str | None, str]:
        """A signed op's step: its class and kind must be the verdict's (no downgrade, no over-approval)."""
        if self.journal is None:
            return verdict, JOURNAL_UNAVAILABLE, "a signed op needs a working journal (its nonce is spent there)"
        expected = self.expected_class(step, verdict, facts)
        if op.payload.class_ != expected.name:
            return verdict, "CLASS_MISMATCH", f"signed {op.payload.class_}, the gate classes it {expected.name}"
        if op.payload.kind != verdict.op_kind:
            return verdict, "BINDING_MISMATCH", f"signed kind {op.payload.kind}, the step is {verdict.op_kind}"
        return verdict, None, ""

    def expected_class(self, step: Step, verdict: Verdict, facts: GuestFacts) -> Class:
        """The class a signed op for ``step`` must carry: the verdict's, or a pending approval's when higher.

        A remote source's stops beyond the blast radius were listed as APPROVAL; signing that exact
        descriptor approves it, although the same stop from an operator alone is benign.
        """
        action = descriptor(step, verdict, facts, self.audience())
        with self._lock:
            listed = [p.cls for p in self._pending.values() if p.descriptor == action]
        return max([verdict.cls, *listed])

    def _facts(self, vmid: int, observed: Observed) -> GuestFacts | None:
        """What the classifier needs of the guest, as read for the plan (admission reads nothing more)."""
        guest = observed.guests.get(vmid)
        if guest is None:
            return None
        config, digest = observed.configs.get(vmid, (None, ""))
        return GuestFacts(config=config, digest=digest, run_state=guest.status, lock=guest.lock)

    def authorize(self, admitted: Admitted) -> Refusal | None:
        """In the guest's lane, right before the call: the facts a start or a remote stop still needs.

        A start applies PVE's pending section (pending disk deletes and swaps included), so its
        pending keys are read here; a start or stop from a remote source needs ``protection``, so the
        config is read when the plan did not read it. These reads run in parallel in the lanes, one
        per start, and none for config writes. A class raised by what is read refuses the step.
        """
        step, source = admitted.step, admitted.source
        if admitted.op is not None:
            return self._authorize_op(admitted)
        if step.kind not in (START, STOP):
            return None
        needs_config = source not in (Source.LOCAL_FILE, Source.OPERATOR_OP)
        if step.kind == STOP and not needs_config:
            return None
        # A PveError here propagates: a read that failed is no verdict, the step fails and is retried.
        config = self._reader.config(step.guest_type, step.vmid)[0] if needs_config else None
        pending = (frozenset(k for k in self._reader.pending_keys(step.guest_type, step.vmid)
                             if DRIVE_KEY.fullmatch(k)) if step.kind == START else frozenset())
        facts = replace(admitted.facts, config=config if config is not None else admitted.facts.config,
                        pending_drive_keys=pending)
        verdict = classify(to_action(step), facts, source)
        if verdict.cls <= admitted.verdict.cls:
            return None
        detail = f"{verdict.rule}: " + "; ".join(verdict.reasons)
        return self._refuse_in_lane(admitted, verdict, APPROVAL_REQUIRED, detail)

    def _authorize_op(self, admitted: Admitted) -> Refusal | None:
        """Steps 13 of §4.4, in the lane: fresh facts, expiry, lock, protection, binding; nothing written yet.

        A refusal here leaves the nonce unspent (LOCKED is retried by the desk until the op expires).
        """
        step, op = admitted.step, admitted.op
        assert op is not None
        payload = op.payload
        now = self.wall()
        if now >= payload.not_after:
            return self._refuse_op(admitted, "EXPIRED", f"expired at {payload.not_after}, now {int(now)}")
        guest = next((g for g in self._reader.guests() if g.vmid == step.vmid), None)
        if guest is None:
            return self._refuse_op(admitted, "DIGEST_STALE", f"guest {step.vmid} is not on node {self._reader.node}")
        config, digest = self._reader.config(guest.type, step.vmid)
        pending = frozenset(k for k in self._reader.pending_keys(guest.type, step.vmid) if DRIVE_KEY.fullmatch(k)) \
            if step.kind == START else frozenset()
        facts = GuestFacts(config=config, digest=digest, run_state=guest.status, lock=guest.lock,
                           pending_drive_keys=pending)
        if guest.lock:
            return self._refuse_op(admitted, "LOCKED", f"guest {step.vmid} is locked ({guest.lock})")
        if payload.kind in PROTECTION_BLOCKS and facts.protection:
            return self._refuse_op(admitted, "PROTECTED", f"guest {step.vmid} has protection=1: clear it first "
                                                          "with its own approved config.protection_off op")
        verdict = classify(to_action(step), facts, Source.OPERATOR_OP)
        expected = bound_action(step, verdict, facts, self.audience(),
                                cls_name=self.expected_class(step, verdict, facts).name)
        try:
            check_binding(payload, expected)
        except Refused as exc:
            return self._refuse_op(admitted, exc.reason.value, exc.detail)
        check = getattr(KINDS[step.kind], "check", None)  # e.g. a disk resize that would shrink
        problem = check(step, config) if check is not None else None
        if problem is not None:
            return self._refuse_op(admitted, "MALFORMED", problem)
        self._before[payload.op_id] = before_image(config, step)
        return None

    def _refuse_op(self, admitted: Admitted, reason: str, detail: str) -> Refusal:
        op = admitted.op
        assert op is not None
        refusal = Refusal(vmid=admitted.step.vmid, op_kind=op.payload.kind, cls=Class[op.payload.class_],
                          reason=reason, detail=detail, op_id=op.payload.op_id)
        self.metrics.gate_decisions.labels(refusal.cls.name.lower(), "refused", reason.lower()).inc()
        log.warning("gate_refused", vmid=refusal.vmid, op_kind=refusal.op_kind, op_id=refusal.op_id, reason=reason,
                    detail=detail, where="lane")
        with self._lock:
            self.refused_total += 1
        self._journal(lambda j: j.refuse(vmid=refusal.vmid, kind=refusal.op_kind, reason=reason, detail=detail,
                                         op_id=refusal.op_id, key=f"op:{refusal.op_id}:refused"))
        return refusal

    def _refuse_in_lane(self, admitted: Admitted, verdict: Verdict, reason: str, detail: str) -> Refusal:
        refusal = Refusal(vmid=admitted.step.vmid, op_kind=verdict.op_kind, cls=verdict.cls, reason=reason,
                          detail=detail)
        self.metrics.gate_decisions.labels(verdict.cls.name.lower(), "refused", reason.lower()).inc()
        log.warning("gate_refused", vmid=refusal.vmid, op_kind=refusal.op_kind, cls=verdict.cls.name,
                    reason=reason, detail=detail, where="lane")
        entry = Pending(vmid=refusal.vmid, op_kind=verdict.op_kind, cls=verdict.cls, rule=verdict.rule,
                        reasons=verdict.reasons, source=admitted.source, reason=reason, first_seen=time.time(),
                        descriptor=descriptor(admitted.step, verdict, admitted.facts, self.audience()))
        with self._lock:
            self.refused_total += 1
            key = f"{entry.vmid}:{entry.op_kind}:{entry.descriptor_sha256}"
            old = self._pending.get(key)
            self._pending[key] = replace(entry, first_seen=old.first_seen) if old is not None else entry
        self._journal_refusal(refusal)
        return refusal

    def _limit_stops(self, admitted: dict[int, list[Admitted]], refused: list[Refusal], pending: list[Pending], *,
                     observed: Observed, source: Source, managed: int) -> tuple[int, ...]:
        """At most ``max_stops_per_tick`` stops; a remote source stopping over half the guests needs approval."""
        stops = sorted(vmid for vmid, steps in admitted.items() if any(a.step.kind == STOP for a in steps))
        if not stops:
            return ()
        budget = limit_stops(stops, managed=managed, source=source, max_stops_per_tick=self.settings.max_stops_per_tick)
        for vmid in (*budget.deferred, *budget.need_approval):
            kept = [a for a in admitted[vmid] if a.step.kind != STOP]
            stop = next(a for a in admitted[vmid] if a.step.kind == STOP)
            if kept:
                admitted[vmid] = kept
            else:
                del admitted[vmid]
            if vmid in budget.need_approval:
                verdict = Verdict(cls=Class.APPROVAL, op_kind=stop.verdict.op_kind, rule="blast_radius",
                                  reasons=(f"a {source.value} source asks to stop {len(stops)} of {managed} "
                                           "managed guests at once",))
                refused.append(Refusal(vmid=vmid, op_kind=verdict.op_kind, cls=verdict.cls, reason=APPROVAL_REQUIRED,
                                       detail="blast_radius: " + verdict.reasons[0]))
                guest = observed.guests[vmid]
                facts = GuestFacts(config=None, digest=observed.configs.get(vmid, ({}, ""))[1],
                                   run_state=guest.status, lock=guest.lock)
                pending.append(self._pending_of(stop.step, verdict, facts, source, APPROVAL_REQUIRED))
        return tuple(budget.deferred)

    def _pending_of(self, step: Step, verdict: Verdict, facts: GuestFacts, source: Source, reason: str) -> Pending:
        if not facts.digest and step.kind in KINDS:
            # Only refused steps pay this read: an approval must bind the config version it was planned on.
            try:
                config, digest = self._reader.config(step.guest_type, step.vmid)
                facts = replace(facts, config=facts.config if facts.config is not None else config, digest=digest)
            except PveError as exc:
                log.warning("config_unreadable", vmid=step.vmid, error=str(exc))
        action = descriptor(step, verdict, facts, self.audience())
        challenge = ""
        if self.settings.secret is not None and verdict.cls is Class.DESTRUCTIVE:
            challenge = challenges.issue(self.settings.secret, json.loads(action), now=self.wall())
        return Pending(vmid=step.vmid, op_kind=verdict.op_kind, cls=verdict.cls, rule=verdict.rule,
                       reasons=verdict.reasons, source=source, reason=reason, descriptor=action,
                       first_seen=time.time(), challenge=challenge)

    def audience(self) -> str:
        """node@cluster: what a signed approval names (read once, only when first needed)."""
        if self._audience is None:
            try:
                cluster = self._reader.cluster_name()
            except PveError:
                return f"{self._reader.node}@"  # not cached: the next refusal tries again
            self._audience = f"{self._reader.node}@{cluster}"
        return self._audience

    def _record(self, refused: Sequence[Refusal], pending: Sequence[Pending], deferred: Sequence[int],
                planned: set[int], observed: Observed) -> None:
        """Count, log, keep the pending list, and journal a refusal when first seen or when its reason changes."""
        for refusal in refused:
            self.metrics.gate_decisions.labels(refusal.cls.name.lower(), "refused", refusal.reason.lower()).inc()
            log.warning("gate_refused", vmid=refusal.vmid, op_kind=refusal.op_kind, cls=refusal.cls.name,
                        reason=refusal.reason, detail=refusal.detail)
        for _ in deferred:
            self.metrics.gate_decisions.labels("benign", "deferred", "stop_limit").inc()
        with self._lock:
            self.refused_total += len(refused)
            self.deferred_total += len(deferred)
            # Pending entries of guests not planned this tick (busy, backing off) stay; the rest are replaced.
            kept = {k: p for k, p in self._pending.items() if p.vmid not in planned and p.vmid in observed.guests}
            for entry in pending:
                key = f"{entry.vmid}:{entry.op_kind}:{entry.descriptor_sha256}"
                old = self._pending.get(key)
                kept[key] = replace(entry, first_seen=old.first_seen) if old is not None else entry
            self._pending = kept
        for refusal in refused:
            self._journal_refusal(refusal)

    def _journal_refusal(self, refusal: Refusal) -> None:
        # The journal keeps the last reason per key (across restarts): a refusal seen every tick is written once.
        key = f"{refusal.vmid}:{refusal.op_kind}"
        self._journal(lambda j: j.refuse_if_new(vmid=refusal.vmid, kind=refusal.op_kind, reason=refusal.reason,
                                                detail=refusal.detail, key=key))

    def count_admitted(self, admission: Admission) -> None:
        """Count the admitted steps (the refusals were counted by ``admit``)."""
        for steps in admission.admitted.values():
            for admitted in steps:
                self.metrics.gate_decisions.labels(admitted.verdict.cls.name.lower(), "admitted", "none").inc()

    def pending(self) -> list[Pending]:
        """Pending approvals, by vmid then op kind."""
        with self._lock:
            return sorted(self._pending.values(), key=lambda p: (p.vmid, p.op_kind, p.descriptor_sha256))

    def state(self) -> GateState:
        """The gate's state, read under its lock."""
        with self._lock:
            return GateState(signed_ops=False, journal_ok=self.journal is not None, pending=len(self._pending),
                             refused=self.refused_total, deferred=self.deferred_total,
                             max_stops_per_tick=self.settings.max_stops_per_tick)

    # --- execution ----------------------------------------------------------------------------

    def execute(self, admitted: Admitted) -> Outcome | Refusal:
        """Authorize in the lane, journal, call Proxmox, wait for the task, journal the end.

        Never raises for PVE errors; a step refused in the lane returns its Refusal and is not run.
        """
        step = admitted.step
        kind = KINDS[step.kind]
        if self._writer is None:
            raise RuntimeError("this gate has no writer (a dry run)")
        try:
            refusal = self.authorize(admitted)
        except PveError as exc:
            log.warning("action", vmid=step.vmid, action=step.kind, outcome="failed", error=f"cannot authorize: {exc}")
            self._count(step.kind, Outcome.FAILED)
            return Outcome.FAILED
        if refusal is not None:
            return refusal
        bound = log.bind(vmid=step.vmid, action=step.kind, guest_type=step.guest_type)
        started = self._clock()
        begun = self._begin(admitted)
        if isinstance(begun, Refusal):
            return begun
        op_id = begun
        bound = bound.bind(op_id=op_id)
        try:
            upid = kind.call(self._writer, step, self.settings.calls)
            if upid:
                bound = bound.bind(upid=upid)
                self._journal(lambda j: j.task(op_id, upid))
                waiting = self._clock()
                result = wait_task(self._reader, upid, deadline=waiting + self.settings.task_timeout)
                self.metrics.task_wait.observe(self._clock() - waiting)
            else:
                result = TaskOutcome(TaskResult.OK, "")
        except PveError as exc:
            result = TaskOutcome(TaskResult.FAILED, str(exc))
        if result.result is TaskResult.FAILED and kind.is_already_there(result.exitstatus):
            result = TaskOutcome(TaskResult.OK, result.exitstatus)
        outcome = OUTCOMES[result.result]
        self._journal(lambda j: j.end(op_id, outcome, "" if outcome is Outcome.OK else result.exitstatus))
        self._count(step.kind, outcome)
        bound.info("action", outcome=outcome.value, duration_s=round(self._clock() - started, 3),
                   **({"error": result.exitstatus} if outcome is not Outcome.OK else {}))
        return outcome

    def _count(self, kind: str, outcome: Outcome) -> None:
        with self._lock:
            self.counters[(kind, outcome.value)] += 1
        self.metrics.actions.labels(kind, outcome.value).inc()

    def _begin(self, admitted: Admitted) -> str | Refusal:
        """Journal the intent; for a signed op the same fdatasync'd record spends its nonce (``op:<op_id>``)."""
        step, journal, op = admitted.step, self.journal, admitted.op
        payload: dict[str, object] = {**step.payload(), "class": admitted.verdict.cls.name.lower(),
                                      "source": admitted.source.value}
        if op is not None:
            payload.update(digest=op.payload.precondition.digest, before=self._before.pop(op.payload.op_id, {}),
                           op={"id": op.payload.op_id, "kind": op.payload.kind, "class": op.payload.class_,
                               "role": op.payload.role, "signers": list(op.signers), "sha256": op.payload_sha256,
                               "not_after": op.payload.not_after})
        if journal is None:
            if op is not None:
                return self._refuse_op(admitted, JOURNAL_UNAVAILABLE, "the journal is not working")
            return os.urandom(8).hex()
        key = f"{BURN_PREFIX}{op.payload.op_id}" if op is not None else None
        try:
            with self.metrics.journal_append.time():
                return journal.begin(vmid=step.vmid, kind=step.kind, payload=payload, key=key)
        except NonceSpentError:
            return self._refuse_op(admitted, "NONCE_SPENT", "this signed op was already used")
        except KeyInFlightError:
            return self._refuse_op(admitted, "NONCE_IN_FLIGHT", "this signed op is running now")
        except JournalError as exc:
            self._lose_journal(exc)
            if op is not None:  # nothing durable says the nonce was spent: the op did not run
                return self._refuse_op(admitted, JOURNAL_UNAVAILABLE, f"the journal failed: {exc}")
            return os.urandom(8).hex()

    def _journal(self, write: Callable[[Journal], object]) -> None:
        journal = self.journal
        if journal is None:
            return
        try:
            with self.metrics.journal_append.time():
                write(journal)
        except JournalError as exc:
            self._lose_journal(exc)

    def _lose_journal(self, exc: JournalError) -> None:
        # From here on only benign steps are admitted (JOURNAL_UNAVAILABLE for the rest).
        log.error("journal_failed_benign_only_from_now", error=str(exc))
        self.journal = None
