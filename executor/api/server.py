"""The executor API: executor.v1.ExecutorService, health and reflection, on its own gRPC server."""

from __future__ import annotations

import collections
import functools
import json
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc
import structlog

from common import callers, grpcserver
from common.grpcserver import ServerTls
from executor.api.fates import fates, remembered
from executor.errors import InvalidInputError, PermanentError, TemporaryError
from executor.gate.decisions import GateState, PendingApproval, Refusal
from executor.gate.kinds import StepError
from executor.gate.steps import shown
from executor.loop.engine import Engine, TickSummary
from executor.loop.queue import QueueClosedError
from executor.pve.node import PveError
from executor.signed.desk import OpDesk, RateLimitedError
from executor.v1 import executor_pb2 as pb
from executor.v1 import executor_pb2_grpc as pb_grpc
from journal import Begun, Ended, JournalError, Record, RefusalRecord, TaskStarted
from safety.classify import Class
from safety.refusal import Refused
from safety.signedop import Envelope, Signature

log = structlog.get_logger("executor.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExecutorService"].full_name
CLASSES = {Class.BENIGN: pb.ACTION_CLASS_BENIGN, Class.APPROVAL: pb.ACTION_CLASS_APPROVAL,
           Class.DESTRUCTIVE: pb.ACTION_CLASS_DESTRUCTIVE}
CLASS_NAMES = {cls.name: value for cls, value in CLASSES.items()}
SOCKET_GROUP = "pve-reconcile"  # the group whose members reach the API's socket (like docker's group)
# The calls that change something or mint a challenge: each is logged with its caller (``api_call``).
AUDITED = frozenset(f"/{SERVICE_NAME}/{name}" for name in ("Reconcile", "ProposeOp", "SubmitOp", "RevokeOp"))
# The one mapping from an error to the status a client gets, with the prefix of its message; first match wins, so
# the more specific rows come first. An exception no row names is a bug: INTERNAL and an ``api_call_failed`` line
# with its traceback, never grpc's UNKNOWN (and never its text: it could hold anything).
STATUS: tuple[tuple[type[Exception], grpc.StatusCode, str], ...] = (
    (RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    (StepError, grpc.StatusCode.INVALID_ARGUMENT, "Proxmox: "),  # a step's params, refused before any request
    (PveError, grpc.StatusCode.UNAVAILABLE, "Proxmox: "),
    (JournalError, grpc.StatusCode.UNAVAILABLE, "journal: "),
    (QueueClosedError, grpc.StatusCode.UNAVAILABLE, ""),  # shutting down
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT, ""),
    (TemporaryError, grpc.StatusCode.UNAVAILABLE, ""),
    (PermanentError, grpc.StatusCode.FAILED_PRECONDITION, ""),
)
OP_ID = re.compile(r"[0-9a-f]{32}")
OP_STATUS_WINDOW = 1000  # journal records GetOpStatus reads: all the journal keeps in memory (keep_recent)
OP_STATUS_DEFAULT, OP_STATUS_LIMIT = 20, 200
INTERNAL = "internal error: the executor's log has it (api_call_failed)"
R = TypeVar("R")
C = TypeVar("C", bound=type)
Method = Callable[[Any, Any, grpc.ServicerContext], R]


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status and message ``STATUS`` gives ``exc``; None for an exception it does not name (a bug)."""
    for error, code, prefix in STATUS:
        if isinstance(exc, error):
            return code, f"{prefix}{exc}"
    return None


def answered(method: Method[R]) -> Method[R]:
    """An RPC method whose exceptions reach the client through ``STATUS`` (a bug: INTERNAL, logged)."""
    @functools.wraps(method)
    def call(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        try:
            return method(self, request, context)
        except Exception as exc:
            if context.code() is not None:  # context.abort() raised it: the call already has its status
                raise
            status = status_of(exc)
            if status is None:
                log.exception("api_call_failed", method=method.__name__, error=type(exc).__name__)
                status = grpc.StatusCode.INTERNAL, INTERNAL
            context.abort(*status)
            raise  # abort raises; this line only tells the type checker
    return call


def _answered_all(cls: C) -> C:
    """Every RPC method of the service on ``cls`` wrapped by ``answered``."""
    for name in pb.DESCRIPTOR.services_by_name["ExecutorService"].methods_by_name:
        setattr(cls, name, answered(getattr(cls, name)))
    return cls


def reason_to_proto(reason: str) -> pb.RefusalReason.ValueType:
    """A gate reason name as executor.v1.RefusalReason (UNSPECIFIED for a name the contract lacks)."""
    try:
        return pb.RefusalReason.Value(f"REFUSAL_REASON_{reason}")
    except ValueError:  # a name from an older journal: still answered, but never silently
        log.warning("refusal_reason_unknown", reason=reason)
        return pb.REFUSAL_REASON_UNSPECIFIED


def refusal_to_proto(refusal: Refusal) -> pb.Refusal:
    """A gate refusal as executor.v1."""
    return pb.Refusal(vmid=refusal.vmid, op_kind=refusal.op_kind, action_class=CLASSES[refusal.cls],
                      reason=reason_to_proto(refusal.reason), detail=refusal.detail, op_id=refusal.op_id)


def pending_to_proto(entry: PendingApproval) -> pb.PendingApproval:
    """A pending approval as executor.v1."""
    return pb.PendingApproval(vmid=entry.vmid, op_kind=entry.op_kind, action_class=CLASSES[entry.cls], rule=entry.rule,
                              reasons=entry.reasons, source=entry.source.value, descriptor=entry.descriptor,
                              descriptor_sha256=entry.descriptor_sha256, reason=reason_to_proto(entry.reason),
                              first_seen_unix_ms=int(entry.first_seen * 1000), challenge=entry.challenge)


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
        actions_deferred=summary.stops_deferred, guests_staged=summary.staged,
    )


def served_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A begun record's payload as the API serves it: secret keys' values (a cloud-init password) not shown."""
    out = dict(payload)
    for name in ("set", "before"):
        if isinstance(out.get(name), dict):
            out[name] = shown(out[name])
    params = out.get("params")
    if isinstance(params, dict) and isinstance(params.get("set"), dict):
        out["params"] = {**params, "set": shown(params["set"])}
    return out


