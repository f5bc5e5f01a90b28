"""The safety gate: the one place where the executor decides what may mutate Proxmox.

Every mutation source (the tick, the executor API, selftest, signed operations; later the hub)
reaches Proxmox through ``Engine.submit``, which asks the gate to *admit* each step; the gate's
``Lane`` (``executor.gate.lane``), which alone holds the ``PveWriter``, authorizes and runs each admitted
step in the guest's queue lane. What the planner (or any remote part) returns is never trusted:
each step is checked against what was declared (guest, key, value, direction), against the guest
as read (its type, the digest it was planned from), classified by its effect
(``safety.classify``), and only benign steps run, unless a verified signed op names exactly that
action. Anything else is refused with a typed reason and, where an operator could approve it,
listed as a pending approval with a descriptor of the exact action. A refused step never stops
the other guests. Without a working journal only benign steps run.

Admission makes no Proxmox reads (a refused step pays one to bind its descriptor to a digest).
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import replace
from typing import Protocol

import structlog

from executor.gate.actions import SET_CONFIG, START, STOP, Step
from executor.gate.approvals import ApprovalBook
from executor.gate.audience import Audience
from executor.gate.decisions import (
    APPROVABLE,
    APPROVAL_REQUIRED,
    BINDING_MISMATCH,
    CLASS_MISMATCH,
    DEFERRED,
    DIGEST_STALE,
    JOURNAL_UNAVAILABLE,
    LOCKED,
    OUT_OF_SCOPE,
    UNKNOWN_KIND,
    Admission,
    Admitted,
    GateSettings,
    GateState,
    Judged,
    PendingApproval,
    Refusal,
    descriptor,
    held_by,
    lock_of,
    readable,
    unknown,
)
from executor.gate.journalport import NO_JOURNAL, JournalPort, JournalReads, JournalWrites
from executor.gate.kinds import ACTION_KINDS
from executor.gate.lane import Ahead, Lane
from executor.gate.standing import StandingRefusals
from executor.gate.stopledger import StopLedger
from executor.metrics import ExecutorMetrics
from executor.pve.node import GuestState, PveError, PveReader, PveWriter
from journal import Journal, JournalError, Outcome
from safety import challenge as challenges
from safety.blast import StopBudget, limit_stops
from safety.classify import Action, Class, GuestFacts, Source, Verdict, classify
from safety.refusal import Refused
from safety.scope import Declaration, out_of_scope
from safety.signedop import VerifiedOp

log = structlog.get_logger("executor.gate")
# How a remote stop's lane ended -> whether it ran (None: unknown, so it still counts); refused: it did not.
# How a remote stop's lane ended, for the ledger. A failed task reached PVE: the guest may still power off
# (a shutdown that timed out, then landed), so it is kept like an unknown one until a read settles it.
_STOP_RAN: dict[Outcome, bool | None] = {Outcome.OK: True, Outcome.FAILED: None, Outcome.UNKNOWN: None}

class NodeView(Protocol):
    """What admission reads of the node (``executor.loop.observe.Observed`` is one; the gate never imports the loop)."""

    @property
    def guests(self) -> Mapping[int, GuestState]:
        """This node's guests whose run state the planner understands."""

    @property
    def configs(self) -> Mapping[int, tuple[dict[str, str], str]]:
        """vmid -> (pending-applied config, digest), for the guests whose config was read."""

    @property
    def listed(self) -> frozenset[int] | None:
        """Every vmid of this node's lists (None: not read, or the lists had holes)."""


