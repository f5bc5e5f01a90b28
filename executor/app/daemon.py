"""The daemon's lifecycle, and the self-test and clock-reset commands (the dry run is ``executor.app.dryrun``).

run: install the signal handlers first (a SIGTERM during start-up or recovery stops cleanly);
open the journal (refuse to start, exit 1, when another daemon holds it: one executor per node;
journal-less with a loud warning if it cannot open otherwise: then only benign actions run);
serve the API (health NOT_SERVING, Reconcile refused) while recovery resolves in-flight
operations; then tick every interval until SIGTERM/SIGINT; then stop ticking, drain the queue
within the grace period, close the journal. A stop during recovery leaves what is unresolved in
flight in the journal, for the next start to resolve. SIGHUP reloads the trust store at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from common.config import ConfigError
from common.grpcserver import Running, ServerTls
from common.metrics import MetricsEndpoint, serve_metrics
from common.signals import stop_on_signals
from executor.api.server import start_api
from executor.app.connect import api_tls
from executor.app.selftest import selftest
from executor.app.whoami import roles_naming
from executor.app.wiring import Parts, build, open_journal, provider
from executor.config import ExecutorSettings
from executor.errors import failure_fields
from executor.loop.desired import DesiredStateError, EmptyProvider, mistakes
from executor.loop.engine import Engine, TickOutcome, TickSummary
from executor.loop.planner_client import PlannerError
from executor.loop.recovery import RecoveryInterruptedError, recover
from executor.metrics import ExecutorMetrics
from executor.pve.node import Connection, PveReader
from executor.signed.clock import clock_reset
from executor.signed.desk import OpDesk
from journal import Journal, JournalInUseError, JournalOpenError

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


def _hold_for_recovery(parts: Parts) -> None:
    """Hold signed ops until recovery ends, then take the hub's deliveries (they wait for it as a local SubmitOp)."""
    if parts.engine.journal is not None:
        parts.engine.recovering.set()  # before the API serves: no tick and no op against an unresolved journal
    if parts.deliveries is not None:
        parts.deliveries.start()  # after recovering is set: no delivery reaches the desk before recovery ends


def run(settings: ExecutorSettings, conn: Connection) -> int:
    """``pve-executor run``."""
    stop = stop_on_signals()  # first: a SIGTERM from here on is a clean stop
    hangup = record_hangup()  # and a SIGHUP (systemctl reload) during start-up is kept for later, never fatal
    try:
        desired = provider(settings)
    except DesiredStateError as exc:
        for line in mistakes(exc, "not started"):
            print(f"pve-executor: {line}", file=sys.stderr)
        return 2
    tls = api_tls(settings)
    metrics = ExecutorMetrics()
    try:
        journal = journal_or_refuse(settings.state_dir)
    except JournalInUseError as exc:  # one executor per node: never a second one running benign-only beside it
        print(f"pve-executor: {exc}: another pve-executor runs on this state directory ({settings.state_dir}); "
              "stop it first, or give this one its own --state-dir", file=sys.stderr)
        return 1
    try:
        parts = build(settings, conn, desired, journal, metrics)
    except ConfigError:
        if journal is not None:
            journal.close()
        raise
    parts.start_hub()  # watching while recovery runs: the first tick has the hub's latest version
    desk = parts.desk
    if desk is not None:  # always, for the daemon: build makes one
        # Its thread also warns once now if no role names the audience (it may read Proxmox: not on the start's path).
        reload_on_hangup(desk, lambda: warn_if_unnamed(desk, parts.engine.gate.audience), hangup=hangup)
    _hold_for_recovery(parts)
    try:
        api, endpoint = _listen(settings, parts, metrics, tls)
    except OSError as exc:  # a live daemon on the socket, a port taken: one line, no traceback
        print(f"pve-executor: {exc.strerror or exc}", file=sys.stderr)
        parts.close(0)
        return 1
    try:
        return _serve(settings, parts, api, stop)
    finally:
        if api is not None:
            api.stop(5.0)
        parts.close(settings.grace)
        if endpoint is not None:
            endpoint.stop()


def _listen(settings: ExecutorSettings, parts: Parts, metrics: ExecutorMetrics,
            tls: ServerTls | None) -> tuple[Running | None, MetricsEndpoint | None]:
    """The metrics endpoint and the API (none with --once); OSError "listen: cannot listen on ..." naming the flag."""
    try:
        endpoint = serve_metrics(settings.metrics_listen, metrics.registry) if settings.metrics_listen else None
    except OSError as exc:
        raise OSError(exc.errno, f"metrics_listen: {exc.strerror or exc}") from exc
    if endpoint is not None and settings.metrics_listen:
        log.info("metrics_listening", address=f"{settings.metrics_listen.rsplit(':', 1)[0]}:{endpoint.port}")
    try:
        api = None if settings.once else start_api(parts.engine, settings.listen, tls=tls, desk=parts.desk)
    except OSError as exc:
        if endpoint is not None:
            endpoint.stop()
        raise OSError(exc.errno, f"listen: {exc.strerror or exc}") from exc
    if api is not None and parts.engine.recovering.is_set():
        api.set_serving(False)
    return api, endpoint


