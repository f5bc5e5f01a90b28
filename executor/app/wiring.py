"""The one place the executor's parts are built: the Proxmox writer goes to the gate and nowhere else.

``assemble`` builds an engine (and, given ``OpSettings``, the op desk with the gate's clock and
secret) in a straight line from parts already made; ``build`` makes those parts from the daemon's
settings; ``dry_gate`` is the dry run's gate (no writer, no journal). The daemon, the dry run,
selftest, the tests' helpers and the benchmarks all build through here; nothing is assigned to an
object after it is built. ``provider`` and ``open_journal`` are the two inputs that can fail with a
message for the operator.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from common.config import ConfigError
from executor.api.deliveries import HubDeliveries
from executor.app.connect import connection, hub_tls, planner_tls
from executor.app.report import ReporterSettings, StateReporter, ops_of
from executor.config import ExecutorSettings
from executor.gate.audience import Audience
from executor.gate.decisions import GateSettings
from executor.gate.gate import Gate
from executor.gate.journalport import journal_port
from executor.gate.kinds import CallSettings
from executor.gate.stopledger import StopLedger
from executor.loop.desired import DesiredProvider, DesiredStateError, EmptyProvider, FileProvider
from executor.loop.engine import Engine
from executor.loop.funnel import Funnel, Settings
from executor.loop.hub import HubProvider, HubSettings
from executor.loop.hubheld import HeldFileError, HeldFiles
from executor.loop.planner_client import PlannerClient
from executor.loop.queue import GuestQueue
from executor.loop.readahead import ReadAhead
from executor.metrics import ExecutorMetrics
from executor.pve.node import Connection, ProxmoxNode, PveReader, PveWriter, Session
from executor.pve.write import ProxmoxWriter
from executor.signed.clock import GateClock, gate_secret
from executor.signed.desk import OP_TTL_MAX, OpDesk, OpSettings
from executor.signed.trust import TrustKeeper
from executor.signed.verifier import OpVerifier
from journal import Journal, JournalOpenError

log = structlog.get_logger("executor.daemon")


def provider(settings: ExecutorSettings) -> DesiredProvider:
    """FileProvider for --desired, else EmptyProvider (manage nothing; with --hub, ``build`` makes the hub's).

    ConfigError for --hub with --desired (a node takes one source), without a trust store (nothing verifies) or
    with a TLS file that does not load.
    """
    if settings.hub and settings.desired:
        raise ConfigError("hub", f"{settings.hub} and desired {settings.desired} both given: a node takes one "
                                 "source of desired state; give hub or desired, not both")
    if settings.hub and not settings.trust_store:
        raise ConfigError("hub", "needs trust_store: each hub document is verified against this node's trust "
                                 "store (a role with desired.apply for this node)")
    if settings.hub:
        hub_tls(settings)  # its files checked before anything connects (ConfigError naming the flag)
    if not settings.desired:
        return EmptyProvider()
    try:
        return FileProvider(settings.desired)
    except OSError as exc:
        raise DesiredStateError(f"{settings.desired}: cannot read: {exc.strerror}") from exc


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

    reader: PveReader
    planner: PlannerClient
    queue: GuestQueue
    engine: Engine
    desk: OpDesk | None  # None: built without OpSettings (a test's engine, a benchmark)
    funnel: Funnel  # what selftest submits through
    hub: HubProvider | None = None  # the provider when desired state comes from a hub (``start`` it)
    deliveries: HubDeliveries | None = None  # signed ops the hub delivers, to the desk (``start`` it after recovery)
    reporter: StateReporter | None = None  # with a hub: the node's state sent after each tick (``start`` it)

    def start_hub(self) -> None:
        """Start watching the hub and reporting to it (nothing without a hub)."""
        if self.hub is not None:
            self.hub.start()
        if self.reporter is not None:
            self.reporter.start()

    def close(self, grace: float) -> None:
        """Stop watching the hub, drain the queue within ``grace``, then close the planner channel and the journal."""
        if self.reporter is not None:
            self.reporter.close()
        if self.hub is not None:
            self.hub.close()
        if self.deliveries is not None:
            self.deliveries.close()
        unfinished = self.queue.close(grace)
        if unfinished:
            log.warning("shutdown_unfinished", jobs=[f"{j.vmid}:{j.label}" for j in unfinished])
        self.engine.close()
        self.planner.close()
        self.engine.gate.journal_port.close()


def assemble(*, reader: PveReader, writer: PveWriter | None, journal: Journal | None, planner: PlannerClient,
             provider: DesiredProvider, queue: GuestQueue, gate: GateSettings | None = None,
             engine: Settings | None = None, metrics: ExecutorMetrics | None = None,
             ledger: StopLedger | None = None, ops: OpSettings | None = None,
             holders: Sequence[Callable[[], set[int]]] = (), trust: TrustKeeper | None = None) -> Parts:
    """The parts, built in a straight line; with ``ops`` an op desk, the gate's clock and its challenge secret.

    The funnel (the gate's admission and the queue) is built before the desk and the engine, which both
    submit through it; the engine, built last, asks the desk which guests its queued ops hold and lets it
    reload the trust store before each tick. The op verifier (the trust store in force, the nonce check)
    and the audience are built before the gate: the gate's lane verifies each op again through it, the
    desk hands it the ops it accepts. Nothing is handed a closure over a part built later.
    ``holders``: more guests the engine must not plan (besides the lane's unsettled ones and the desk's);
    ``trust``: the trust keeper, when another part (the hub provider) verifies against it too.
    """
    gate_settings, engine_settings = gate or GateSettings(), engine or Settings()
    metrics = metrics or ExecutorMetrics()
    if ops is not None:  # before the clock: a new secret (or a lost journal) sets the clock's floor
        secret = gate_secret(ops.state_dir, journal) if journal is not None else None
        gate_settings = dataclasses.replace(gate_settings, secret=secret)
    port = journal_port(journal, metrics.journal_append.time)  # one port: a failed write switches it for everyone
    clock = GateClock(port, ops.state_dir) if ops is not None else None
    audience = Audience(reader, gate_settings.audience)  # one cache for the gate and the verifier
    keeper = trust or (TrustKeeper(ops.trust_store, ops.state_dir) if ops is not None else None)
    verifier = OpVerifier(trust=keeper, clock=clock, journal=port, audience=audience,
                          skew=ops.skew) if ops is not None and clock is not None and keeper is not None else None
    reads = ThreadPoolExecutor(max_workers=engine_settings.read_parallel, thread_name_prefix="pve-read")
    # The next starts' pending sections are read while the lanes run, one guest ahead per lane.
    ahead = ReadAhead(reader, reads, window=queue.max_parallel, fresh=engine_settings.read_ahead_fresh)
    the_gate = Gate(reader=reader, writer=writer, journal=port, settings=gate_settings, metrics=metrics,
                    wall=clock.now if clock is not None else time.time, ledger=ledger, ahead=ahead,
                    reverify=verifier.reverify if verifier is not None else None, audience=audience)
    funnel = Funnel(gate=the_gate, queue=queue, ahead=ahead, settings=engine_settings)
    desk = OpDesk(reader=reader, gate=the_gate, funnel=funnel, verifier=verifier, clock=verifier.clock,
                  settings=ops) if verifier is not None and ops is not None else None
    held, before_tick = ((desk.held,), (desk.tick,)) if desk is not None else ((), ())
    the_engine = Engine(pve=reader, gate=the_gate, planner=planner, provider=provider, funnel=funnel,
                        settings=engine_settings, metrics=metrics, reads=reads,
                        holders=(*holders, *held), before_tick=before_tick)
    return Parts(reader, planner, queue, the_engine, desk, funnel)


def writer_for(session: Session) -> PveWriter:
    """The Proxmox writer over ``session``: for ``assemble``, which hands it to the gate's lane alone."""
    return ProxmoxWriter(session)


def build(settings: ExecutorSettings, conn: Connection, desired: DesiredProvider, journal: Journal | None,
          metrics: ExecutorMetrics | None = None) -> Parts:
    """The daemon's parts from its settings: the writer goes to the gate and nowhere else."""
    metrics = metrics or ExecutorMetrics()
    if journal is not None and journal.retention <= OP_TTL_MAX:
        raise ConfigError("state_dir", f"the journal keeps nonces {journal.retention:.0f} s: it must outlive the "
                                       f"longest signed op ({OP_TTL_MAX:.0f} s)")
    reader = ProxmoxNode(conn, on_error=metrics.pve_error)
    trust = TrustKeeper(settings.trust_store, settings.state_dir)  # one keeper: the op desk's and the hub's
    # The gate's clock, never before the journal's high-water mark: a clock set back revives no expired key
    # (docs/SAFETY.md §6.6).
    hub = hub_provider(settings, reader, trust, metrics, clock=GateClock(journal_port(journal), settings.state_dir).now
                       ) if settings.hub else None
    gate = GateSettings(calls=CallSettings(shutdown_timeout=settings.shutdown_timeout, force_stop=settings.force_stop),
                        max_stops_per_tick=settings.max_stops_per_tick, audience=settings.executor_id,
                        stop_window=settings.interval, lost_grace=settings.lost_grace)
    parts = assemble(reader=reader, writer=writer_for(reader.session), journal=journal, gate=gate, metrics=metrics,
                     ledger=StopLedger.in_state_dir(settings.state_dir),
                     planner=PlannerClient(settings.planner, tls=planner_tls(settings)),
                     queue=GuestQueue(settings.max_parallel), provider=hub or desired, engine=Settings(),
                     ops=OpSettings(state_dir=settings.state_dir, trust_store=settings.trust_store,
                                    skew=settings.op_clock_skew), trust=trust)
    deliveries = None
    if hub is not None and parts.desk is not None:
        # The hub carries signed ops to this node's own desk: verified, rate-limited and journaled as the local API's.
        deliveries = HubDeliveries(parts.desk, parts.engine, hub.report_state, parts.engine.gate.audience)
        hub.deliveries = deliveries
    reporter = state_reporter(parts, hub, settings.interval, deliveries) if hub else None
    return dataclasses.replace(parts, hub=hub, reporter=reporter, deliveries=deliveries)


def state_reporter(parts: Parts, hub: HubProvider, interval: float,
                   deliveries: HubDeliveries | None = None) -> StateReporter:
    """The reporter of the node's state to ``hub`` (over its channel), told each tick's summary (not started); it
    also carries the verdicts on the hub's deliveries that ``deliveries`` has not sent itself yet."""
    desk = parts.desk
    records = parts.engine.gate.records
    reporter = StateReporter(hub.channel, ReporterSettings(interval=interval), identity=hub.identity,
                             held_version=lambda: hub.held.version,
                             ops=ops_of(records.recent, desk.waiting if desk is not None else list,
                                        parts.queue.busy),
                             deliveries=deliveries.drain if deliveries is not None else None)
    parts.engine.after_tick.append(reporter.offer)
    return reporter


def hub_provider(settings: ExecutorSettings, reader: PveReader, trust: TrustKeeper, metrics: ExecutorMetrics,
                 clock: Callable[[], float] = time.time) -> HubProvider:
    """The hub's provider (not started); ConfigError when the held files in state_dir cannot be read.

    ``clock`` judges signers' keys and the held version's age: the daemon gives the gate's.
    """
    assert settings.hub is not None
    hub = HubSettings(target=settings.hub, cluster=settings.hub_cluster, tls=hub_tls(settings),
                      heartbeat=settings.hub_heartbeat)
    try:
        return HubProvider(hub, files=HeldFiles(Path(settings.state_dir)), trust=trust, metrics=metrics,
                           audience=Audience(reader, settings.executor_id), clock=clock)
    except HeldFileError as exc:
        raise ConfigError("state_dir", f"{exc}: the hub version held here is unknown, so a rollback could not be "
                                       "refused; restore the file, or remove it to take the hub's latest version "
                                       "as new") from exc


def dry_gate(reader: PveReader, settings: ExecutorSettings) -> Gate:
    """The dry run's gate: no writer, no journal; the stop ledger and the gate's secret read, never written."""
    secret = Path(settings.state_dir) / "gate.secret"  # read, never created: the dry run writes nothing
    return Gate(reader=reader, writer=None, dry_run=True,
                ledger=StopLedger.in_state_dir(settings.state_dir, writable=False),  # read, never written
                settings=GateSettings(max_stops_per_tick=settings.max_stops_per_tick, audience=settings.executor_id,
                                      stop_window=settings.interval,
                                      secret=secret.read_bytes() if secret.is_file() else None))


def dry_inputs(settings: ExecutorSettings) -> tuple[ProxmoxNode, PlannerClient]:
    """The dry run's reader and planner client (it builds no writer)."""
    return ProxmoxNode(connection(settings)), PlannerClient(settings.planner, tls=planner_tls(settings))