class Gate:
    """Admits steps by scope, binding and class; keeps the pending approvals."""

    def __init__(self, *, reader: PveReader, writer: PveWriter | None, journal: JournalPort = NO_JOURNAL,
                 settings: GateSettings | None = None, metrics: ExecutorMetrics | None = None,
                 dry_run: bool = False, wall: Callable[[], float] = time.time,
                 ledger: StopLedger | None = None, ahead: Ahead | None = None,
                 reverify: Callable[[VerifiedOp, Step, GuestFacts], Refused | None] | None = None,
                 audience: Audience | None = None) -> None:
        """``ahead``: the starts' pending sections read ahead of the lanes; ``reverify``: a signed op checked
        again against the trust store in force, in the lane (the op desk's; None: no signed ops); ``journal``:
        the journal's port (``NO_JOURNAL``: none, so only benign steps run); ``audience``: shared with the op
        verifier (default: the settings' audience, else node@cluster as read)."""
        self._reader, self._dry_run = reader, dry_run
        self.wall = wall  # the gate's time: never before the journal's high-water mark (the daemon wires it)
        self.journal_port = journal  # switched to NO_JOURNAL in place when a write fails (``lose_journal``)
        self.writes = JournalWrites(journal)  # the gate's and the lane's writes, spends and journal loss
        self.settings = settings or GateSettings()
        self.metrics = metrics or ExecutorMetrics()
        self.book = ApprovalBook()  # pending approvals and the refusal counts
        self.standing = StandingRefusals()  # each refusal logged once, when it appears or changes
        self.metrics.refusals_standing.set_function(lambda: float(len(self.standing)))
        self._audience = audience if audience is not None else Audience(reader, self.settings.audience)
        # What remote sources stopped, and when (the daemon's is durable, in state_dir; see ``_limit_stops``).
        self.ledger = ledger if ledger is not None else StopLedger()
        self.lane = Lane(reader=reader, writer=writer, journal=self.journal_port, writes=self.writes, book=self.book,
                         standing=self.standing,
                         settings=self.settings, metrics=self.metrics, wall=self.wall, audience=self._audience,
                         reverify=reverify, ahead=ahead)

    # --- admission ----------------------------------------------------------------------------

    def admit(self, steps: Mapping[int, Sequence[Step]], *, observed: NodeView,
              declared: Mapping[int, Declaration], source: Source, record: bool = True,
              op: VerifiedOp | None = None, population: Mapping[int, Declaration] | None = None,
              held: Set[int] | None = None) -> Admission:
        """Check and classify every step; admit the benign ones within the stop limit.

        ``declared``: what the steps may do (the guests planned now). ``population``: every guest the
        source declares on this node, held ones too, for the blast radius (default: ``declared``): a
        guest held out of this tick (busy, just stopped) still counts as managed, and as stopped.
        ``record``: journal refusals, keep pending approvals and count (False for the dry run).
        ``op``: the verified signed op the steps come from: it admits exactly the action it names.
        ``held``: given by a tick, whose ``observed`` read the whole node: the guests it left out (their
        state is in motion); the record of remote stops is first brought up to date with that read.
        """
        if op is None and source is Source.OPERATOR_OP:
            source = Source.HUB  # only a verified op is an operator's: anything else claiming it is remote
        if held is not None and observed.listed is not None and not self.ledger.idle():
            # Not after a guest list with holes: a guest it dropped is not gone, and its stop still counts.
            self.ledger.settle(status={vmid: g.status for vmid, g in observed.guests.items()},
                               present=observed.listed, held=held, now=self.wall(),
                               grace=self.settings.task_timeout, save=record)
        admitted: dict[int, list[Admitted]] = {}
        refused: list[Refusal] = []
        pending: list[PendingApproval] = []
        judged: list[Judged] = []
        waiting: list[Judged] = []  # held behind a refused step of their guest
        refused_steps: list[Step] = []  # beside ``refused`` (a blast-radius refusal of a stop is added later)
        seen: set[Step] = set()
        for vmid, guest_steps in steps.items():
            facts = self._facts(vmid, observed)
            blocker: Judged | None = None  # the guest's first refused step: its later steps wait for it
            for step in guest_steps:
                verdict, reason, detail = self._judge(step, facts, observed, declared=declared.get(vmid),
                                                      source=source, op=op)
                if reason is None and step in seen:
                    reason, detail = OUT_OF_SCOPE, "the same step twice in one plan: it runs once"
                seen.add(step)
                if reason is None and blocker is not None:  # config, then run state: never start on the old config
                    waiting.append(Judged(step=step, verdict=verdict, reason=DEFERRED, detail=held_by(blocker)))
                    judged.append(waiting[-1])
                    continue
                judged.append(Judged(step=step, verdict=verdict, reason=reason, detail=detail))
                if reason is None:
                    assert facts is not None  # a step for a guest not on this node is never admitted
                    run = replace(step, digest=facts.digest) if step.kind == SET_CONFIG and facts.digest else step
                    # ``run`` writes against the config version the gate classified, whatever the planner sent.
                    admitted.setdefault(vmid, []).append(Admitted(step=run, verdict=verdict, source=source,
                                                                  facts=facts, op=op))
                    continue
                if op is not None and record and not self.spend(
                        op, reason, detail, guest_type=observed.guests[vmid].type if facts is not None else None,
                        facts=facts):
                    reason, detail = JOURNAL_UNAVAILABLE, f"{reason} ({detail}), and spending the op failed"
                blocker = blocker or judged[-1]  # the first refused step is the one the later ones wait for
                refused_steps.append(step)
                refused.append(Refusal(vmid=vmid, op_kind=verdict.op_kind, cls=verdict.cls, reason=reason,
                                       detail=detail, op_id=op.payload.op_id if op is not None else "",
                                       payload_sha256=op.payload_sha256 if op is not None else ""))
                if reason in APPROVABLE and facts is not None and op is None:
                    pending.append(self._pending_of(step, verdict, facts, source, reason))
        deferred = self._limit_stops(admitted, refused, pending, judged, observed=observed, planned=declared,
                                     declared=population if population is not None else declared,
                                     source=source, record=record)
        if record:
            # A tick replaces the pending entries of the guests it planned; a signed op's admission plans
            # nothing, and the entry it approves must stay listed until its lane has run it.
            self._record(refused, pending, deferred, set(steps) | set(declared), observed, prune=op is None,
                         waiting=waiting, admitted=admitted, steps=refused_steps,
                         declared=set(population if population is not None else declared))
        return Admission(admitted=admitted, refused=tuple(refused), deferred=deferred, pending=tuple(pending),
                         judged=tuple(judged), held=tuple(waiting))

    def _judge(self, step: Step, facts: GuestFacts | None, observed: NodeView, *, declared: Declaration | None,
               source: Source, op: VerifiedOp | None) -> tuple[Verdict, str | None, str]:
        """The verdict, and the refusal reason (None: admitted) with its detail."""
        action, unreadable = readable(step)
        if action is None:
            return unknown(step, unreadable), UNKNOWN_KIND, unreadable
        if facts is None:
            return classify(action, GuestFacts(), source), OUT_OF_SCOPE, "the guest is not on this node"
        if step.kind in (START, STOP) and facts.config is None:
            # The plan did not read this guest's config; the lane reads it (``Lane.authorize``) before the call.
            verdict = classify(action, replace(facts, config={}), source)
        else:
            verdict = classify(action, facts, source)
        for check in (self._guest_type, self._in_scope, self._digest_current):
            refusal = check(step, action, facts, observed, declared, op)
            if refusal is not None:
                return verdict, *refusal
        if op is not None:
            return self._judge_op(step, verdict, facts, op)
        if verdict.cls is Class.BENIGN:
            return verdict, None, ""
        detail = f"{verdict.rule}: " + "; ".join(verdict.reasons)
        journal_less = not self.journal_port.working and not self._dry_run
        return verdict, JOURNAL_UNAVAILABLE if journal_less else APPROVAL_REQUIRED, detail

    # Checks before the class (each: None, or the refusal reason and its detail).

    @staticmethod
    def _guest_type(step: Step, _action: Action, _facts: GuestFacts, observed: NodeView,
                    _declared: Declaration | None, op: VerifiedOp | None) -> tuple[str, str] | None:
        """The endpoint and the key table follow the guest as read, never the planner's (or a signer's) word."""
        actual = observed.guests[step.vmid].type
        if actual == step.guest_type:
            return None
        # A signed op binds its guest type: a vmid re-created as the other type is no longer its guest.
        return (BINDING_MISMATCH if op is not None else OUT_OF_SCOPE,
                f"the step is for a {step.guest_type} guest, guest {step.vmid} is {actual}")

    @staticmethod
    def _in_scope(_step: Step, action: Action, facts: GuestFacts, _observed: NodeView,
                  declared: Declaration | None, op: VerifiedOp | None) -> tuple[str, str] | None:
        """Desired state may do only what it declared (a signed op is scoped by its own binding)."""
        why = None if op is not None else out_of_scope(action, declared, facts.config)
        return None if why is None else (OUT_OF_SCOPE, why)

    @staticmethod
    def _digest_current(step: Step, _action: Action, facts: GuestFacts, _observed: NodeView,
                        _declared: Declaration | None, op: VerifiedOp | None) -> tuple[str, str] | None:
        """A config write planned from another version of the config is stale (PVE would refuse it too).

        No digest read (the config could not be read, or its answer did not parse): no write, whatever
        digest the planner sent; the gate admits no write whose facts it could not read. A signed op's
        digest is checked by ``_judge_op``, after the lock: a lock moves the digest, and LOCKED is
        retried where a stale op is spent.
        """
        if op is not None or step.kind != SET_CONFIG:
            return None
        if not facts.digest:
            return DIGEST_STALE, (f"no config digest was read for guest {step.vmid}: a config write needs the "
                                  "version it was planned from")
        if not step.digest or step.digest == facts.digest:
            return None
        return DIGEST_STALE, f"planned from config digest {step.digest[:12]}, the guest's is {facts.digest[:12]}"

    def _judge_op(self, step: Step, verdict: Verdict, facts: GuestFacts,
                  op: VerifiedOp) -> tuple[Verdict, str | None, str]:
        """A signed op's step: its class and kind must be the verdict's (no downgrade, no over-approval)."""
        if not self.journal_port.working:
            return verdict, JOURNAL_UNAVAILABLE, "a signed op needs a working journal (its nonce is spent there)"
        if facts.lock:  # before the digest: PVE writes the lock into the config, so it moves the digest too
            return verdict, LOCKED, f"guest {step.vmid} is locked ({facts.lock}): retried until the op expires"
        if op.payload.precondition.digest != facts.digest:
            return verdict, DIGEST_STALE, (f"signed for config digest {op.payload.precondition.digest[:12]}, "
                                           f"the guest's is {facts.digest[:12]}")
        expected = self.expected_class(step, verdict, facts)
        if op.payload.class_ != expected.name:
            return verdict, CLASS_MISMATCH, f"signed {op.payload.class_}, the gate classes it {expected.name}"
        if op.payload.kind != verdict.op_kind:
            return verdict, BINDING_MISMATCH, f"signed kind {op.payload.kind}, the step is {verdict.op_kind}"
        return verdict, None, ""

    def spend(self, op: VerifiedOp, reason: str, detail: str, *, guest_type: str | None,
              facts: GuestFacts | None) -> bool:
        """Spend ``op``'s nonce if it was refused for the guest's state (``JournalWrites.spend``)."""
        return self.writes.spend(op, reason, detail, guest_type=guest_type, facts=facts)

    def expected_class(self, step: Step, verdict: Verdict, facts: GuestFacts) -> Class:
        """The class a signed op for ``step`` must carry (``ApprovalBook.expected_class``)."""
        return self.book.expected_class(step, verdict, facts, self.audience)

    def _facts(self, vmid: int, observed: NodeView) -> GuestFacts | None:
        """What the classifier needs of the guest, as read for the plan (admission reads nothing more)."""
        guest = observed.guests.get(vmid)
        if guest is None:
            return None
        config, digest = observed.configs.get(vmid, (None, ""))
        return GuestFacts(config=config, digest=digest, run_state=guest.status, lock=lock_of(guest.lock, config))

    def _limit_stops(self, admitted: dict[int, list[Admitted]], refused: list[Refusal], pending: list[PendingApproval],
                     judged: list[Judged], *, observed: NodeView, declared: Mapping[int, Declaration],
                     planned: Mapping[int, Declaration], source: Source, record: bool) -> tuple[int, ...]:
        """The blast radius: a stop rate per window, and no remote source stops over half the managed guests.

        The count is of what the node has. ``managed``: the declared guests that are on this node
        (phantom vmids raise nothing) and the guests a remote source stopped (the ledger), declared
        or not. Stopped: the ledger's, every declared guest stopped now (whatever its declared run
        state), and those declared stopped held out of this tick (not ``planned``: busy, a stop
        possibly running in their lane). A remote stop is
        admitted only once the ledger holds it (durably, with its time in the rate window).
        """
        stops = sorted(vmid for vmid, steps in admitted.items()
                       if any(a.step.kind == STOP and a.op is None for a in steps))
        if not stops:
            return ()
        remote = set(self.ledger.stopped())  # un-declaring a guest it stopped frees a source nothing
        managed = len({vmid for vmid in declared if vmid in observed.guests} | remote)
        # Every managed guest stopped now counts, whatever is declared of it (a hub that declares the stopped
        # guests without a run state must not get them out of the count); and the ones held out of this tick
        # that are declared stopped (a stop may be running in their lane).
        stopping = {vmid for vmid, d in declared.items() if vmid in observed.guests
                    and (observed.guests[vmid].status == "stopped" or (d.state == "stopped" and vmid not in planned))}
        already = len((stopping | remote) - set(stops))
        now = self.wall()
        window = self.settings.stop_window
        used = self.ledger.used(now=now, window=window) if source is not Source.LOCAL_FILE else 0
        budget = limit_stops(stops, managed=managed, source=source, max_stops_per_tick=self.settings.max_stops_per_tick,
                             already_stopped=already, used=used)
        later = "stop limit: a later tick"
        if record and source is not Source.LOCAL_FILE and budget.admitted \
                and not self.ledger.record(budget.admitted, now=now, window=window):
            later = "the record of remote stops cannot be written: a later tick"
            budget = StopBudget(admitted=(), deferred=tuple(sorted((*budget.admitted, *budget.deferred))),
                                need_approval=budget.need_approval)
        for vmid in (*budget.deferred, *budget.need_approval):
            stop = next(a for a in admitted[vmid] if a.step.kind == STOP)
            admitted[vmid] = [a for a in admitted[vmid] if a is not stop]
            if not admitted[vmid]:
                del admitted[vmid]
            position = next(i for i, j in enumerate(judged) if j.step == stop.step)
            if vmid in budget.deferred:
                judged[position] = replace(judged[position], reason="DEFERRED", detail=later)
                continue
            verdict = Verdict(cls=Class.APPROVAL, op_kind=stop.verdict.op_kind, rule="blast_radius",
                              reasons=(f"a {source.value} source asks to stop {len(stops)} of {managed} managed "
                                       f"guests at once ({already} already stopped)",))
            detail = "blast_radius: " + verdict.reasons[0]
            judged[position] = Judged(step=stop.step, verdict=verdict, reason=APPROVAL_REQUIRED, detail=detail)
            refused.append(Refusal(vmid=vmid, op_kind=verdict.op_kind, cls=verdict.cls, reason=APPROVAL_REQUIRED,
                                   detail=detail))
            pending.append(self._pending_of(stop.step, verdict, stop.facts, source, APPROVAL_REQUIRED))
        return tuple(budget.deferred)

    def _pending_of(self, step: Step, verdict: Verdict, facts: GuestFacts, source: Source,
                    reason: str) -> PendingApproval:
        if not facts.digest and step.kind in ACTION_KINDS:
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
        return PendingApproval(vmid=step.vmid, op_kind=verdict.op_kind, cls=verdict.cls, rule=verdict.rule,
                       reasons=verdict.reasons, source=source, reason=reason, descriptor=action,
                       first_seen=time.time(), challenge=challenge)

    def audience(self) -> str:
        """node@cluster: what a signed approval names (read once, only when first needed)."""
        return self._audience()

    # --- what the gate keeps ------------------------------------------------------------------

    def _record(self, refused: Sequence[Refusal], pending: Sequence[PendingApproval], deferred: Sequence[int],
                planned: set[int], observed: NodeView, *, prune: bool, waiting: Sequence[Judged] = (),
                admitted: Mapping[int, Sequence[Admitted]] | None = None, steps: Sequence[Step] = (),
                declared: Set[int] | None = None) -> None:
        """Count, log, keep the pending list, and journal a refusal when first seen or when its reason changes.

        ``prune``: drop the entries of the ``planned`` guests (declared and not held, or given a step) and
        of guests gone from the node; a guest planned with nothing left to do has nothing pending. A
        refusal is logged when it appears or changes (``StandingRefusals``), counted every time; what a planned
        guest no longer asks for stands no more (an admitted step's may stand on: its lane may refuse it again),
        nor what stood for a guest no longer declared (``declared``: every declared guest, held ones too).
        """
        if prune:
            asked = {(r.vmid, r.op_kind) for r in refused} | {(j.step.vmid, j.verdict.op_kind) for j in waiting}
            asked |= {(a.step.vmid, a.verdict.op_kind) for run in (admitted or {}).values() for a in run}
            self.standing.keep_only(lambda key: key in asked or (key[0] not in planned and key[0] in observed.guests
                                                                 and (declared is None or key[0] in declared)))
        for index, refusal in enumerate(refused):  # ``steps``: the refused steps, in order, as far as known
            self.metrics.gate_decisions.labels(refusal.cls.name.lower(), "refused", refusal.reason.lower()).inc()
            self.standing.note(refusal, steps[index] if index < len(steps) else None, cls=refusal.cls.name)
        for _ in deferred:
            self.metrics.gate_decisions.labels("benign", "deferred", "stop_limit").inc()
        for judged in waiting:
            self.metrics.gate_decisions.labels(judged.verdict.cls.name.lower(), "deferred", "held").inc()
        # One swap: an op admitted meanwhile never sees its approval missing. When pruning, the entries of
        # guests not planned this tick (busy, backing off) stay.
        self.book.record(refused=len(refused), deferred=len(deferred), pending=pending,
                         keep=(lambda p: p.vmid not in planned and p.vmid in observed.guests) if prune else None)
        for refusal in refused:
            self.journal_refusal(refusal)

    def keep_pending(self, entry: PendingApproval) -> None:
        """List ``entry`` for approval (keeping when it was first seen)."""
        self.book.keep(entry)

    def journal_refusal(self, refusal: Refusal) -> None:
        """Journal ``refusal`` unless it repeats the last one (``JournalWrites.refusal``)."""
        self.writes.refusal(refusal)

    def count_admitted(self, admission: Admission) -> None:
        """Count the admitted steps (the refusals were counted by ``admit``)."""
        for steps in admission.admitted.values():
            for admitted in steps:
                self.metrics.gate_decisions.labels(admitted.verdict.cls.name.lower(), "admitted", "none").inc()

    def count_refused(self) -> None:
        """One more refusal (made in a lane)."""
        self.book.count_refused()

    def pending(self) -> list[PendingApproval]:
        """Pending approvals, by vmid then op kind."""
        return self.book.entries()

    def state(self) -> GateState:
        """The gate's state; the book's counts read together."""
        pending, refused, deferred = self.book.counts()
        return GateState(signed_ops=False, journal_ok=self.journal_port.working, pending=pending, refused=refused,
                         deferred=deferred, max_stops_per_tick=self.settings.max_stops_per_tick)

    @property
    def counters(self) -> collections.Counter[tuple[str, str]]:
        """Actions run, by (kind, outcome) (kept by the lane)."""
        return self.lane.counters()

    def execute(self, admitted: Admitted) -> Outcome | Refusal:
        """Run an admitted step in its lane (see ``Lane.execute``); a remote stop's end goes to the ledger."""
        result = self.lane.execute(admitted)
        if admitted.step.kind == STOP and admitted.op is None and admitted.source is not Source.LOCAL_FILE:
            self.ledger.stop_ended(admitted.step.vmid, ran=_STOP_RAN[result] if isinstance(result, Outcome) else False)
        return result

    @property
    def records(self) -> JournalReads:
        """What is read of the journal: the journal, or ``NO_JOURNAL`` (nothing in flight, nothing recorded)."""
        return self.journal_port

    @property
    def journal(self) -> Journal | None:
        """The journal itself (None when it could not open or a write failed): for recovery and tests."""
        return self.journal_port.journal

    def journal_write(self, write: Callable[[Journal], object]) -> bool:
        """One journal write (True: written); a failure switches the gate to benign-only (``JournalWrites``)."""
        return self.writes.write(write)

    def lose_journal(self, exc: JournalError | OSError) -> None:
        """From here on only benign steps are admitted (``JournalWrites.lose``)."""
        self.writes.lose(exc)