def record_to_proto(record: Record) -> pb.Operation:
    """A journal record as an executor.v1 Operation."""
    at = int(record.at * 1000)
    match record:
        case Begun():
            op = record.payload.get("op") or {}
            cls = str(op.get("class") or record.payload.get("class", "")).upper()
            return pb.Operation(op_id=record.op_id, vmid=record.vmid, kind=record.kind, record="begun", at_unix_ms=at,
                                op_kind=str(op.get("kind", "")), signers=[str(s) for s in op.get("signers", [])],
                                action_class=CLASS_NAMES.get(cls, pb.ACTION_CLASS_UNSPECIFIED),
                                payload_json=json.dumps(served_payload(record.payload), sort_keys=True))
        case TaskStarted():
            return pb.Operation(op_id=record.op_id, upid=record.upid, record="task", at_unix_ms=at)
        case Ended():
            return pb.Operation(op_id=record.op_id, record="ended", outcome=record.outcome.value, error=record.error,
                                at_unix_ms=at)
        case RefusalRecord():
            refusal = pb.Refusal(vmid=record.vmid, op_kind=record.kind, reason=reason_to_proto(record.reason),
                                 detail=record.detail, op_id=record.op_id or "")
            return pb.Operation(op_id=record.op_id or "", vmid=record.vmid, kind=record.kind, record="refused",
                                at_unix_ms=at, refusal=refusal)
    return pb.Operation(op_id=record.op_id, record="applied", outcome=record.outcome.value, at_unix_ms=at)


def envelope_of(op: pb.SignedOp) -> Envelope:
    """The proto form of a signed op as the library's envelope (the bytes untouched)."""
    return Envelope(payload_type=op.payload_type, payload=op.payload,
                    signatures=tuple(Signature(keyid=s.keyid, sig=s.sig) for s in op.signatures))


