"""PVE's task semantics: how a task ended, waiting for one, and finding the task of a call whose answer was lost."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from executor.pve import failures
from executor.pve.node import PveError, PveReader, PveUnavailableError


class TaskResult(enum.Enum):
    """How a PVE task ended."""

    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


# The end's detail for an op whose call was never made (recovery and the lane both write it).
NOT_APPLIED = "not applied"


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """A task's result and PVE's exit status text; ``ended`` False: no definite answer yet (still in flight).

    ``cause``, ``hint``: a failure's stable code and what to do (``executor.pve.failures``), when known.
    """

    result: TaskResult
    exitstatus: str
    ended: bool = True
    cause: str | None = None
    hint: str = ""

    @property
    def why(self) -> str:
        """The exit status with the hint, for a person (the hint once: a call's error already ends with it)."""
        return self.exitstatus if not self.hint or self.hint in self.exitstatus else f"{self.exitstatus}: {self.hint}"


def classify_exit(exitstatus: str, user: str = "") -> TaskOutcome:
    """PVE's exit status: ``OK`` and ``WARNINGS: n`` succeed, "unexpected status" is unknown.

    A task refused for a missing privilege (PVE checks some in the worker) says what to grant to ``user``
    (the task's, from its UPID).
    """
    if exitstatus == "OK" or exitstatus.startswith("WARNINGS"):
        return TaskOutcome(TaskResult.OK, exitstatus)
    if "unexpected status" in exitstatus:
        return TaskOutcome(TaskResult.UNKNOWN, exitstatus)
    if failures.PERMISSION.search(exitstatus):
        return TaskOutcome(TaskResult.FAILED, exitstatus, cause="privilege",
                           hint=failures.grant(exitstatus, user or "this executor's token"))
    return TaskOutcome(TaskResult.FAILED, exitstatus)


def upid_user(upid: str) -> str:
    """The user (or token) a UPID names as the task's owner ("" when it does not parse)."""
    parts = upid.split(":")
    return parts[7] if len(parts) >= 9 and parts[0] == "UPID" else ""


def wait_task(pve: PveReader, upid: str, *, deadline: float, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep, missing_grace: float = 5.0,
              transient: Callable[[PveUnavailableError], None] | None = None) -> TaskOutcome:
    """Poll a task until it stops: fast first, backing off; "no such task" is retried briefly.

    Past ``deadline`` (a ``clock`` time) the outcome is UNKNOWN: the task may still finish. A
    transient error (no answer, a 5xx) is polled through, or handed to ``transient`` when given.
    """
    delay, first_missing = 0.02, None
    while True:
        try:
            status = pve.task_status(upid)
        except PveUnavailableError as exc:
            if transient is not None:
                transient(exc)
            status = {}
        except PveError as exc:
            # A UPID can answer "no such task" right after it was issued.
            now = clock()
            first_missing = first_missing or now
            if now - first_missing > missing_grace:
                return TaskOutcome(TaskResult.UNKNOWN, f"task not found: {exc}", ended=False)
            status = {}
        if status.get("status") == "stopped":
            return classify_exit(str(status.get("exitstatus", "")), upid_user(upid))
        if clock() >= deadline:
            return TaskOutcome(TaskResult.UNKNOWN, "still running at the deadline", ended=False)
        sleep(delay)
        delay = min(delay * 1.6, 2.0)


def find_task(pve: PveReader, vmid: int, types: Sequence[str], since: float) -> str | None:
    """The newest task of ``types`` for guest ``vmid`` started at or after ``since`` (Unix time), or None.

    None is a proof of absence only as good as the read: a PveError propagates (a failed lookup
    proves nothing), and a task PVE has not registered yet is not in the list.
    """
    found = [t for t in pve.tasks(vmid, since=since) if t.get("type") in types and str(t.get("id")) == str(vmid)]
    found.sort(key=lambda t: int(t.get("starttime", 0)))
    return str(found[-1]["upid"]) if found else None
