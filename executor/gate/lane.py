"""The gate's lane side: the last checks and the one Proxmox writer, inside the guest's queue lane.

``Lane.execute`` runs an admitted step: ``authorize`` reads what the step still needs right before
the call (a start applies PVE's pending section, read at most one lane ahead by ``executor.loop.readahead``;
a remote power action needs ``protection``; a signed op needs its binding, expiry, lock and protection
checked on fresh facts), then the journal's
begin record (which, for a signed op, spends its nonce), the call, the wait for the task, the end.

Nothing is run twice: a call whose answer was lost is not a failure but looked up in the guest's
task list and waited on. Until a definite answer (its task found and ended, or proven absent by a
task-list read that succeeded after PVE had time to register it) the call stays in flight in the
journal and its guest is held (``unsettled``): a lookup that fails is retried at the next tick,
never turned into a second call. The same rule as recovery at start (``executor.loop.recovery``).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog

from executor.errors import failure_fields
from executor.gate.actions import START, STOP, Step
from executor.gate.approvals import ApprovalBook
from executor.gate.decisions import (
    LOCKED,
    Admitted,
    GateSettings,
    PendingApproval,
    Refusal,
    descriptor,
    lock_of,
    to_action,
)
from executor.gate.journalport import JournalPort, JournalWrites, NoJournalError
from executor.gate.kinds import ACTION_KINDS, ActionKind
from executor.gate.standing import StandingRefusals
from executor.gate.steps import (
    ACTION_MARKED,
    PROTECTION_BLOCKS,
    action_key,
    before_image,
    bound_action,
    nonce_key,
    refused_key,
)
from executor.metrics import ExecutorMetrics
from executor.pve.node import PendingSection, PveError, PveNotSentError, PveReader, PveUnavailableError, PveWriter
from executor.pve.tasks import NOT_APPLIED, TaskOutcome, TaskResult, classify_exit, find_task, upid_user, wait_task
from journal import JournalError, KeyInFlightError, NonceSpentError, Outcome
from safety.classify import TRUSTED_FOR_PROTECTED_POWER, Action, Class, GuestFacts, Source, Verdict, classify
from safety.payload import check_binding
from safety.refusal import Refused
from safety.signedop import VerifiedOp

log = structlog.get_logger("executor.lane")
OUTCOMES = {TaskResult.OK: Outcome.OK, TaskResult.FAILED: Outcome.FAILED, TaskResult.UNKNOWN: Outcome.UNKNOWN}


class Ahead(Protocol):
    """Pending sections read ahead of the lane (``executor.loop.readahead.ReadAhead`` is one)."""

    def take(self, vmid: int) -> PendingSection | None:
        """The guest's pending section, if one was read early and is still fresh."""


def _applied(pending: PendingSection) -> dict[str, str]:
    """What GET .../config answers, from /pending's answer: the current values with the pending ones applied."""
    merged = {**pending.current, **pending.set}
    return {key: value for key, value in merged.items() if key not in pending.delete and key != "digest"}


@dataclass(frozen=True, slots=True, kw_only=True)
class InFlightCall:
    """A call whose request may have reached Proxmox and that has no definite answer yet.

    Its journal record stays in flight and its guest is held until the task is found and ends, or a
    task-list read made ``lost_grace`` after the loss proves it absent ("not applied").
    """

    admitted: Admitted
    op_id: str
    began_at: float  # wall time the call began: the task list is searched from here
    lost_at: float  # monotonic time the answer was given up on (or the task's deadline passed)
    upid: str = ""  # "" until the task is found
    detail: str = ""