RECONCILES_PER_CALLER = 2  # of the API's workers, what one caller's Reconcile calls may hold at once
# Workers of the API; a caller has at most common.callers.CALLS_PER_CALLER calls in progress, so it takes four
# callers (uids of the socket's group, client certificates) to hold them all.
API_WORKERS = 16


@_answered_all
class ExecutorServicer(pb_grpc.ExecutorServiceServicer):
    """GetStatus, Reconcile, ListOperations, ListPending, ProposeOp, SubmitOp, RevokeOp over an Engine."""

    def __init__(self, engine: Engine, desk: OpDesk | None = None) -> None:
        self._engine, self._desk = engine, desk
        self._lock = threading.Lock()
        self._reconciling: collections.Counter[str] = collections.Counter()  # Reconcile calls in progress, by caller

    def _ops(self, context: grpc.ServicerContext) -> OpDesk:
        if self._desk is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "signed operations are not set up on this executor")
        if self._engine.recovering.is_set():  # an op checked against a journal still being resolved could run twice
            context.abort(grpc.StatusCode.UNAVAILABLE, "recovering in-flight operations: try again when it ends")
        assert self._desk is not None
        return self._desk

    def ProposeOp(self, request: pb.ProposeOpRequest, context: grpc.ServicerContext) -> pb.ProposeOpResponse:  # noqa: N802
        """Describe an op for signing; mutates nothing."""
        desk = self._ops(context)
        try:
            params = json.loads(request.params_json or "{}", parse_constant=_no_constant)
            if not isinstance(params, dict):
                raise ValueError("must be a JSON object")
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"params_json: {exc}")
        try:
            proposal = desk.propose(request.vmid, request.kind, params, callers.current().key)
        except Refused as exc:
            code = grpc.StatusCode.NOT_FOUND if "not on node" in exc.detail else grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, f"{exc.reason.value}: {exc.detail}")
        return pb.ProposeOpResponse(action=proposal.action, challenge=proposal.challenge,
                                    action_class=CLASSES[proposal.cls], rule=proposal.rule, reasons=proposal.reasons,
                                    before=proposal.before)

    def SubmitOp(self, request: pb.SubmitOpRequest, context: grpc.ServicerContext) -> pb.SubmitOpResponse:  # noqa: N802
        """Admit a signed op into its guest's lane, or refuse it with a reason."""
        op_id, decision, refusal = self._decide(self._ops(context).submit, request.op, "accepted", context)
        return pb.SubmitOpResponse(op_id=op_id, decision=decision, refusal=refusal)

    def RevokeOp(self, request: pb.RevokeOpRequest, context: grpc.ServicerContext) -> pb.RevokeOpResponse:  # noqa: N802
        """Mark a signed op revoked for good, before it runs."""
        op_id, decision, refusal = self._decide(self._ops(context).revoke, request.revocation, "revoked", context)
        return pb.RevokeOpResponse(op_id=op_id, decision=decision, refusal=refusal)

    @staticmethod
    def _decide(call: Callable[[Envelope, str], tuple[str, Refusal | None]], signed: pb.SignedOp, done: str,
                context: grpc.ServicerContext) -> tuple[str, str, pb.Refusal | None]:
        """One desk call on an envelope: (op_id, decision, refusal); a RateLimitedError past the caller's rate."""
        op_id, refusal = call(envelope_of(signed), callers.current().key)
        if refusal is not None:
            return op_id, "refused", refusal_to_proto(refusal)
        return op_id, done, None

    def GetOpStatus(self, request: pb.GetOpStatusRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> pb.GetOpStatusResponse:
        """What became of a signed op (or the most recent ones): read from the journal and the desk; mutates nothing."""
        if request.op_id and not OP_ID.fullmatch(request.op_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "op_id: must be 32 lowercase hex (the id op sign printed)")
        if request.limit > OP_STATUS_LIMIT:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit: at most {OP_STATUS_LIMIT}")
        journal = self._engine.gate.records
        records = journal.recent(OP_STATUS_WINDOW)
        waiting = self._desk.waiting() if self._desk is not None else []
        # One op id: the journal's own memory of it too (its in-flight ops, nonces and refusals, kept for the
        # whole retention), since a busy node pushes an op out of the recent window within minutes.
        older = remembered(request.op_id, journal) if request.op_id else []
        found = fates(records, waiting, self._engine.status().busy, older)
        if request.op_id:
            found = [status for status in found if status.op_id == request.op_id]
            if not found:
                context.abort(grpc.StatusCode.NOT_FOUND, f"op {request.op_id}: no trace on this executor (not "
                              "submitted here, refused before a signature held, or older than the journal keeps)")
        return pb.GetOpStatusResponse(ops=found[-(request.limit or OP_STATUS_DEFAULT):] if not request.op_id
                                      else found)

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusResponse:  # noqa: N802
        """The daemon's status."""
        status = self._engine.status()
        response = pb.GetStatusResponse(ticks=status.ticks, journal_enabled=status.journal_enabled,
                                        gate=gate_to_proto(status.gate))
        if self._desk is not None:
            on, version, keys, why = self._desk.state()
            response.gate.MergeFrom(pb.GateStatus(signed_ops=on, trust_version=version, keys=keys,
                                                  signed_ops_detail=why, accepted_ops=self._desk.accepted(),
                                                  clock_high_water_ms=int(self._desk.clock.now() * 1000)))
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
        # At most RECONCILES_PER_CALLER calls per caller at once (one ticking, one waiting for the next tick): each
        # holds one of the API's few workers for a whole tick, and a caller queueing many must not starve another's
        # SubmitOp. A call beyond is answered at once.
        caller = callers.current().key
        with self._lock:
            busy = self._reconciling[caller] >= RECONCILES_PER_CALLER
            if not busy:
                self._reconciling[caller] += 1
        if busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{RECONCILES_PER_CALLER} Reconcile calls of this caller are in progress: wait for them")
        try:
            summary = self._engine.tick(wait=True)
        finally:
            with self._lock:
                self._reconciling[caller] -= 1
        return pb.ReconcileResponse(tick=tick_to_proto(summary), waited_for_tick=summary.waited,
                                    refusals=[refusal_to_proto(r) for r in summary.refusals])

    def ListOperations(self, request: pb.ListOperationsRequest,  # noqa: N802
                       context: grpc.ServicerContext) -> pb.ListOperationsResponse:
        """Recent journal records, oldest first."""
        if request.limit > 1000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit: at most 1000")
        records = self._engine.gate.records.recent(request.limit or 100)
        return pb.ListOperationsResponse(operations=[record_to_proto(r) for r in records])

    def ListPending(self, request: pb.ListPendingRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> pb.ListPendingResponse:
        """The refused non-benign actions waiting for an approval."""
        return pb.ListPendingResponse(pending=[pending_to_proto(p) for p in self._engine.gate.pending()])


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def start_api(engine: Engine, listen: str, *, tls: ServerTls | None = None, desk: OpDesk | None = None,
              socket_group: str = SOCKET_GROUP) -> grpcserver.Running:
    """Serve the executor API on ``listen``: ``unix:PATH`` (0660, ``socket_group``) or HOST:PORT (port 0 picks
    one; TLS, mutual when a client CA is set). Each mutating call is logged with its caller."""
    api = grpcserver.start(listen, lambda server: pb_grpc.add_ExecutorServiceServicer_to_server(
        ExecutorServicer(engine, desk), server), (SERVICE_NAME,), tls=tls, workers=API_WORKERS,
        socket_group=socket_group,
        audited=AUDITED)
    address = f"unix:{api.front.path}" if api.front else f"{listen.rsplit(':', 1)[0]}:{api.port}"
    log.info("executor_api_listening", address=address, tls=tls is not None, mutual_tls=bool(tls and tls.client_ca))
    return api
