"""The executor API: executor.v1.ExecutorService, health and reflection, on its own gRPC server."""

from __future__ import annotations

import grpc
import structlog

from common import grpcserver
from common.grpcserver import ServerTls
from executor.engine import Engine, TickSummary
from executor.gate import GateState, Pending, Refusal
from executor.v1 import executor_pb2 as pb
from executor.v1 import executor_pb2_grpc as pb_grpc
from journal import Begun, Ended, Record, Refused, TaskStarted
from safety.classify import Class

log = structlog.get_logger("executor.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExecutorService"].full_name
CLASSES = {Class.BENIGN: pb.ACTION_CLASS_BENIGN, Class.APPROVAL: pb.ACTION_CLASS_APPROVAL,
           Class.DESTRUCTIVE: pb.ACTION_CLASS_DESTRUCTIVE}


def reason_to_proto(reason: str) -> pb.RefusalReason.ValueType:
    """A gate reason name as executor.v1.RefusalReason (UNSPECIFIED for a name the contract lacks)."""
    try:
        return pb.RefusalReason.Value(f"REFUSAL_REASON_{reason}")
    except ValueError:
        return pb.REFUSAL_REASON_UNSPECIFIED


def refusal_to_proto(refusal: Refusal) -> pb.Refusal:
    """A gate refusal as executor.v1."""
    return pb.Refusal(vmid=refusal.vmid, op_kind=refusal.op_kind, action_class=CLASSES[refusal.cls],
                      reason=reason_to_proto(refusal.reason), detail=refusal.detail, op_id=refusal.op_id)


def pending_to_proto(entry: Pending) -> pb.PendingApproval:
    """A pending approval as executor.v1."""
    return pb.PendingApproval(vmid=entry.vmid, op_kind=entry.op_kind, action_class=CLASSES[entry.cls], rule=entry.rule,
                              reasons=entry.reasons, source=entry.source.value, descriptor=entry.descriptor,
                              descriptor_sha256=entry.descriptor_sha256, reason=reason_to_proto(entry.reason),
                              first_seen_unix_ms=int(entry.first_seen * 1000))


def gate_to_proto(state: GateState) -> pb.GateStatus:
    """The gate's state as executor.v1."""
    return pb.GateStatus(signed_ops=state.signed_ops, journal_ok=state.journal_ok, pending=state.pending,
                         refused=state.refused, deferred=state.deferred,
                         max_stops_per_tick=state.max_stops_per_tick or 0)


def tick_to_proto(summary: TickSummary) -> pb.TickSummary:
    """A tick summary as executor.v1."""
    return pb.TickSummary(
        started_unix_ms=int(summary.started * 1000), duration_seconds=summary.duration,
        outcome=summary.outcome.value,  # type: ignore[arg-type]
        error=summary.error, actions_queued=summary.queued, actions_succeeded=summary.succeeded,
        actions_failed=summary.failed, guests_skipped=summary.skipped, guests_deferred=summary.deferred,
        guests_elsewhere=summary.elsewhere, actions_refused=summary.refused, approvals_pending=summary.pending,
        actions_deferred=summary.stops_deferred,
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
        case Refused():
            refusal = pb.Refusal(vmid=record.vmid, op_kind=record.kind, reason=reason_to_proto(record.reason),
                                 detail=record.detail, op_id=record.op_id or "")
            return pb.Operation(op_id=record.op_id or "", vmid=record.vmid, kind=record.kind, record="refused",
                                at_unix_ms=at, refusal=refusal)
    return pb.Operation(op_id=record.op_id, record="applied", outcome=record.outcome.value, at_unix_ms=at)


class ExecutorServicer(pb_grpc.ExecutorServiceServicer):
    """GetStatus, Reconcile, ListOperations, ListPending over an Engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusResponse:  # noqa: N802
        """The daemon's status."""
        status = self._engine.status()
        response = pb.GetStatusResponse(ticks=status.ticks, journal_enabled=status.journal_enabled,
                                        gate=gate_to_proto(status.gate))
        if status.last is not None:
            response.last_tick.CopyFrom(tick_to_proto(status.last))
        for (kind, outcome), count in sorted(status.counters.items()):
            response.actions.add(kind=kind, outcome=outcome, count=count)
        for vmid, depth in sorted(status.busy.items()):
            response.busy.add(vmid=vmid, depth=depth)
        for op in status.in_flight:
            response.in_flight.add(op_id=op.op_id, vmid=op.vmid, kind=op.kind, upid=op.upid or "",
                                   record="task" if op.upid else "begun", at_unix_ms=int(op.begun_at * 1000))
        return response

    def Reconcile(self, request: pb.ReconcileRequest, context: grpc.ServicerContext) -> pb.ReconcileResponse:  # noqa: N802
        """Run a tick now (after the running one, if any) and wait for its actions."""
        if self._engine.recovering.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "recovering in-flight operations: no tick before that ends")
        summary = self._engine.tick(wait=True)
        return pb.ReconcileResponse(tick=tick_to_proto(summary), waited_for_tick=summary.waited,
                                    refusals=[refusal_to_proto(r) for r in summary.refusals])

    def ListOperations(self, request: pb.ListOperationsRequest,  # noqa: N802
                       context: grpc.ServicerContext) -> pb.ListOperationsResponse:
        """Recent journal records, oldest first."""
        if request.limit > 1000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit: at most 1000")
        journal = self._engine.journal
        records = journal.recent(request.limit or 100) if journal is not None else []
        return pb.ListOperationsResponse(operations=[record_to_proto(r) for r in records])

    def ListPending(self, request: pb.ListPendingRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> pb.ListPendingResponse:
        """The refused non-benign actions waiting for an approval."""
        return pb.ListPendingResponse(pending=[pending_to_proto(p) for p in self._engine.gate.pending()])


def start_api(engine: Engine, listen: str, *, tls: ServerTls | None = None) -> grpcserver.Running:
    """Serve the executor API on ``listen`` (port 0 picks one); TLS, mutual when a client CA is set."""
    api = grpcserver.start(listen, lambda server: pb_grpc.add_ExecutorServiceServicer_to_server(
        ExecutorServicer(engine), server), (SERVICE_NAME,), tls=tls, workers=4)
    log.info("executor_api_listening", address=f"{listen.rsplit(':', 1)[0]}:{api.port}", tls=tls is not None,
             mutual_tls=bool(tls and tls.client_ca))
    return api