class Lane:
    """Authorizes and runs admitted steps; the only holder of the Proxmox writer."""

    def __init__(self, *, reader: PveReader, writer: PveWriter | None, journal: JournalPort, writes: JournalWrites,
                 book: ApprovalBook, settings: GateSettings, metrics: ExecutorMetrics, wall: Callable[[], float],
                 audience: Callable[[], str], standing: StandingRefusals | None = None,
                 reverify: Callable[[VerifiedOp, Step, GuestFacts], Refused | None] | None = None,
                 ahead: Ahead | None = None) -> None:
        """``journal``: the gate's port; ``writes``: its writes over that port (spends, refusals, journal loss);
        ``book``: its approval book; ``wall``: its time; ``reverify``: the op verifier's (None: no signed ops);
        ``standing``: the gate's refusals standing now (logged once each)."""
        self._reader, self._writer, self._writes = reader, writer, writes
        self._standing = standing if standing is not None else StandingRefusals()
        self._journal, self._book, self._settings, self._metrics = journal, book, settings, metrics
        self._wall, self._audience, self._reverify = wall, audience, reverify
        self._lock = threading.Lock()
        self._counters: collections.Counter[tuple[str, str]] = collections.Counter()
        # nonce key -> before-image, from the lane's read: by the nonce key, not the op id, which another op may share
        self._before: dict[str, dict[str, str | None]] = {}
        self._unsettled: dict[str, InFlightCall] = {}  # op_id -> a call with no definite answer yet
        self._failures: dict[int, str] = {}  # vmid -> why its last failed step failed (PVE's words and the hint)
        self.ahead = ahead  # the next starts' pending sections, read early (None: always read in the lane)

    def failure(self, vmid: int) -> str:
        """Why guest ``vmid``'s last failed step failed ("" if none did): for a one-shot command's last line."""
        with self._lock:
            return self._failures.get(vmid, "")

    def counters(self) -> collections.Counter[tuple[str, str]]:
        """Actions run, by (kind, outcome)."""
        with self._lock:
            return collections.Counter(self._counters)

    # --- authorization ------------------------------------------------------------------------

    def authorize(self, admitted: Admitted) -> Refusal | None:
        """Right before the call: the facts a start, a remote power action or a signed op still needs.

        These reads run in parallel across lanes; config writes need none. A start reads only
        /pending, which holds the current values beside the pending ones (a remote start's protection
        is there too), maybe read ahead of the lane (``ReadAhead``). A class raised by what is read
        refuses the step. A PveError propagates: a read that failed is no verdict.
        """
        if admitted.op is not None:
            return self._authorize_op(admitted)
        step, source = admitted.step, admitted.source
        if step.kind not in (START, STOP):
            return None
        # A remote source's power action depends on ``protection``: read now, never taken from admission's read
        # (the flag may have been set since). A start's pending read carries the current config: no extra read.
        remote = source not in TRUSTED_FOR_PROTECTED_POWER
        if step.kind == STOP and not remote:
            return None
        pending = self._read_pending(admitted) if step.kind == START else None
        lock = lock_of("", pending.current) if pending is not None else ""
        if lock:  # the config's lock line, as PVE writes it: a backup begun since the guest list was read
            return self._refuse_locked(admitted, lock)
        if not remote:
            config = admitted.facts.config
        elif pending is not None:  # what GET .../config answers: the pending-applied view
            config = _applied(pending)
        else:
            config = self._reader.config(step.guest_type, step.vmid)[0]
        facts = replace(admitted.facts, config=config)
        verdict = self._with_pending(step.kind, classify(to_action(admitted.step), facts, source), facts, admitted,
                                     pending)
        if verdict.cls <= admitted.verdict.cls:
            return None
        return self._refuse(admitted, verdict, "APPROVAL_REQUIRED", f"{verdict.rule}: " + "; ".join(verdict.reasons))

    def _read_pending(self, admitted: Admitted) -> PendingSection:
        """The guest's pending section: read ahead of the lane when fresh (the local file's starts), else now.

        A remote source's start is judged on ``protection`` read right before the call (issue 13 item 5),
        so it never takes a read made ahead.
        """
        step = admitted.step
        ahead = self.ahead is not None and admitted.op is None and admitted.source is Source.LOCAL_FILE
        found = self.ahead.take(step.vmid) if ahead and self.ahead is not None else None
        return found if found is not None else self._reader.pending(step.guest_type, step.vmid)

    def _with_pending(self, kind: str, verdict: Verdict, facts: GuestFacts, admitted: Admitted,
                      pending: PendingSection | None = None) -> Verdict:
        """A start applies the pending section: it is as costly as writing those changes now (``pending``: as
        already read)."""
        if kind != START:
            return verdict
        step = admitted.step
        if pending is None:
            pending = self._reader.pending(step.guest_type, step.vmid)
        if not pending:
            return verdict
        change = Action(kind="set_config", vmid=step.vmid, guest_type=step.guest_type, set=pending.set,
                        delete=tuple(sorted(pending.delete)))
        applied = classify(change, replace(facts, config=pending.current), Source.OPERATOR_OP)
        if applied.cls <= verdict.cls:
            return verdict
        reasons = tuple(f"start applies pending {reason}" for reason in applied.reasons)
        return Verdict(cls=applied.cls, op_kind=verdict.op_kind, rule=f"pending_{applied.rule}", reasons=reasons)

    def _authorize_op(self, admitted: Admitted) -> Refusal | None:
        """Step 14 of docs/SAFETY.md §7: fresh facts, expiry, lock, binding, protection; no operation begins yet.

        A refusal for the guest's state (DIGEST_STALE, BINDING_MISMATCH, CLASS_MISMATCH) spends the nonce;
        any other leaves it unspent (LOCKED is retried by the desk until the op expires).
        """
        step, op = admitted.step, admitted.op
        assert op is not None
        now = self._wall()
        if now >= op.payload.not_after:
            return self._refuse_op(admitted, "EXPIRED", f"expired at {op.payload.not_after}, now {int(now)}")
        guest = self._reader.guests().find(step.vmid)  # PveAnswerError if its entry does not parse
        if guest is None:
            return self._refuse_op(admitted, "DIGEST_STALE", f"guest {step.vmid} is not on node {self._reader.node}")
        config, digest = self._reader.config(guest.type, step.vmid)
        facts = GuestFacts(config=config, digest=digest, run_state=guest.status, lock=lock_of(guest.lock, config))
        problem = self._op_problem(admitted, facts)
        if problem is not None:
            return self._refuse_op(admitted, *problem, guest_type=guest.type, facts=facts)
        with self._lock:
            self._before[nonce_key(op)] = before_image(config, step)
        return None

    def _op_problem(self, admitted: Admitted, facts: GuestFacts) -> tuple[str, str] | None:
        """The first reason the op may not run on ``facts`` (reason, detail), or None."""
        step, op = admitted.step, admitted.op
        assert op is not None
        if facts.lock:  # first: PVE writes the lock into the config, so it moves the digest, and LOCKED is retried
            return "LOCKED", f"guest {step.vmid} is locked ({facts.lock})"
        # The binding before anything else: an op refused for the guest's state is spent (``decisions.spends``),
        # and that must not wait behind a refusal that leaves it alive. Protection set after the signing moved
        # the digest: DIGEST_STALE, not PROTECTED (clearing the flag again would revive the op).
        verdict = self._with_pending(step.kind, classify(to_action(step), facts, Source.OPERATOR_OP),
                                     facts, admitted)
        cls = self._book.expected_class(step, verdict, facts, self._audience)
        try:
            check_binding(op.payload, bound_action(step, verdict, facts, self._audience(), cls_name=cls.name))
        except Refused as exc:
            return exc.reason.value, exc.detail
        again = self._reverify(op, step, facts) if self._reverify is not None else None
        if again is not None:
            return again.reason.value, again.detail
        ran = self._journal.last_refusal(action_key(op)) if op.payload.kind in ACTION_MARKED else None
        if ran is not None:
            return "DIGEST_STALE", f"this exact action already ran: {ran[1]}"
        if op.payload.kind in PROTECTION_BLOCKS and facts.protection:
            return "PROTECTED", (f"guest {step.vmid} has protection=1: clear it first with its own approved "
                                 "config.protection_off op")
        check = getattr(ACTION_KINDS[step.kind], "check", None)  # e.g. a disk resize that would shrink
        problem = check(step, facts.config) if check is not None else None
        return None if problem is None else ("MALFORMED", problem)

    def _refuse_op(self, admitted: Admitted, reason: str, detail: str, *, guest_type: str | None = None,
                   facts: GuestFacts | None = None) -> Refusal:
        """Refuse the signed op, spending it when refused for the guest's state (``facts``: as read; None: gone)."""
        op = admitted.op
        assert op is not None
        if not self._writes.spend(op, reason, detail, guest_type=guest_type, facts=facts):
            reason, detail = "JOURNAL_UNAVAILABLE", f"{reason} ({detail}), and spending the op failed"
        refusal = Refusal(vmid=admitted.step.vmid, op_kind=op.payload.kind, cls=Class[op.payload.class_],
                          reason=reason, detail=detail, op_id=op.payload.op_id, payload_sha256=op.payload_sha256)
        self._metrics.gate_decisions.labels(refusal.cls.name.lower(), "refused", reason.lower()).inc()
        self._standing.note(refusal, admitted.step, where="lane")
        self._book.count_refused()
        self._writes.write(lambda j: j.refuse(vmid=refusal.vmid, kind=refusal.op_kind, reason=reason,
                                              detail=detail, op_id=refusal.op_id,
                                              key=refused_key(refusal.op_id, op.payload_sha256, reason)))
        return refusal

    def _refuse_locked(self, admitted: Admitted, lock: str) -> Refusal:
        """A locked guest's step: not sent (PVE would fail it), tried again at a later tick; nothing to approve."""
        verdict = admitted.verdict
        refusal = Refusal(vmid=admitted.step.vmid, op_kind=verdict.op_kind, cls=verdict.cls, reason=LOCKED,
                          detail=f"guest {admitted.step.vmid} is locked ({lock}): a later tick")
        self._metrics.gate_decisions.labels(verdict.cls.name.lower(), "refused", "locked").inc()
        self._standing.note(refusal, admitted.step, cls=verdict.cls.name, where="lane")
        self._book.count_refused()
        self._writes.refusal(refusal)
        return refusal

    def _refuse(self, admitted: Admitted, verdict: Verdict, reason: str, detail: str) -> Refusal:
        refusal = Refusal(vmid=admitted.step.vmid, op_kind=verdict.op_kind, cls=verdict.cls, reason=reason,
                          detail=detail)
        self._metrics.gate_decisions.labels(verdict.cls.name.lower(), "refused", reason.lower()).inc()
        self._standing.note(refusal, admitted.step, cls=verdict.cls.name, where="lane")
        self._book.count_refused()
        self._book.keep(PendingApproval(
            vmid=refusal.vmid, op_kind=verdict.op_kind, cls=verdict.cls, rule=verdict.rule, reasons=verdict.reasons,
            source=admitted.source, reason=reason, first_seen=time.time(),
            descriptor=descriptor(admitted.step, verdict, admitted.facts, self._audience())))
        self._writes.refusal(refusal)
        return refusal

    # --- execution ----------------------------------------------------------------------------

    def execute(self, admitted: Admitted) -> Outcome | Refusal:
        """Authorize, journal, call Proxmox, wait for the task, journal the end.

        Never raises for PVE errors; a step refused in the lane returns its Refusal and is not run.
        A call with no definite answer (lost, or its task still running at the deadline) returns
        UNKNOWN and stays in flight, its guest held, until ``unsettled`` settles it.
        """
        step = admitted.step
        kind = ACTION_KINDS[step.kind]
        if self._writer is None:
            raise RuntimeError("this gate has no writer (a dry run)")
        bound = log.bind(vmid=step.vmid, action=step.kind, guest_type=step.guest_type)
        try:
            refusal = self.authorize(admitted)
        except PveError as exc:
            bound.warning("action", outcome="failed", error=f"cannot authorize: {exc}", **failure_fields(exc))
            self._count(step.kind, Outcome.FAILED)
            with self._lock:
                self._failures[step.vmid] = f"cannot authorize: {exc}"
            return Outcome.FAILED
        if refusal is not None:
            return refusal
        self._standing.clear(step.vmid, (admitted.verdict.op_kind,))  # not refused: what stood for it is over
        started, began_at = time.monotonic(), time.time()
        begun = self._begin(admitted)
        if not isinstance(begun, str):
            return begun
        bound = bound.bind(op_id=begun)
        called, upid = self._call(admitted, kind, began_at, bound, begun)
        if upid:
            bound = bound.bind(upid=upid)  # the task started: every later event of this step names it
        if isinstance(called, InFlightCall):
            with self._lock:
                self._unsettled[begun] = called  # its guest held from planning until a definite answer
            bound.warning("action_in_flight", detail=called.detail,
                          duration_s=round(time.monotonic() - started, 3))
            return Outcome.UNKNOWN
        return self._settle(admitted, begun, called, bound, time.monotonic() - started)

    def _settle(self, admitted: Admitted, op_id: str, result: TaskOutcome, bound: Any, duration: float) -> Outcome:
        """The definite end of a call: journaled, counted, logged (a signed op's action marked as run)."""
        step, op = admitted.step, admitted.op
        if result.result is TaskResult.FAILED and ACTION_KINDS[step.kind].is_already_there(result.exitstatus):
            result = TaskOutcome(TaskResult.OK, result.exitstatus)
        outcome = OUTCOMES[result.result]
        self._writes.write(lambda j: j.end(op_id, outcome, "" if outcome is Outcome.OK else result.exitstatus))
        if op is not None and op.payload.kind in ACTION_MARKED and outcome is not Outcome.FAILED:
            self._writes.write(lambda j: j.mark_ran(
                vmid=step.vmid, kind=op.payload.kind, op_id=op.payload.op_id,
                detail=f"op {op.payload.op_id} ran it ({outcome.value}): the same action needs a new proposal",
                key=action_key(op)))
        self._count(step.kind, outcome)
        failed = outcome is not Outcome.OK
        bound.info("action", outcome=outcome.value, duration_s=round(duration, 3),
                   **({"error": result.exitstatus} if failed else {}),
                   **({"cause": result.cause, "hint": result.hint} if failed and result.cause else {}))
        if outcome is Outcome.FAILED:
            with self._lock:
                self._failures[step.vmid] = result.why
        return outcome

    def _call(self, admitted: Admitted, kind: ActionKind, began_at: float, bound: Any,
              op_id: str) -> tuple[TaskOutcome | InFlightCall, str]:
        """The call and its task (its UPID, "" when none is known): waited on until it ends or its deadline
        passes (then in flight)."""
        sent = self._send(admitted, kind, began_at, bound, op_id)
        if not isinstance(sent, str):
            return sent, sent.upid if isinstance(sent, InFlightCall) else ""
        if not sent:
            return TaskOutcome(TaskResult.OK, ""), ""  # a synchronous call that answered: done
        self._writes.write(lambda j: j.task(op_id, sent))
        waiting = time.monotonic()
        result = wait_task(self._reader, sent, deadline=waiting + self._settings.task_timeout)
        self._metrics.task_wait.observe(time.monotonic() - waiting)
        if not result.ended:
            return InFlightCall(admitted=admitted, op_id=op_id, began_at=began_at, lost_at=time.monotonic(),
                                upid=sent, detail=result.exitstatus), sent
        return result, sent

    def _send(self, admitted: Admitted, kind: ActionKind, began_at: float, bound: Any,
              op_id: str) -> str | TaskOutcome | InFlightCall:
        """The request: its UPID ("" for a synchronous answer), a definite failure, or a call in flight.

        PVE may have taken a call whose answer was lost: "no answer" is never read as "not done"
        (that is how things run twice). Its task is looked for at once; not found, the call is in flight.
        """
        step = admitted.step
        assert self._writer is not None
        try:
            return kind.call(self._writer, step, self._settings.calls) or ""
        except PveNotSentError as exc:  # no connection was made: a definite "not done", planned again
            return TaskOutcome(TaskResult.FAILED, f"{NOT_APPLIED}: {exc}", cause=exc.cause, hint=exc.hint)
        except PveUnavailableError as exc:
            if step.guest_type in kind.untasked:  # nothing to look for; the write's digest guards the next plan
                return TaskOutcome(TaskResult.UNKNOWN, f"no answer, and this call leaves no task: {exc}")
            lost = InFlightCall(admitted=admitted, op_id=op_id, began_at=began_at, lost_at=time.monotonic(),
                                detail=f"no answer: {exc}")
            found = self._look_up(lost, bound)
            if isinstance(found, InFlightCall) and found.upid:
                return found.upid
            return lost if found is None else found  # not found yet, or (no grace) proven absent
        except PveError as exc:
            return TaskOutcome(TaskResult.FAILED, str(exc), cause=exc.cause, hint=exc.hint)

    def _look_up(self, call: InFlightCall, bound: Any) -> InFlightCall | TaskOutcome | None:
        """Search the guest's task list for a lost call's task.

        The call with its UPID when found (journaled); "not applied" when a read that succeeded, begun
        at least ``lost_grace`` after the answer was lost (PVE had time to register the task), shows
        none; None when the lookup failed or came too early (still in flight, looked for again).
        """
        kind = ACTION_KINDS[call.admitted.step.kind]
        vmid = call.admitted.step.vmid
        late = time.monotonic() - call.lost_at >= self._settings.lost_grace  # before the read, not after
        try:
            upid = find_task(self._reader, vmid, kind.task_types, since=call.began_at - 1)
        except PveError as exc:
            bound.warning("lost_answer_lookup_failed", error=str(exc))
            return None
        if upid is None:
            if not late:
                return None
            return TaskOutcome(TaskResult.FAILED, f"{NOT_APPLIED}: {call.detail}; no task for it in PVE's task list")
        bound.warning("answer_lost_task_found", upid=upid)
        return replace(call, upid=upid)

    def _check(self, call: InFlightCall) -> InFlightCall | TaskOutcome:
        """One look at an in-flight call: its task found, its end, or the proof that it never ran."""
        bound = log.bind(vmid=call.admitted.step.vmid, action=call.admitted.step.kind, op_id=call.op_id)
        if not call.upid:
            found = self._look_up(call, bound)
            if found is None:
                return call
            if isinstance(found, TaskOutcome):
                return found
            call = found
            self._writes.write(lambda j: j.task(call.op_id, call.upid))
        try:
            status = self._reader.task_status(call.upid)
        except PveError as exc:
            bound.warning("in_flight_task_unreadable", upid=call.upid, error=str(exc))
            return call
        if status.get("status") != "stopped":
            return call
        return classify_exit(str(status.get("exitstatus", "")), upid_user(call.upid))

    def unsettled(self) -> set[int]:
        """Guests with a call in flight (answer lost, or task past its deadline): not to be planned.

        Each is looked at once (a task-list or task-status read); one that gets a definite answer is
        settled here (journaled and counted) and released.
        """
        with self._lock:
            waiting = dict(self._unsettled)
        still = set()
        for op_id, call in waiting.items():
            checked = self._check(call)
            vmid = call.admitted.step.vmid
            if isinstance(checked, InFlightCall):
                still.add(vmid)
                with self._lock:
                    self._unsettled[op_id] = checked
                continue
            with self._lock:
                self._unsettled.pop(op_id, None)
            step = call.admitted.step
            self._settle(call.admitted, call.op_id, checked,
                         log.bind(vmid=vmid, action=step.kind, guest_type=step.guest_type, op_id=call.op_id,
                                  settled="later", **({"upid": call.upid} if call.upid else {})),
                         time.monotonic() - call.lost_at)
        return still

    def _count(self, kind: str, outcome: Outcome) -> None:
        with self._lock:
            self._counters[(kind, outcome.value)] += 1
        self._metrics.actions.labels(kind, outcome.value).inc()

    def _begin(self, admitted: Admitted) -> str | Refusal:
        """Journal the intent; for a signed op the same fdatasync'd record spends its nonce (``op:<op_id>``)."""
        step, journal, op = admitted.step, self._journal, admitted.op
        payload: dict[str, object] = {**step.payload(), "class": admitted.verdict.cls.name.lower(),
                                      "source": admitted.source.value}
        if op is not None:
            with self._lock:
                before = self._before.pop(nonce_key(op), {})
            payload.update(digest=op.payload.precondition.digest, before=before,
                           op={"id": op.payload.op_id, "kind": op.payload.kind, "class": op.payload.class_,
                               "role": op.payload.role, "signers": list(op.signers), "sha256": op.payload_sha256,
                               "not_after": op.payload.not_after})
        try:
            # A signed op is journaled under its own op_id: one id in the journal, the log, the API and the CLI.
            return journal.begin(vmid=step.vmid, kind=step.kind, payload=payload,
                                 key=nonce_key(op) if op is not None else None,
                                 op_id=op.payload.op_id if op is not None else None)
        except NoJournalError:  # journal-less: a benign step runs unjournaled, a signed op does not run
            return self._refuse_op(admitted, "JOURNAL_UNAVAILABLE", "the journal is not working")
        except NonceSpentError:
            return self._refuse_op(admitted, "NONCE_SPENT", "this signed op was already used")
        except KeyInFlightError:
            return self._refuse_op(admitted, "NONCE_IN_FLIGHT", "this signed op is running now")
        except JournalError as exc:
            self._writes.lose(exc)
            if op is not None:  # nothing durable says the nonce was spent: the op did not run
                return self._refuse_op(admitted, "JOURNAL_UNAVAILABLE", f"the journal failed: {exc}")
            return os.urandom(8).hex()
