"""One tick of the executor: desired + actual -> plan -> journal -> queue -> Proxmox -> journal.

Nothing here is fatal: a planner or Proxmox that cannot be reached makes the tick do nothing; a
failed action is counted and its guest retried on a later tick, after a capped exponential
backoff. A guest with queued or running work is left out of planning until it is idle.
"""

from __future__ import annotations

import enum
import functools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from executor.actions import SET_CONFIG, START, STOP, Step, by_guest
from executor.desired import Declared, DesiredProvider, DesiredStateError
from executor.metrics import ExecutorMetrics
from executor.planner_client import (
    RUN_STATES,
    PlannerClient,
    PlannerUnavailableError,
    actual_to_proto,
    desired_to_proto,
)
from executor.pve import GuestState, Pve, PveError, TaskOutcome, TaskResult, wait_task
from executor.queue import GuestQueue, Job
from journal import Journal, JournalError, Outcome

log = structlog.get_logger("executor.engine")
OUTCOMES = {TaskResult.OK: Outcome.OK, TaskResult.FAILED: Outcome.FAILED, TaskResult.UNKNOWN: Outcome.UNKNOWN}


class TickOutcome(enum.Enum):
    """How a tick ended (mirrors executor.v1.TickOutcome)."""

    OK = 1
    ACTIONS_FAILED = 2
    PLANNER_UNAVAILABLE = 3
    PVE_UNAVAILABLE = 4
    DESIRED_UNAVAILABLE = 5


@dataclass(slots=True)
class TickSummary:
    """What one tick did."""

    started: float
    outcome: TickOutcome = TickOutcome.OK
    error: str = ""
    duration: float = 0.0
    queued: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    deferred: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Tunables of the engine."""

    shutdown_timeout: int = 60
    force_stop: bool = True
    task_timeout: float = 900.0
    read_parallel: int = 8
    backoff_base: float = 5.0
    backoff_cap: float = 600.0
    wait_timeout: float = 1800.0


@dataclass(slots=True)
class _Tracker:
    """A tick's jobs: how many remain, and their results."""

    remaining: int
    succeeded: int = 0
    failed: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.succeeded += 1
            else:
                self.failed += 1

    def finish_job(self) -> None:
        with self.lock:
            self.remaining -= 1
            if self.remaining <= 0:
                self.done.set()


