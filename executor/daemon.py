"""The daemon's lifecycle, and the self-test and clock-reset commands (the dry run is ``executor.dryrun``).

run: install the signal handlers first (a SIGTERM during start-up or recovery stops cleanly);
open the journal (journal-less with a loud warning if it cannot open: then only benign actions
run); serve the API (health NOT_SERVING, Reconcile refused) while recovery resolves in-flight
operations; then tick every interval until SIGTERM/SIGINT; then stop ticking, drain the queue
within the grace period, close the journal. A stop during recovery leaves what is unresolved in
flight in the journal, for the next start to resolve.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass

import structlog

from common.config import ConfigError
from common.grpcserver import Running
from common.metrics import serve_metrics
from common.signals import stop_on_signals
from executor.cli import api_tls, planner_tls
from executor.config import ExecutorSettings
from executor.decisions import GateSettings
from executor.desired import DesiredProvider, DesiredStateError, EmptyProvider, FileProvider
from executor.engine import Engine, Settings, TickOutcome
from executor.gate import Gate
from executor.kinds import CallSettings
from executor.metrics import ExecutorMetrics
from executor.opclock import GateClock, clock_reset, gate_secret
from executor.ops import OP_TTL_MAX, OpDesk, OpSettings
from executor.planner_client import PlannerClient, PlannerError
from executor.pve import Connection, ProxmoxNode
from executor.pvewrite import ProxmoxWriter
from executor.queue import GuestQueue
from executor.recovery import RecoveryInterruptedError, recover
from executor.selftest import selftest
from executor.server import start_api
from executor.stopledger import StopLedger
from journal import Journal, JournalOpenError

log = structlog.get_logger("executor.daemon")


def provider(settings: ExecutorSettings) -> DesiredProvider:
    """FileProvider for --desired, else EmptyProvider (manage nothing)."""
    if not settings.desired:
        return EmptyProvider()
    try:
        return FileProvider(settings.desired)
    except OSError as exc:
        raise DesiredStateError(f"{settings.desired}: cannot read: {exc.strerror}") from None


def open_journal(state_dir: str) -> Journal | None:
    """The journal, or None (with a loud warning) when it cannot open."""
    try:
        return Journal.open(state_dir)
    except JournalOpenError as exc:
        log.error("journal_unavailable_benign_only", state_dir=state_dir, error=str(exc),
                  consequence="only benign actions run; in-flight operations will not survive a crash")
        return None


@dataclass(slots=True)
class Parts:
    """What a daemon (or a one-shot command) is made of; ``close`` releases it all."""

    reader: ProxmoxNode
    planner: PlannerClient
    queue: GuestQueue
    engine: Engine
    desk: OpDesk

    def close(self, grace: float) -> None:
        """Drain the queue within ``grace``, then close the planner channel and the journal."""
        unfinished = self.queue.close(grace)
        if unfinished:
            log.warning("shutdown_unfinished", jobs=[f"{j.vmid}:{j.label}" for j in unfinished])
        self.engine.close()
        self.planner.close()
        if self.engine.journal is not None:
            self.engine.journal.close()


def build(settings: ExecutorSettings, conn: Connection, desired: DesiredProvider, journal: Journal | None,
          metrics: ExecutorMetrics | None = None) -> Parts:
    """Wire the parts: the writer goes to the gate and nowhere else."""
    metrics = metrics or ExecutorMetrics()
    if journal is not None and journal.retention <= OP_TTL_MAX:
        raise ConfigError("state_dir", f"the journal keeps nonces {journal.retention:.0f} s: it must outlive the "
                                       f"longest signed op ({OP_TTL_MAX:.0f} s)")
    reader = ProxmoxNode(conn, on_error=metrics.pve_error)
    secret = gate_secret(settings.state_dir, journal) if journal is not None else None  # before the clock: a floor
    clock = GateClock(lambda: gate.journal, settings.state_dir)
    gate = Gate(reader=reader, writer=ProxmoxWriter(reader.session), journal=journal, metrics=metrics,
                wall=clock.now, ledger=StopLedger.in_state_dir(settings.state_dir),
                settings=GateSettings(calls=CallSettings(shutdown_timeout=settings.shutdown_timeout,
                                                         force_stop=settings.force_stop),
                                      max_stops_per_tick=settings.max_stops_per_tick, audience=settings.executor_id,
                                      stop_window=settings.interval, lost_grace=settings.lost_grace,
                                      secret=secret))
    planner = PlannerClient(settings.planner, tls=planner_tls(settings))
    queue = GuestQueue(settings.max_parallel)
    engine = Engine(pve=reader, gate=gate, planner=planner, provider=desired, queue=queue, settings=Settings(),
                    metrics=metrics)
    desk = OpDesk(engine=engine, clock=clock, settings=OpSettings(state_dir=settings.state_dir,
                                                                   trust_store=settings.trust_store,
                                                                   skew=settings.op_clock_skew))
    return Parts(reader, planner, queue, engine, desk)


def _loop(engine: Engine, stop: threading.Event, interval: float) -> None:
    """Tick every ``interval`` until ``stop``; a bug in one tick is logged and counted, and the next comes."""
    while not stop.is_set():
        try:
            engine.tick()
        except Exception:  # failures are never fatal
            log.exception("tick_crashed")
            engine.metrics.ticks.labels("crashed").inc()
        stop.wait(interval)


def run(settings: ExecutorSettings, conn: Connection) -> int:
    """``pve-executor run``."""
    stop = stop_on_signals()  # first: a SIGTERM from here on is a clean stop
    try:
        desired = provider(settings)
    except DesiredStateError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 2
    tls = api_tls(settings)
    metrics = ExecutorMetrics()
    parts = build(settings, conn, desired, open_journal(settings.state_dir), metrics)
    engine = parts.engine
    endpoint = serve_metrics(settings.metrics_listen, metrics.registry) if settings.metrics_listen else None
    if endpoint is not None and settings.metrics_listen:
        log.info("metrics_listening", address=f"{settings.metrics_listen.rsplit(':', 1)[0]}:{endpoint.port}")
    if engine.journal is not None:
        engine.recovering.set()  # before the API serves: no tick and no op against an unresolved journal
    try:
        api = None if settings.once else start_api(engine, settings.listen, tls=tls, desk=parts.desk)
    except OSError as exc:  # a live daemon on the socket, a port taken: one line, no traceback
        print(f"pve-executor: listen: {exc}", file=sys.stderr)
        parts.close(0)
        if endpoint is not None:
            endpoint.stop()
        return 2
    if api is not None and engine.recovering.is_set():
        api.set_serving(False)
    reload_on_hangup(parts.desk)
    try:
        if not _recover(engine, parts.reader, api, stop):
            return 0 if stop.is_set() else 1
        if settings.once:
            summary = engine.tick(wait=True)
            return 0 if summary.outcome is TickOutcome.OK else 1
        _loop(engine, stop, settings.interval)
        return 0
    finally:
        if api is not None:
            api.stop(5.0)
        parts.close(settings.grace)
        if endpoint is not None:
            endpoint.stop()


def reload_on_hangup(desk: OpDesk) -> None:
    """SIGHUP reloads the trust store at the next tick (a bad file keeps the last good store).

    The handler only sets a flag: I/O or logging inside a signal handler could raise in, or deadlock,
    whatever the main thread was doing.
    """
    signal.signal(signal.SIGHUP, lambda _signum, _frame: desk.hang_up())


def _recover(engine: Engine, reader: ProxmoxNode, api: Running | None, stop: threading.Event) -> bool:
    """Resolve the journal's in-flight operations; False when stopped or Proxmox stayed unavailable."""
    journal = engine.journal
    if journal is None:
        return True
    engine.recovering.set()
    if api is not None:
        api.set_serving(False)
    try:
        recover(journal, reader, stop=stop, register_grace=engine.gate.settings.lost_grace)
    except RecoveryInterruptedError as exc:
        event = "shutdown_during_recovery" if stop.is_set() else "recovery_incomplete"
        log.warning(event, error=str(exc), left_in_flight=len(journal.in_flight()))
        return False
    engine.recovering.clear()
    if api is not None:
        api.set_serving(True)
    return True


