"""Recovery at start: resolve every operation the journal holds in flight before the first tick.

With a UPID, the task's status decides (waiting for it if it still runs). Without one (a crash
between the call and the journal write), the guest's task list since the operation began is
searched for a task of the kind's types; failing that, the guest's state. What stays ambiguous is
recorded as unknown and logged: nothing is ever run a second time here.

One-shot kinds (destroy, resize, snapshots) and every signed op (its journal key is ``op:<op_id>``)
can also end as "not applied": no task was found and the guest's config digest is still the one the
op was planned from (``payload["digest"]``), so the crash came between the journal's begin and the
Proxmox call. That is a failure, not an unknown: the nonce stays spent and the operator re-signs.

Only a definite answer ends an operation. A transient error (a 5xx, no answer), or a planned
step's task not listed yet when it began less than ``register_grace`` ago (the lane's
``lost_grace``: PVE may not have registered the task of a request it took, and "unknown" would let
the next tick send it again), is retried with a capped backoff for ``retry_for``
seconds (at least until the grace has passed); past that the operation stays in flight, so the next
start resolves it, and the daemon does not tick while anything is unresolved. A stop request
(SIGTERM) ends recovery at once and leaves the unresolved operations in flight for the same reason.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import structlog

from executor.errors import TemporaryError, failure_fields
from executor.gate.kinds import ACTION_KINDS
from executor.pve.node import PveError, PveReader, PveUnavailableError
from executor.pve.tasks import NOT_APPLIED, TaskOutcome, TaskResult, classify_exit, find_task, wait_task
from journal import InFlight, Journal, Outcome, is_burn_key

log = structlog.get_logger("executor.recovery")
OUTCOMES = {TaskResult.OK: Outcome.OK, TaskResult.FAILED: Outcome.FAILED, TaskResult.UNKNOWN: Outcome.UNKNOWN}
T = TypeVar("T")


class RecoveryInterruptedError(TemporaryError, RuntimeError):
    """Stopped (SIGTERM) or out of retries: what is unresolved stays in flight in the journal."""


def recover(journal: Journal, pve: PveReader, *, task_timeout: float = 900.0, retry_for: float = 60.0,
            stop: threading.Event | None = None, register_grace: float = 0.0) -> list[tuple[InFlight, Outcome]]:
    """End every in-flight operation with what Proxmox says happened; return what was decided.

    ``register_grace``: a planned step begun less than this long ago whose task is not listed (and whose
    guest does not show the change) may still be registered by PVE: looked for again, not ended unknown.
    Raises RecoveryInterruptedError when stopped or when Proxmox stays unavailable.
    """
    stop = stop or threading.Event()
    pending = journal.in_flight()
    log.info("recovery_started", ops=len(pending))
    decided = []
    for op in pending:
        bound = log.bind(vmid=op.vmid, op_id=op.op_id, action=op.kind, upid=op.upid)
        try:
            patience = max(retry_for, op.begun_at + register_grace - time.time() + 5.0)
            result = _retrying(functools.partial(_resolve, op, pve, task_timeout, stop, register_grace), patience,
                               stop, bound)
        except PveError as exc:  # a definite refusal (4xx; transient errors were retried): cannot be checked
            result = TaskOutcome(TaskResult.UNKNOWN, f"could not check: {exc}")
        outcome = OUTCOMES[result.result]
        journal.end(op.op_id, outcome, "" if outcome is Outcome.OK else result.exitstatus)
        (bound.warning if outcome is Outcome.UNKNOWN else bound.info)(
            "recovered", outcome=outcome.value, detail=result.exitstatus)
        decided.append((op, outcome))
    return decided


def _retrying(resolve: Callable[[], T], retry_for: float, stop: threading.Event, bound: structlog.BoundLogger) -> T:
    """``resolve()`` again after each transient error, backing off, until ``retry_for`` has passed."""
    deadline, delay = time.monotonic() + retry_for, 0.2
    while True:
        if stop.is_set():
            raise RecoveryInterruptedError("stopped during recovery")
        try:
            return resolve()
        except PveUnavailableError as exc:
            if time.monotonic() + delay > deadline:
                interrupted = RecoveryInterruptedError(f"Proxmox unavailable for {retry_for:.0f} s: {exc}")
                interrupted.cause, interrupted.hint = exc.cause, exc.hint
                raise interrupted from exc
            bound.warning("recovery_retrying", error=str(exc), retry_in_s=round(delay, 2), **failure_fields(exc))
            stop.wait(delay)
            delay = min(delay * 2, 10.0)


def _resolve(op: InFlight, pve: PveReader, task_timeout: float, stop: threading.Event,
             register_grace: float = 0.0) -> TaskOutcome:
    upid = op.upid or _find_task(op, pve)
    if upid is not None:
        status = pve.task_status(upid)
        if status.get("status") == "stopped":
            return classify_exit(str(status.get("exitstatus", "")))
        outcome = wait_task(pve, upid, deadline=time.monotonic() + task_timeout, sleep=_interruptible(stop),
                            transient=_raise)
        return outcome
    return _from_state(op, pve, register_grace)


def _interruptible(stop: threading.Event) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise RecoveryInterruptedError("stopped during recovery")
    return sleep


def _raise(exc: PveUnavailableError) -> None:
    raise exc


def _find_task(op: InFlight, pve: PveReader) -> str | None:
    """A task of the operation's types for its guest, started since it began (the UPID never recorded)."""
    kind = ACTION_KINDS.get(op.kind)
    return find_task(pve, op.vmid, kind.task_types if kind is not None else (), since=op.begun_at - 1)


def _from_state(op: InFlight, pve: PveReader, register_grace: float = 0.0) -> TaskOutcome:
    """No task: does the guest show the change, or is its config untouched since the op was planned?"""
    guest = pve.guests().find(op.vmid)  # never "absent" from a list whose entries did not all parse
    kind = ACTION_KINDS.get(op.kind)
    if kind is not None and kind.shows(pve, guest, op.payload):
        return TaskOutcome(TaskResult.OK, f"guest shows the {op.kind}")
    if guest is None:
        return TaskOutcome(TaskResult.UNKNOWN, "guest no longer on this node")
    planned = _planned_digest(op)
    if planned and pve.config(guest.type, op.vmid)[1] == planned:
        return TaskOutcome(TaskResult.FAILED, NOT_APPLIED)
    if not planned and time.time() < op.begun_at + register_grace:
        # Unknown would let the next tick plan it again, while PVE may not have registered a request it took.
        raise PveUnavailableError(f"no task yet for the {op.kind} begun {time.time() - op.begun_at:.0f} s ago")
    return TaskOutcome(TaskResult.UNKNOWN, "no task found and the guest does not show the change")


def _planned_digest(op: InFlight) -> str:
    """The digest an op was planned from, where an unchanged one proves the call was never made."""
    kind = ACTION_KINDS.get(op.kind)
    if not ((kind is not None and kind.one_shot) or is_burn_key(op.key or "")):
        return ""  # a planned step: keep to what the state shows (it is re-planned from the next read)
    return str(op.payload.get("digest") or "")
