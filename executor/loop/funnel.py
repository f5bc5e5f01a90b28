"""The funnel every mutation source submits through: the gate admits, the per-guest queue runs.

The tick, the op desk and selftest hold this, never the engine: so the wiring builds it first and
hands it to each. It also keeps what its jobs leave behind for planning: the per-guest backoff
after a failure and when each guest's last job ended (``held``).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field

import structlog

from executor.gate.actions import Step
from executor.gate.decisions import Admission, Admitted, Refusal, declaration_of
from executor.gate.gate import Gate
from executor.loop.desired import Declared
from executor.loop.observe import Observed
from executor.loop.queue import GuestQueue, Job
from executor.loop.readahead import ReadAhead
from journal import Outcome
from safety.classify import Source
from safety.signedop import VerifiedOp

log = structlog.get_logger("executor.engine")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Tunables of the engine and its funnel."""

    read_parallel: int = 8
    backoff_base: float = 5.0
    backoff_cap: float = 600.0
    wait_timeout: float = 1800.0
    read_ahead_fresh: float = 0.5  # a start's pending section read ahead of its lane is used this long (0: never)


@dataclass(slots=True)
class _Tracker:
    """A batch's jobs: how many remain, and their results."""

    remaining: int
    succeeded: int = 0
    failed: int = 0
    refused: list[Refusal] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "guest N kind: why" of each failed step, as it failed
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.succeeded += 1
            else:
                self.failed += 1

    def record_error(self, error: str) -> None:
        with self.lock:
            self.errors.append(error)

    def record_refused(self, refusal: Refusal) -> None:
        with self.lock:
            self.refused.append(refusal)

    def finish_job(self) -> None:
        with self.lock:
            self.remaining -= 1
            if self.remaining <= 0:
                self.done.set()


@dataclass(frozen=True, slots=True)
class Submission:
    """What ``submit`` did with a batch: the gate's admission and the jobs' tracker."""

    admission: Admission
    tracker: _Tracker


Tracker = _Tracker  # what the engine reads of a batch's results


class Funnel:
    """The single entry of every mutation; keeps each guest's backoff and when its last job ended."""

    def __init__(self, *, gate: Gate, queue: GuestQueue, ahead: ReadAhead, settings: Settings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``ahead``: the lanes' read-ahead the gate was given (told what was admitted); ``clock``: the engine's."""
        self.gate, self.queue, self._ahead = gate, queue, ahead
        self.settings = settings or Settings()
        self._clock = clock
        self._lock = threading.Lock()
        self.backoff: dict[int, tuple[int, float]] = {}  # vmid -> (consecutive failures, retry after)
        self._finished: dict[int, float] = {}  # vmid -> when its last job ended (clock time)

    def submit(self, steps: Mapping[int, Sequence[Step]], *, source: Source, observed: Observed,
               declared: Sequence[Declared], wait: bool = False, op: VerifiedOp | None = None,
               on_done: Callable[[VerifiedOp, Outcome | Refusal | None], None] | None = None,
               population: Sequence[Declared] | None = None, held: Set[int] | None = None) -> Submission:
        """The single entry of every mutation: the gate admits, the per-guest queue runs.

        ``op``: the signed op the steps come from; ``on_done(op, result)`` hears how its lane ended (None: it raised).
        ``population``: every declared guest of this node, for the blast radius (default: ``declared``).
        ``held``: a tick's guests left out of planning, its ``observed`` being a read of the whole node.
        """
        declarations = {d.vmid: declaration_of(d.vmid, d.state, d.config, d.description) for d in declared}
        everyone = None if population is None else {
            d.vmid: declaration_of(d.vmid, d.state, d.config, d.description) for d in population}
        admission = self.gate.admit(steps, observed=observed, declared=declarations, source=source, op=op,
                                    population=everyone, held=held)
        self.gate.count_admitted(admission)
        self._ahead.plan(admission.admitted)
        tracker = _Tracker(remaining=len(admission.admitted))
        for vmid, admitted in admission.admitted.items():
            self.queue.submit(Job(vmid=vmid, run=functools.partial(self._run_guest, admitted, tracker, on_done),
                                  label=",".join(a.step.kind for a in admitted)))
        if wait and admission.admitted:
            tracker.done.wait(self.settings.wait_timeout)
        return Submission(admission, tracker)

    def held(self, *, since: float) -> set[int]:
        """Guests not to plan now: busy, backing off, or whose last job ended at or after ``since``."""
        now = self._clock()
        with self._lock:
            held = {vmid for vmid, (_, until) in self.backoff.items() if until > now}
            held |= {vmid for vmid, ended in self._finished.items() if ended >= since}
        return held | set(self.queue.busy())

    def failing(self) -> set[int]:
        """Guests whose last step failed and that have not succeeded since (backing off, or retried now)."""
        with self._lock:
            return set(self.backoff)

    def _run_guest(self, steps: list[Admitted], tracker: _Tracker,
                   on_done: Callable[[VerifiedOp, Outcome | Refusal | None], None] | None = None) -> None:
        """One guest's steps in order; the first failure leaves the rest for a later tick."""
        vmid = steps[0].step.vmid
        try:
            for index, admitted in enumerate(steps):
                result: Outcome | Refusal | None = None
                try:
                    result = self.gate.execute(admitted)
                finally:  # the desk hears of its op even when the lane raised (None), so it never waits forever
                    if on_done is not None and admitted.op is not None:
                        on_done(admitted.op, result)
                if isinstance(result, Refusal):  # refused in the lane: the guest's later steps wait too
                    tracker.record_refused(result)
                    return
                ok = result is Outcome.OK
                tracker.record(ok)
                if not ok:
                    why = self.gate.lane.failure(vmid) if result is Outcome.FAILED else "no definite answer yet"
                    tracker.record_error(f"guest {vmid} {admitted.step.kind}: {why}")
                    for _ in steps[index + 1:]:
                        tracker.record(False)
                    self._back_off(vmid)
                    return
            with self._lock:
                self.backoff.pop(vmid, None)
        finally:
            with self._lock:
                self._finished[vmid] = self._clock()
            tracker.finish_job()

    def _back_off(self, vmid: int) -> None:
        with self._lock:
            failures = self.backoff.get(vmid, (0, 0.0))[0] + 1
            delay = min(self.settings.backoff_base * 2 ** (failures - 1), self.settings.backoff_cap)
            self.backoff[vmid] = (failures, self._clock() + delay)
        log.info("guest_backing_off", vmid=vmid, failures=failures, retry_in_s=delay)