class Engine:
    """Runs ticks; owns the counters and per-guest backoff."""

    def __init__(self, *, pve: Pve, planner: PlannerClient, provider: DesiredProvider, queue: GuestQueue,
                 journal: Journal | None, settings: Settings | None = None,
                 clock: Callable[[], float] = time.monotonic, metrics: ExecutorMetrics | None = None) -> None:
        self.pve, self.planner, self.provider, self.queue = pve, planner, provider, queue
        self.journal = journal
        self.settings = settings or Settings()
        self._clock = clock
        self._lock = threading.Lock()
        self.counters: Counter[tuple[str, str]] = Counter()
        self.backoff: dict[int, tuple[int, float]] = {}  # vmid -> (consecutive failures, retry after)
        self.ticks = 0
        self.last: TickSummary | None = None
        self.metrics = metrics or ExecutorMetrics()
        self.metrics.watch(queue.busy, lambda: len(self.journal.in_flight()) if self.journal is not None else 0)
        self._reader = ThreadPoolExecutor(max_workers=self.settings.read_parallel, thread_name_prefix="pve-read")

    # --- the tick -----------------------------------------------------------------------------

    def tick(self, *, wait: bool = False) -> TickSummary:
        """Plan and queue the actions; with ``wait``, also wait for them and count their results."""
        summary = TickSummary(started=time.time())
        started = self._clock()
        try:
            self._tick(summary, wait)
        finally:
            summary.duration = self._clock() - started
            with self._lock:
                self.ticks += 1
                self.last = summary
            self.metrics.ticks.labels(summary.outcome.name.lower()).inc()
            self.metrics.tick_duration.observe(summary.duration)
            log.info("tick", outcome=summary.outcome.name.lower(), queued=summary.queued,
                     succeeded=summary.succeeded, failed=summary.failed, skipped=summary.skipped,
                     deferred=summary.deferred, duration_s=round(summary.duration, 3),
                     **({"error": summary.error} if summary.error else {}))
        return summary

    def _tick(self, summary: TickSummary, wait: bool) -> None:
        try:
            declared = self.provider.desired()
        except DesiredStateError as exc:
            summary.outcome, summary.error = TickOutcome.DESIRED_UNAVAILABLE, str(exc)
            return
        if not declared:
            return  # nothing declared: nothing to read, nothing to do
        try:
            guests = {g.vmid: g for g in self.pve.guests() if g.status in RUN_STATES}
        except PveError as exc:
            summary.outcome, summary.error = TickOutcome.PVE_UNAVAILABLE, str(exc)
            return
        deferred = self._deferred()
        wanted = [d for d in declared if d.vmid not in deferred]
        summary.deferred = len(declared) - len(wanted)
        configs = self._read_configs([guests[d.vmid] for d in wanted if d.vmid in guests and _needs_config(d)])
        actual = [actual_to_proto(guests[d.vmid], configs.get(d.vmid)) for d in wanted if d.vmid in guests]
        try:
            plan = self.planner.plan(desired_to_proto(wanted), actual)
        except PlannerUnavailableError as exc:
            summary.outcome, summary.error = TickOutcome.PLANNER_UNAVAILABLE, str(exc)
            return
        summary.skipped = len({s.vmid for s in plan.skipped})
        steps = by_guest(plan.actions)
        summary.queued = sum(len(s) for s in steps.values())
        tracker = _Tracker(remaining=len(steps))
        for vmid, guest_steps in steps.items():
            self.queue.submit(Job(vmid=vmid, run=functools.partial(self._run_guest, guest_steps, tracker),
                                  label=",".join(s.kind for s in guest_steps)))
        if wait and steps:
            tracker.done.wait(self.settings.wait_timeout)
            summary.succeeded, summary.failed = tracker.succeeded, tracker.failed
            if tracker.failed:
                summary.outcome = TickOutcome.ACTIONS_FAILED

    def _deferred(self) -> set[int]:
        now = self._clock()
        with self._lock:
            backing_off = {vmid for vmid, (_, until) in self.backoff.items() if until > now}
        return set(self.queue.busy()) | backing_off

    def _read_configs(self, guests: list[GuestState]) -> dict[int, tuple[dict[str, str], str]]:
        """Configs of the guests whose config is managed, in parallel; an unreadable one is left out."""
        def read(guest: GuestState) -> tuple[int, tuple[dict[str, str], str] | None]:
            try:
                return guest.vmid, self.pve.config(guest.type, guest.vmid)
            except PveError as exc:
                log.warning("config_unreadable", vmid=guest.vmid, error=str(exc))
                return guest.vmid, None
        return {vmid: found for vmid, found in self._reader.map(read, guests) if found is not None}

    # --- running actions ----------------------------------------------------------------------

    def _run_guest(self, steps: list[Step], tracker: _Tracker) -> None:
        """One guest's steps in order; the first failure leaves the rest for a later tick."""
        try:
            for index, step in enumerate(steps):
                ok = self.execute(step) is Outcome.OK
                tracker.record(ok)
                if not ok:
                    for _ in steps[index + 1:]:
                        tracker.record(False)
                    self._back_off(step.vmid)
                    return
            with self._lock:
                self.backoff.pop(steps[0].vmid, None)
        finally:
            tracker.finish_job()

    def _back_off(self, vmid: int) -> None:
        with self._lock:
            failures = self.backoff.get(vmid, (0, 0.0))[0] + 1
            delay = min(self.settings.backoff_base * 2 ** (failures - 1), self.settings.backoff_cap)
            self.backoff[vmid] = (failures, self._clock() + delay)
        log.info("guest_backing_off", vmid=vmid, failures=failures, retry_in_s=delay)

    def execute(self, step: Step) -> Outcome:
        """Journal, call Proxmox, wait for the task, journal the end; never raises for PVE errors."""
        bound = log.bind(vmid=step.vmid, action=step.kind, guest_type=step.guest_type)
        started = self._clock()
        op_id = self._begin(step)
        bound = bound.bind(op_id=op_id)
        try:
            upid = self._call(step)
            if upid:
                bound = bound.bind(upid=upid)
                self._journal(lambda j: j.task(op_id, upid))
                waiting = self._clock()
                result = wait_task(self.pve, upid, deadline=waiting + self.settings.task_timeout)
                self.metrics.task_wait.observe(self._clock() - waiting)
            else:
                result = TaskOutcome(TaskResult.OK, "")
        except PveError as exc:
            result = TaskOutcome(TaskResult.FAILED, str(exc))
        if result.result is TaskResult.FAILED and already_there(step, result.exitstatus):
            result = TaskOutcome(TaskResult.OK, result.exitstatus)
        outcome = OUTCOMES[result.result]
        self._journal(lambda j: j.end(op_id, outcome, "" if outcome is Outcome.OK else result.exitstatus))
        with self._lock:
            self.counters[(step.kind, outcome.value)] += 1
        self.metrics.actions.labels(step.kind, outcome.value).inc()
        bound.info("action", outcome=outcome.value, duration_s=round(self._clock() - started, 3),
                   **({"error": result.exitstatus} if outcome is not Outcome.OK else {}))
        return outcome

    def _call(self, step: Step) -> str | None:
        if step.kind == START:
            return self.pve.start(step.guest_type, step.vmid)
        if step.kind == STOP:
            return self.pve.shutdown(step.guest_type, step.vmid, self.settings.shutdown_timeout,
                                     self.settings.force_stop)
        if step.kind == SET_CONFIG:
            return self.pve.set_config(step.guest_type, step.vmid, dict(step.set), step.delete, step.digest)
        raise ValueError(f"unknown step kind {step.kind!r}")

    def _begin(self, step: Step) -> str:
        journal = self.journal
        if journal is None:
            return os.urandom(8).hex()
        try:
            with self.metrics.journal_append.time():
                return journal.begin(vmid=step.vmid, kind=step.kind, payload=step.payload())
        except JournalError as exc:
            self._lose_journal(exc)
            return os.urandom(8).hex()

    def _journal(self, write: Callable[[Journal], None]) -> None:
        journal = self.journal
        if journal is None:
            return
        try:
            with self.metrics.journal_append.time():
                write(journal)
        except JournalError as exc:
            self._lose_journal(exc)

    def _lose_journal(self, exc: JournalError) -> None:
        log.error("journal_failed_running_without_it", error=str(exc))
        self.journal = None

    def close(self) -> None:
        """Stop the config readers."""
        self._reader.shutdown(wait=False)


def already_there(step: Step, error: str) -> bool:
    """PVE's "already in the desired state" answers are successes (LXC: "CT 101 not running")."""
    text = error.lower()
    if step.kind == STOP:
        return "not running" in text
    if step.kind == START:
        return "already running" in text
    return False


def _needs_config(declared: Declared) -> bool:
    return declared.config is not None or declared.description is not None
