"""The daemon's lifecycle, and the self-test and clock-reset commands (the dry run is ``executor.app.dryrun``).

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

import structlog

from common.grpcserver import Running
from common.metrics import serve_metrics
from common.signals import stop_on_signals
from executor.api.server import start_api
from executor.app.connect import api_tls
from executor.app.selftest import selftest
from executor.app.wiring import build, open_journal, provider
from executor.config import ExecutorSettings
from executor.errors import failure_fields
from executor.loop.desired import DesiredStateError, EmptyProvider
from executor.loop.engine import Engine, TickOutcome, TickSummary
from executor.loop.planner_client import PlannerError
from executor.loop.recovery import RecoveryInterruptedError, recover
from executor.metrics import ExecutorMetrics
from executor.pve.node import Connection, PveReader
from executor.signed.clock import clock_reset
from executor.signed.desk import OpDesk
from journal import Journal, JournalOpenError

log = structlog.get_logger("executor.daemon")


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
    if parts.desk is not None:  # always, for the daemon: build makes one
        reload_on_hangup(parts.desk)
    try:
        if not _recover(engine, parts.reader, api, stop):
            return 0 if stop.is_set() else 1
        if settings.once:
            return _once(engine)
        _loop(engine, stop, settings.interval)
        return 0
    finally:
        if api is not None:
            api.stop(5.0)
        parts.close(settings.grace)
        if endpoint is not None:
            endpoint.stop()


ONCE_FAILED = {  # what `run --once` prints when its tick failed, by how it ended
    TickOutcome.PVE_UNAVAILABLE: "Proxmox: {error}",
    TickOutcome.ACTIONS_FAILED: "{failed} action(s) failed: {error}",
}


def _once(engine: Engine) -> int:
    """`run --once`'s tick: 0 when it went well, else 1 and one line on stderr that says why."""
    summary = engine.tick(wait=True)
    if summary.outcome is TickOutcome.OK:
        return 0
    print(f"pve-executor: {failed_tick(summary)}", file=sys.stderr)
    return 1


def failed_tick(summary: TickSummary) -> str:
    """The one line `run --once` ends with when its tick failed (the error keeps its cause and the flag to fix)."""
    return ONCE_FAILED.get(summary.outcome, "{error}").format(error=summary.error, failed=summary.failed)


def reload_on_hangup(desk: OpDesk) -> None:
    """SIGHUP reloads the trust store at the next tick (a bad file keeps the last good store).

    The handler only sets a flag: I/O or logging inside a signal handler could raise in, or deadlock,
    whatever the main thread was doing.
    """
    signal.signal(signal.SIGHUP, lambda _signum, _frame: desk.hang_up())


def _recover(engine: Engine, reader: PveReader, api: Running | None, stop: threading.Event) -> bool:
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
        log.warning(event, error=str(exc), left_in_flight=len(journal.in_flight()), **failure_fields(exc))
        if not stop.is_set():
            print(f"pve-executor: recovery incomplete: {exc}", file=sys.stderr)
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
        result = selftest(parts.funnel, parts.reader, parts.planner, settings.vmid or 0)
    except PlannerError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 1
    finally:
        parts.close(30.0)
    print(f"wrote     {result.written!r}\nread back {result.read_back!r}\n{result.detail}\n"
          f"original description {'restored' if result.restored else 'NOT restored'}")
    print("selftest: ok" if result.ok else "selftest: FAILED")
    return 0 if result.ok else 1
