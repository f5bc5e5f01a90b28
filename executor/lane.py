"""The gate's lane side: the last checks and the one Proxmox writer, inside the guest's queue lane.

``Lane.execute`` runs an admitted step: ``authorize`` reads what the step still needs right before
the call (a start applies PVE's pending section, read at most one lane ahead by ``executor.readahead``;
a remote power action needs ``protection``; a signed op needs its binding, expiry, lock and protection
checked on fresh facts), then the journal's
begin record (which, for a signed op, spends its nonce), the call, the wait for the task, the end.

Nothing is run twice: a call whose answer was lost is not a failure but looked up in the guest's
task list and waited on; a task still running at the deadline keeps its guest held (``unsettled``)
until PVE says it stopped.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from executor.actions import START, STOP
from executor.decisions import Admitted, Pending, Refusal, descriptor, to_action
from executor.kinds import KINDS, ActionKind
from executor.opsteps import ACTION_MARKED, PROTECTION_BLOCKS, action_key, before_image, bound_action, nonce_key
from executor.pve import Pending as PendingSection
from executor.pve import PveError, PveReader, PveUnavailableError, PveWriter, TaskOutcome, TaskResult, wait_task
from journal import BURN_PREFIX, JournalError, KeyInFlightError, NonceSpentError, Outcome
from safety.classify import TRUSTED_FOR_PROTECTED_POWER, Action, Class, GuestFacts, Source, Verdict, classify
from safety.payload import check_binding
from safety.refusal import Refused

if TYPE_CHECKING:
    from executor.gate import Gate
    from executor.readahead import ReadAhead

log = structlog.get_logger("executor.lane")
OUTCOMES = {TaskResult.OK: Outcome.OK, TaskResult.FAILED: Outcome.FAILED, TaskResult.UNKNOWN: Outcome.UNKNOWN}


def _applied(pending: PendingSection) -> dict[str, str]:
    """What GET .../config answers, from /pending's answer: the current values with the pending ones applied."""
    merged = {**pending.current, **pending.set}
    return {key: value for key, value in merged.items() if key not in pending.delete and key != "digest"}