def reset_clock(settings: ExecutorSettings) -> int:
    """``pve-executor clock-reset``: the daemon must be stopped (the journal's lock says so)."""
    try:
        journal = Journal.open(settings.state_dir)
    except JournalOpenError as exc:
        print(f"pve-executor: clock-reset: {exc} (stop the daemon first)", file=sys.stderr)
        return 2
    with journal:
        offset, floor = clock_reset(settings.state_dir, journal)
    print(f"clock reset: the journal's high-water mark is read {offset:.0f} s lower; "
          f"signed ops from before {floor:.0f} are refused")
    return 0


def run_selftest(settings: ExecutorSettings, conn: Connection) -> int:
    """``pve-executor selftest``: 0 when the normalized round trip holds and the guest is restored."""
    journal = open_journal(settings.state_dir) if settings.state_dir else None
    parts = build(settings, conn, EmptyProvider(), journal)
    try:
        result = selftest(parts.engine, settings.vmid or 0)
    except PlannerError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 1
    finally:
        parts.close(30.0)
    print(f"wrote     {result.written!r}\nread back {result.read_back!r}\n{result.detail}\n"
          f"original description {'restored' if result.restored else 'NOT restored'}")
    print("selftest: ok" if result.ok else "selftest: FAILED")
    return 0 if result.ok else 1
