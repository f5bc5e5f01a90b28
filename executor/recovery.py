"""Recovery at start: resolve every operation the journal holds in flight before the first tick.

With a UPID, the task's status decides (waiting for it if it still runs). Without one (a crash
between the call and the journal write), the guest's task list since the operation began is
searched for a matching task; failing that, the guest's state. What stays ambiguous is recorded as
unknown and logged: nothing is ever run a second time here.
"""

from __future__ import annotations

import time

import structlog

from executor.actions import SET_CONFIG, START, STOP
from executor.pve import Pve, PveError, TaskOutcome, TaskResult, classify, wait_task
from journal import InFlight, Journal, Outcome

log = structlog.get_logger("executor.recovery")
TASK_TYPES = {START: ("qmstart", "vzstart"), STOP: ("qmshutdown", "vzshutdown", "qmstop", "vzstop"),
              SET_CONFIG: ("qmconfig",)}
OUTCOMES = {TaskResult.OK: Outcome.OK, TaskResult.FAILED: Outcome.FAILED, TaskResult.UNKNOWN: Outcome.UNKNOWN}


def recover(journal: Journal, pve: Pve, *, task_timeout: float = 900.0) -> list[tuple[InFlight, Outcome]]:
    """End every in-flight operation with what Proxmox says happened; return what was decided."""
    decided = []
    for op in journal.in_flight():
        bound = log.bind(vmid=op.vmid, op_id=op.op_id, action=op.kind, upid=op.upid)
        try:
            result = _resolve(op, pve, task_timeout)
        except PveError as exc:
            result = TaskOutcome(TaskResult.UNKNOWN, f"could not check: {exc}")
        outcome = OUTCOMES[result.result]
        journal.end(op.op_id, outcome, "" if outcome is Outcome.OK else result.exitstatus)
        (bound.warning if outcome is Outcome.UNKNOWN else bound.info)(
            "recovered", outcome=outcome.value, detail=result.exitstatus)
        decided.append((op, outcome))
    return decided


def _resolve(op: InFlight, pve: Pve, task_timeout: float) -> TaskOutcome:
    upid = op.upid or _find_task(op, pve)
    if upid is not None:
        status = pve.task_status(upid)
        if status.get("status") == "stopped":
            return classify(str(status.get("exitstatus", "")))
        return wait_task(pve, upid, deadline=time.monotonic() + task_timeout)
    return _from_state(op, pve)


def _find_task(op: InFlight, pve: Pve) -> str | None:
    """A task of the operation's type for its guest, started since it began (the UPID never recorded)."""
    wanted = TASK_TYPES.get(op.kind, ())
    for task in pve.tasks(op.vmid, since=op.begun_at - 1):
        if task.get("type") in wanted and str(task.get("id")) == str(op.vmid):
            return str(task["upid"])
    return None


def _from_state(op: InFlight, pve: Pve) -> TaskOutcome:
    """No task: does the guest already show the change? Otherwise it cannot be told."""
    guest = next((g for g in pve.guests() if g.vmid == op.vmid), None)
    if guest is None:
        return TaskOutcome(TaskResult.UNKNOWN, "guest no longer on this node")
    if op.kind == START and guest.status == "running":
        return TaskOutcome(TaskResult.OK, "guest is running")
    if op.kind == STOP and guest.status == "stopped":
        return TaskOutcome(TaskResult.OK, "guest is stopped")
    if op.kind == SET_CONFIG:
        config, _ = pve.config(guest.type, op.vmid)
        wanted = op.payload.get("set", {})
        if all(config.get(k) == v for k, v in wanted.items()) and not set(op.payload.get("delete", [])) & set(config):
            return TaskOutcome(TaskResult.OK, "config shows the change")
    return TaskOutcome(TaskResult.UNKNOWN, "no task found and the guest does not show the change")