ONCE_FAILED = {  # what `run --once` prints when its tick failed, by how it ended
    TickOutcome.PVE_UNAVAILABLE: "Proxmox: {error}",
    TickOutcome.ACTIONS_FAILED: "{failed} action(s) failed: {error}",
}


def _once(engine: Engine) -> int:
    """`run --once`'s tick: 0 when it went well, else 1 and one line on stderr that says why; 2 and a line per
    mistake (file:line, as `plan` prints them) for a desired file with mistakes the node's read showed."""
    summary = engine.tick(wait=True)
    if summary.outcome is TickOutcome.OK:
        return 0
    if summary.outcome is TickOutcome.DESIRED_UNAVAILABLE:
        for line in mistakes(DesiredStateError(summary.error), "nothing done"):
            print(f"pve-executor: {line}", file=sys.stderr)
        return 2
    print(f"pve-executor: {failed_tick(summary)}", file=sys.stderr)
    return 1


def failed_tick(summary: TickSummary) -> str:
    """The one line `run --once` ends with when its tick failed (the error keeps its cause and the flag to fix)."""
    return ONCE_FAILED.get(summary.outcome, "{error}").format(error=summary.error, failed=summary.failed)


def _serve(settings: ExecutorSettings, parts: Parts, api: Running | None, stop: threading.Event) -> int:
    """Recover, then one tick (--once) or a tick every interval until stopped; the exit status."""
    engine = parts.engine
    if not _recover(engine, parts.reader, api, stop):
        return 0 if stop.is_set() else 1
    if settings.once:
        return _once(engine)
    _loop(engine, stop, settings.interval)
    return 0


def journal_or_refuse(state_dir: str) -> Journal | None:
    """The journal; None (benign actions only, loudly) when it cannot open; JournalInUseError when a daemon holds it."""
    try:
        return Journal.open(state_dir)
    except JournalInUseError:
        raise
    except JournalOpenError:
        return open_journal(state_dir)  # logs why, and what runs without it


def record_hangup() -> threading.Event:
    """Install a SIGHUP handler that only records the signal (an event ``reload_on_hangup`` takes over).

    Python's default action for SIGHUP ends the process: ``systemctl reload`` (ExecReload sends SIGHUP)
    while the daemon is still starting would kill it. So ``run`` calls this first; a SIGHUP recorded before
    the reload thread exists is acted on as soon as it does. Call from the main thread.
    """
    hangup = threading.Event()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: hangup.set())
    return hangup


def reload_on_hangup(desk: OpDesk, then: Callable[[], None] = lambda: None,
                     hangup: threading.Event | None = None) -> threading.Thread:
    """SIGHUP reloads the trust store at once (a bad file keeps the last good store), then calls ``then`` (also
    once at the start); ``hangup``: the event ``record_hangup`` installed (else one is installed now).

    The handler only sets an event: I/O or logging inside a signal handler could raise in, or deadlock,
    whatever the main thread was doing. A thread of its own waits for it, so a reload comes at once,
    not after the interval the main thread sleeps (nor after a long recovery); one recorded before the
    thread started is acted on when it starts.
    """
    recorded = hangup if hangup is not None else record_hangup()

    def guarded(step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # a bug here must not end the thread: the next SIGHUP still reloads
            log.exception("trust_store_reload_crashed")

    def reloader() -> None:
        guarded(then)
        while True:
            recorded.wait()
            recorded.clear()
            log.info("trust_store_reload", cause=signal.SIGHUP.name)
            guarded(desk.reload)
            guarded(then)

    thread = threading.Thread(target=reloader, name="sighup-reload", daemon=True)
    thread.start()
    return thread


def warn_if_unnamed(desk: OpDesk, audience: Callable[[], str]) -> None:
    """Warn (log and stderr) when no role of the trust store names this executor's audience: nothing could be approved.

    Silent while the audience is not known (Proxmox unreachable and no executor_id: ``node@``).
    """
    store = desk.trust.current()
    if store is None:
        return
    name = audience()
    if name.endswith("@") or roles_naming(store, name):
        return
    log.warning("trust_store_names_no_role_for_audience", audience=name, trust_store=store.path,
                roles=sorted(store.roles), consequence="no signed op can ever be approved here")
    print(f"pve-executor: warning: no role of the trust store {store.path} names this executor's audience {name!r}: "
          "no signed op can ever be approved here; add it to a role's audiences (pve-executor whoami shows them)",
          file=sys.stderr, flush=True)


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
    """``pve-executor clock-reset``: the daemon must be stopped (the journal's lock says so).

    A state directory that does not exist is a mistyped one: exit 2, never a new empty journal.
    """
    if not Path(settings.state_dir).is_dir():
        print(f"pve-executor: clock-reset: state_dir: {settings.state_dir}: no such directory", file=sys.stderr)
        return 2
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
