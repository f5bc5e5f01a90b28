"""The executor API: executor.v1.ExecutorService, health and reflection, on its own gRPC server."""

from __future__ import annotations

import grpc
import structlog

from common import grpcserver
from common.grpcserver import ServerTls
from executor.engine import Engine, TickSummary
from executor.v1 import executor_pb2 as pb
from executor.v1 import executor_pb2_grpc as pb_grpc
from journal import Begun, Ended, Record, TaskStarted

log = structlog.get_logger("executor.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExecutorService"].full_name


def tick_to_proto(summary: TickSummary) -> pb.TickSummary:
    """A tick summary as executor.v1."""
    return pb.TickSummary(
        started_unix_ms=int(summary.started * 1000), duration_seconds=summary.duration,
        outcome=summary.outcome.value,  # type: ignore[arg-type]
        error=summary.error, actions_queued=summary.queued, actions_succeeded=summary.succeeded,
        actions_failed=summary.failed, guests_skipped=summary.skipped, guests_deferred=summary.deferred,
    )


def record_to_proto(record: Record) -> pb.Operation:
    """A journal record as an executor.v1 Operation."""
    at = int(record.at * 1000)
    match record:
        case Begun():
            return pb.Operation(op_id=record.op_id, vmid=record.vmid, kind=record.kind, record="begun", at_unix_ms=at)
        case TaskStarted():
            return pb.Operation(op_id=record.op_id, upid=record.upid, record="task", at_unix_ms=at)
        case Ended():
            return pb.Operation(op_id=record.op_id, record="ended", outcome=record.outcome.value, error=record.error,
                                at_unix_ms=at)
    return pb.Operation(op_id=record.op_id, record="applied", outcome=record.outcome.value, at_unix_ms=at)


class ExecutorServicer(pb_grpc.ExecutorServiceServicer):
    """GetStatus, Reconcile, ListOperations over an Engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusResponse:  # noqa: N802
        """The daemon's status."""
        engine = self._engine
        response = pb.GetStatusResponse(ticks=engine.ticks, journal_enabled=engine.journal is not None)
        if engine.last is not None:
            response.last_tick.CopyFrom(tick_to_proto(engine.last))
        for (kind, outcome), count in sorted(engine.counters.items()):
            response.actions.add(kind=kind, outcome=outcome, count=count)
        for vmid, depth in sorted(engine.queue.busy().items()):
            response.busy.add(vmid=vmid, depth=depth)
        if engine.journal is not None:
            for op in engine.journal.in_flight():
                response.in_flight.add(op_id=op.op_id, vmid=op.vmid, kind=op.kind, upid=op.upid or "",
                                       record="task" if op.upid else "begun", at_unix_ms=int(op.begun_at * 1000))
        return response

    def Reconcile(self, request: pb.ReconcileRequest, context: grpc.ServicerContext) -> pb.ReconcileResponse:  # noqa: N802
        """Run a tick now and wait for its actions."""
        return pb.ReconcileResponse(tick=tick_to_proto(self._engine.tick(wait=True)))

    def ListOperations(self, request: pb.ListOperationsRequest,  # noqa: N802
                       context: grpc.ServicerContext) -> pb.ListOperationsResponse:
        """Recent journal records, oldest first."""
        if request.limit > 1000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit: at most 1000")
        journal = self._engine.journal
        records = journal.recent(request.limit or 100) if journal is not None else []
        return pb.ListOperationsResponse(operations=[record_to_proto(r) for r in records])


def start_api(engine: Engine, listen: str, *, tls: ServerTls | None = None) -> grpcserver.Running:
    """Serve the executor API on ``listen`` (port 0 picks one); TLS, mutual when a client CA is set."""
    api = grpcserver.start(listen, lambda server: pb_grpc.add_ExecutorServiceServicer_to_server(
        ExecutorServicer(engine), server), (SERVICE_NAME,), tls=tls, workers=4)
    log.info("executor_api_listening", address=f"{listen.rsplit(':', 1)[0]}:{api.port}", tls=tls is not None,
             mutual_tls=bool(tls and tls.client_ca))
    return api