class Lane:
    """Authorizes and runs admitted steps; the only holder of the Proxmox writer."""

    def __init__(self, *, gate: Gate, reader: PveReader, writer: PveWriter | None) -> None:
        self._gate, self._reader, self._writer = gate, reader, writer
        self._lock = threading.Lock()
        self._counters: collections.Counter[tuple[str, str]] = collections.Counter()
        self._before: dict[str, dict[str, str | None]] = {}  # op_id -> before-image, from the lane's read
        self._unsettled: dict[int, str] = {}  # vmid -> UPID of a task still running past its deadline
        self.ahead: ReadAhead | None = None  # set by the engine: the next starts' pending sections, read early

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
        """Step 13 of §4.4: fresh facts, expiry, lock, binding, protection; no operation begins yet.

        A refusal for the guest's state (DIGEST_STALE, BINDING_MISMATCH, CLASS_MISMATCH) spends the nonce;
        any other leaves it unspent (LOCKED is retried by the desk until the op expires).
        """
        step, op = admitted.step, admitted.op
        assert op is not None
        now = self._gate.wall()
        if now >= op.payload.not_after:
            return self._refuse_op(admitted, "EXPIRED", f"expired at {op.payload.not_after}, now {int(now)}")
        guest = next((g for g in self._reader.guests() if g.vmid == step.vmid), None)
        if guest is None:
            return self._refuse_op(admitted, "DIGEST_STALE", f"guest {step.vmid} is not on node {self._reader.node}")
        config, digest = self._reader.config(guest.type, step.vmid)
        facts = GuestFacts(config=config, digest=digest, run_state=guest.status, lock=guest.lock)
        problem = self._op_problem(admitted, facts)
        if problem is not None:
            return self._refuse_op(admitted, *problem, guest_type=guest.type, facts=facts)
        with self._lock:
            self._before[op.payload.op_id] = before_image(config, step)
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
        cls = self._gate.expected_class(step, verdict, facts)
        try:
            check_binding(op.payload, bound_action(step, verdict, facts, self._gate.audience(), cls_name=cls.name))
        except Refused as exc:
            return exc.reason.value, exc.detail
        again = self._gate.reverify(op, step, facts) if self._gate.reverify is not None else None
        if again is not None:
            return again.reason.value, again.detail
        journal = self._gate.journal
        ran = journal.last_refusal(action_key(op)) if journal is not None and op.payload.kind in ACTION_MARKED else None
        if ran is not None:
            return "DIGEST_STALE", f"this exact action already ran: {ran[1]}"
        if op.payload.kind in PROTECTION_BLOCKS and facts.protection:
            return "PROTECTED", (f"guest {step.vmid} has protection=1: clear it first with its own approved "
                                 "config.protection_off op")
        check = getattr(KINDS[step.kind], "check", None)  # e.g. a disk resize that would shrink
        problem = check(step, facts.config) if check is not None else None
        return None if problem is None else ("MALFORMED", problem)

    def _refuse_op(self, admitted: Admitted, reason: str, detail: str, *, guest_type: str | None = None,
                   facts: GuestFacts | None = None) -> Refusal:
        """Refuse the signed op, spending it when refused for the guest's state (``facts``: as read; None: gone)."""
        op = admitted.op
        assert op is not None
        if not self._gate.spend(op, reason, detail, guest_type=guest_type, facts=facts):
            reason, detail = "JOURNAL_UNAVAILABLE", f"{reason} ({detail}), and spending the op failed"
        refusal = Refusal(vmid=admitted.step.vmid, op_kind=op.payload.kind, cls=Class[op.payload.class_],
                          reason=reason, detail=detail, op_id=op.payload.op_id)
        self._gate.metrics.gate_decisions.labels(refusal.cls.name.lower(), "refused", reason.lower()).inc()
        log.warning("gate_refused", vmid=refusal.vmid, op_kind=refusal.op_kind, op_id=refusal.op_id, reason=reason,
                    detail=detail, where="lane")
        self._gate.count_refused()
        self._gate.journal_write(lambda j: j.refuse(vmid=refusal.vmid, kind=refusal.op_kind, reason=reason,
                                                    detail=detail, op_id=refusal.op_id,
                                                    key=f"{BURN_PREFIX}{refusal.op_id}:refused"))
        return refusal

    def _refuse(self, admitted: Admitted, verdict: Verdict, reason: str, detail: str) -> Refusal:
        refusal = Refusal(vmid=admitted.step.vmid, op_kind=verdict.op_kind, cls=verdict.cls, reason=reason,
                          detail=detail)
        self._gate.metrics.gate_decisions.labels(verdict.cls.name.lower(), "refused", reason.lower()).inc()
        log.warning("gate_refused", vmid=refusal.vmid, op_kind=refusal.op_kind, cls=verdict.cls.name,
                    reason=reason, detail=detail, where="lane")
        self._gate.count_refused()
        self._gate.keep_pending(Pending(
            vmid=refusal.vmid, op_kind=verdict.op_kind, cls=verdict.cls, rule=verdict.rule, reasons=verdict.reasons,
            source=admitted.source, reason=reason, first_seen=time.time(),
            descriptor=descriptor(admitted.step, verdict, admitted.facts, self._gate.audience())))
        self._gate.journal_refusal(refusal)
        return refusal

    # --- execution ----------------------------------------------------------------------------

    def execute(self, admitted: Admitted) -> Outcome | Refusal:
        """Authorize, journal, call Proxmox, wait for the task, journal the end.

        Never raises for PVE errors; a step refused in the lane returns its Refusal and is not run.
        """
        step = admitted.step
        kind = KINDS[step.kind]
        if self._writer is None:
            raise RuntimeError("this gate has no writer (a dry run)")
        bound = log.bind(vmid=step.vmid, action=step.kind, guest_type=step.guest_type)
        try:
            refusal = self.authorize(admitted)
        except PveError as exc:
            bound.warning("action", outcome="failed", error=f"cannot authorize: {exc}")
            self._count(step.kind, Outcome.FAILED)
            return Outcome.FAILED
        if refusal is not None:
            return refusal
        started, began_at = time.monotonic(), time.time()
        begun = self._begin(admitted)
        if not isinstance(begun, str):
            return begun
        bound = bound.bind(op_id=begun)
        result, upid = self._call(admitted, kind, began_at, bound, begun)
        if result.result is TaskResult.FAILED and kind.is_already_there(result.exitstatus):
            result = TaskOutcome(TaskResult.OK, result.exitstatus)
        if result.result is TaskResult.UNKNOWN and upid:
            with self._lock:
                self._unsettled[step.vmid] = upid  # held from planning until PVE says the task stopped
        outcome = OUTCOMES[result.result]
        self._gate.journal_write(lambda j: j.end(begun, outcome, "" if outcome is Outcome.OK else result.exitstatus))
        op = admitted.op
        if op is not None and op.payload.kind in ACTION_MARKED and outcome is not Outcome.FAILED:
            self._gate.journal_write(lambda j: j.refuse(
                vmid=step.vmid, kind=op.payload.kind, reason="NONCE_SPENT", op_id=op.payload.op_id,
                detail=f"op {op.payload.op_id} ran it ({outcome.value}): the same action needs a new proposal",
                key=action_key(op)))
        self._count(step.kind, outcome)
        bound.info("action", outcome=outcome.value, duration_s=round(time.monotonic() - started, 3),
                   **({"error": result.exitstatus} if outcome is not Outcome.OK else {}))
        return outcome

    def _call(self, admitted: Admitted, kind: ActionKind, began_at: float, bound: Any,
              op_id: str) -> tuple[TaskOutcome, str | None]:
        """The call and its task; an answer lost on the way is looked for in the guest's task list."""
        step = admitted.step
        assert self._writer is not None
        try:
            upid = kind.call(self._writer, step, self._gate.settings.calls)
        except PveUnavailableError as exc:
            # PVE may have taken the call: never read "no answer" as "not done" (that is how things run twice).
            upid = self._find_task(step.vmid, kind, began_at)
            if upid is None:
                return TaskOutcome(TaskResult.UNKNOWN, f"no answer, and no task found: {exc}"), None
            bound.warning("answer_lost_task_found", upid=upid)
        except PveError as exc:
            return TaskOutcome(TaskResult.FAILED, str(exc)), None
        if not upid:
            return TaskOutcome(TaskResult.OK, ""), None
        self._gate.journal_write(lambda j: j.task(op_id, upid))
        waiting = time.monotonic()
        result = wait_task(self._reader, upid, deadline=waiting + self._gate.settings.task_timeout)
        self._gate.metrics.task_wait.observe(time.monotonic() - waiting)
        return result, upid

    def _find_task(self, vmid: int, kind: ActionKind, since: float) -> str | None:
        try:
            tasks = self._reader.tasks(vmid, since=since - 1)
        except PveError:
            return None
        found = [t for t in tasks if t.get("type") in kind.task_types and str(t.get("id")) == str(vmid)]
        return str(found[-1]["upid"]) if found else None

    def unsettled(self) -> set[int]:
        """Guests whose last task outlived its deadline and still runs: not to be planned (one read each)."""
        with self._lock:
            waiting = dict(self._unsettled)
        still = set()
        for vmid, upid in waiting.items():
            try:
                running = self._reader.task_status(upid).get("status") != "stopped"
            except PveError:
                running = True
            if running:
                still.add(vmid)
            else:
                with self._lock:
                    self._unsettled.pop(vmid, None)
        return still

    def _count(self, kind: str, outcome: Outcome) -> None:
        with self._lock:
            self._counters[(kind, outcome.value)] += 1
        self._gate.metrics.actions.labels(kind, outcome.value).inc()

    def _begin(self, admitted: Admitted) -> str | Refusal:
        """Journal the intent; for a signed op the same fdatasync'd record spends its nonce (``op:<op_id>``)."""
        step, journal, op = admitted.step, self._gate.journal, admitted.op
        payload: dict[str, object] = {**step.payload(), "class": admitted.verdict.cls.name.lower(),
                                      "source": admitted.source.value}
        if op is not None:
            with self._lock:
                before = self._before.pop(op.payload.op_id, {})
            payload.update(digest=op.payload.precondition.digest, before=before,
                           op={"id": op.payload.op_id, "kind": op.payload.kind, "class": op.payload.class_,
                               "role": op.payload.role, "signers": list(op.signers), "sha256": op.payload_sha256,
                               "not_after": op.payload.not_after})
        if journal is None:
            return self._refuse_op(admitted, "JOURNAL_UNAVAILABLE", "the journal is not working") if op else \
                os.urandom(8).hex()
        try:
            with self._gate.metrics.journal_append.time():
                return journal.begin(vmid=step.vmid, kind=step.kind, payload=payload,
                                     key=nonce_key(op) if op is not None else None)
        except NonceSpentError:
            return self._refuse_op(admitted, "NONCE_SPENT", "this signed op was already used")
        except KeyInFlightError:
            return self._refuse_op(admitted, "NONCE_IN_FLIGHT", "this signed op is running now")
        except JournalError as exc:
            self._gate.lose_journal(exc)
            if op is not None:  # nothing durable says the nonce was spent: the op did not run
                return self._refuse_op(admitted, "JOURNAL_UNAVAILABLE", f"the journal failed: {exc}")
            return os.urandom(8).hex()
