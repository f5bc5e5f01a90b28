"""The one place the executor's parts are built: the Proxmox writer goes to the gate and nowhere else.

``build`` wires a daemon (or a one-shot command) in a straight line; ``provider`` and ``open_journal``
are the two inputs that can fail with a message for the operator.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from common.config import ConfigError
from executor.app.connect import planner_tls
from executor.config import ExecutorSettings
from executor.gate.decisions import GateSettings
from executor.gate.gate import Gate
from executor.gate.kinds import CallSettings
from executor.gate.stopledger import StopLedger
from executor.loop.desired import DesiredProvider, DesiredStateError, EmptyProvider, FileProvider
from executor.loop.engine import Engine, Settings
from executor.loop.planner_client import PlannerClient
from executor.loop.queue import GuestQueue
from executor.metrics import ExecutorMetrics
from executor.pve.node import Connection, ProxmoxNode
from executor.pve.write import ProxmoxWriter
from executor.signed.clock import GateClock, gate_secret
from executor.signed.desk import OP_TTL_MAX, OpDesk, OpSettings
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
