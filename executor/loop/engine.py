"""One tick of the executor: desired + actual -> plan -> gate -> queue -> Proxmox -> journal.

Nothing here is fatal: a planner or Proxmox that cannot be reached makes the tick do nothing; a
failed action is counted and its guest retried on a later tick, after a capped exponential
backoff. Every mutation goes through the funnel (``executor.loop.funnel``: the safety gate admits
it, the per-guest queue runs it), whatever its source.

Nothing is run twice: one tick runs at a time (a second caller waits for the running tick, then
runs its own); a guest with queued or running work is left out of planning; and a guest whose
last job ended after the tick began reading is left for the next tick, so no action is ever
planned from a read older than the last action run on that guest.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from executor.gate.actions import by_guest
from executor.gate.decisions import GateState, Refusal
from executor.gate.gate import Gate
from executor.loop.desired import Declared, DesiredProvider, DesiredStateError, check_types, provider_source
from executor.loop.fleet import TickView
from executor.loop.funnel import Funnel, Settings, Tracker
from executor.loop.observe import Observed, PendingSections, StagedLog, observe, staged
from executor.loop.planner_client import PlannerClient, PlannerRefusedError, PlannerUnavailableError
from executor.metrics import ExecutorMetrics
from executor.pve.node import PveError, PveReader
from journal import InFlight, Journal

log = structlog.get_logger("executor.engine")


class TickOutcome(enum.Enum):
    """How a tick ended (mirrors executor.v1.TickOutcome)."""

    OK = 1
    ACTIONS_FAILED = 2
    PLANNER_UNAVAILABLE = 3
    PVE_UNAVAILABLE = 4
    DESIRED_UNAVAILABLE = 5
    PLANNER_REFUSED = 6


@dataclass(slots=True)
class TickSummary:
    """What one tick did."""

    started: float
    outcome: TickOutcome = TickOutcome.OK
    error: str = ""
    cause: str | None = None  # a connection failure's stable code (``ExecutorError.cause``)
    hint: str = ""  # what to do about it, naming the flag
    duration: float = 0.0
    queued: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    deferred: int = 0
    elsewhere: int = 0
    refused: int = 0
    pending: int = 0
    stops_deferred: int = 0
    held: int = 0  # steps held behind a refused step of their guest (a start behind a refused config write)
    staged: int = 0  # guests with a declared change PVE holds for the next restart (not planned again)
    waited: bool = False
    refusals: tuple[Refusal, ...] = ()
    view: TickView | None = None  # what it knew of each guest (None: it ended before it planned; the fleet view)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineStatus:
    """A consistent snapshot of the engine for GetStatus (read under the locks that guard it)."""

    ticks: int
    last: TickSummary | None
    counters: dict[tuple[str, str], int]
    busy: dict[int, int]
    in_flight: list[InFlight]
    journal_enabled: bool
    gate: GateState


def _mistyped(declared: list[Declared], observed: Observed, summary: TickSummary) -> bool:
    """True (the tick plans nothing, as ``plan`` refuses the file) when a desired file gives a guest a config key
    its type does not take, now that the read says which type each guest is; the file's lines are logged and in
    the summary. Only guests read from a file (``origin``) are checked: its mistakes have a file:line to fix, and
    ``parse`` already held its keys to PVE's schema. State from elsewhere (a hub) meets the gate, key by key.
    """
    try:
        check_types([d for d in declared if d.origin], {vmid: guest.type for vmid, guest in observed.guests.items()})
    except DesiredStateError as exc:
        log.error("desired_invalid", problems=str(exc).splitlines(),
                  consequence="nothing planned until the desired file is fixed")
        summary.outcome, summary.error = TickOutcome.DESIRED_UNAVAILABLE, str(exc)
        return True
    return False


class Engine:
    """Runs ticks; owns the tick lock; submits through the funnel it is given."""

    def __init__(self, *, pve: PveReader, gate: Gate, planner: PlannerClient, provider: DesiredProvider,
                 funnel: Funnel, reads: ThreadPoolExecutor, settings: Settings | None = None,
                 clock: Callable[[], float] = time.monotonic, metrics: ExecutorMetrics | None = None,
                 holders: Sequence[Callable[[], set[int]]] = (),
                 before_tick: Sequence[Callable[[], None]] = ()) -> None:
        """``reads`` (the config readers' pool, closed by ``close``) and ``funnel`` (the gate and the queue every
        mutation goes through) come from the wiring; ``holders`` name more guests not to
        plan (a signed op queued), ``before_tick`` runs at the start of each tick, under the tick lock."""
        self.pve, self.gate, self.planner, self.provider = pve, gate, planner, provider
        self.funnel, self.queue = funnel, funnel.queue
        self.settings = settings or Settings()
        self._clock = clock
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()
        self.recovering = threading.Event()  # set by the daemon while recovery runs: no tick then
        # More guests not to plan: a task still running past its deadline; later, a signed op queued.
        self.holders: tuple[Callable[[], set[int]], ...] = (gate.lane.unsettled, *holders)
        self.before_tick = tuple(before_tick)
        # Told each tick's summary once it ended (the hub's state reporter): each must return at once, never raise.
        self.after_tick: list[Callable[[TickSummary], None]] = []
        self.ticks = 0
        self.last: TickSummary | None = None
        self.metrics = metrics or gate.metrics
        self.metrics.watch(self.queue.busy, lambda: len(self.gate.records.in_flight()))
        self._reader = reads
        self.sections = PendingSections()  # the guests' /pending, read again only when a digest moved
        self._staged_log = StagedLog()

    @property
    def journal(self) -> Journal | None:
        """The gate's journal (None when it could not open or a write failed)."""
        return self.gate.journal

    @property
    def counters(self) -> Counter[tuple[str, str]]:
        """Actions run, by (kind, outcome)."""
        return Counter(self.gate.counters)  # a copy the lane made under its own lock

    def status(self) -> EngineStatus:
        """A snapshot for the API."""
        with self._lock:
            ticks, last = self.ticks, self.last
        records = self.gate.journal_port  # the journal, or the stand-in once it is gone
        return EngineStatus(ticks=ticks, last=last, counters=dict(self.counters), busy=self.queue.busy(),
                            in_flight=records.in_flight(), journal_enabled=records.working,
                            gate=self.gate.state())

    # --- the tick -----------------------------------------------------------------------------

    def tick(self, *, wait: bool = False) -> TickSummary:
        """Plan and submit the actions; with ``wait``, also wait for them and count their results.

        One tick at a time: a call made while another tick runs waits for it (``waited``), then runs.
        """
        waited = not self._tick_lock.acquire(blocking=False)
        if waited:
            self._tick_lock.acquire()
        try:
            summary = TickSummary(started=time.time(), waited=waited)
            started = self._clock()
            try:
                self._tick(summary, wait)
            finally:
                summary.duration = self._clock() - started
                with self._lock:
                    self.ticks += 1
                    self.last = summary
        finally:
            self._tick_lock.release()
        self.metrics.ticks.labels(summary.outcome.name.lower()).inc()
        self.metrics.tick_duration.observe(summary.duration)
        log.info("tick", outcome=summary.outcome.name.lower(), queued=summary.queued, succeeded=summary.succeeded,
                 failed=summary.failed, skipped=summary.skipped, deferred=summary.deferred,
                 elsewhere=summary.elsewhere, refused=summary.refused, approvals_pending=summary.pending,
                 stops_deferred=summary.stops_deferred, held=summary.held, staged=summary.staged,
                 duration_s=round(summary.duration, 3),
                 **({"error": summary.error} if summary.error else {}),
                 **({"cause": summary.cause, "hint": summary.hint} if summary.cause else {}))
        for hook in self.after_tick:
            try:
                hook(summary)
            except Exception:  # a listener's bug must not become the tick's
                log.exception("after_tick_failed")
        return summary

    def _tick(self, summary: TickSummary, wait: bool) -> None:
        for hook in self.before_tick:
            hook()
        try:
            declared = self.provider.desired()
            source = provider_source(self.provider)  # the trust of the content just read, nothing later
        except DesiredStateError as exc:
            summary.outcome, summary.error = TickOutcome.DESIRED_UNAVAILABLE, str(exc)
            return
        if not declared:
            summary.view = TickView(declared=())
            return  # nothing declared: nothing to read, nothing to do
        read_at = self._clock()
        held = self.funnel.held(since=read_at)  # taken before the read: a busy guest's state is in motion
        for holder in self.holders:  # once a tick: an unsettled task costs a read per guest
            held |= holder()
        try:
            observed = observe(self.pve, [d for d in declared if d.vmid not in held], pool=self._reader,
                               sections=self.sections)
        except PveError as exc:
            summary.outcome, summary.error = TickOutcome.PVE_UNAVAILABLE, str(exc)
            summary.cause, summary.hint = exc.cause, exc.hint
            return
        if _mistyped(declared, observed, summary):  # as `plan` does: the whole file, now the types are known
            return
        held |= self.funnel.held(since=read_at)  # and a job that ended while we read: that read is stale
        wanted = [d for d in declared if d.vmid not in held]
        summary.deferred = len(declared) - len(wanted)
        summary.elsewhere = sum(1 for d in wanted if d.vmid in observed.elsewhere)
        try:
            plan = self.planner.plan(*observed.request(wanted))
        except PlannerRefusedError as exc:
            summary.outcome, summary.error = TickOutcome.PLANNER_REFUSED, str(exc)
            return
        except PlannerUnavailableError as exc:
            summary.outcome, summary.error = TickOutcome.PLANNER_UNAVAILABLE, str(exc)
            summary.cause, summary.hint = exc.cause, exc.hint
            return
        unreadable = {d.vmid for d in wanted if d.vmid in observed.unreadable}  # not planned: named in the log
        summary.skipped = len({s.vmid for s in plan.skipped} | unreadable)
        planned = by_guest(plan.actions)
        held_back = staged(observed, wanted, planned)
        summary.staged = len(held_back)
        self._staged_log.report(held_back)
        submission = self.funnel.submit(planned, source=source, observed=observed, declared=wanted,
                                        wait=wait, population=[d for d in declared if d.vmid not in observed.elsewhere],
                                        held=frozenset(held))
        admission, tracker = submission.admission, submission.tracker
        summary.queued = sum(len(s) for s in admission.admitted.values())
        summary.refused, summary.refusals = len(admission.refused), admission.refused
        summary.stops_deferred = len(admission.deferred)
        summary.held = len(admission.held)
        summary.pending = len(self.gate.pending())
        if wait and admission.admitted:
            self._count_results(summary, tracker)
        pending = tuple(self.gate.pending())
        summary.view = TickView(declared=tuple(declared), observed=observed, skipped=tuple(plan.skipped),
                                planned=planned, admission=admission, refusals=summary.refusals,
                                held=frozenset(held), staged=held_back, pending=pending,
                                failing={vmid: self.gate.lane.failure(vmid) for vmid in self.funnel.failing()})

    def _count_results(self, summary: TickSummary, tracker: Tracker) -> None:
        """A tick that waited: its jobs' results in the summary."""
        summary.succeeded, summary.failed = tracker.succeeded, tracker.failed
        summary.refused += len(tracker.refused)
        summary.refusals += tuple(tracker.refused)
        summary.pending = len(self.gate.pending())
        if tracker.failed:
            summary.outcome = TickOutcome.ACTIONS_FAILED
            summary.error = "; ".join(tracker.errors)

    def close(self) -> None:
        """Stop the config readers."""
        self._reader.shutdown(wait=False)
