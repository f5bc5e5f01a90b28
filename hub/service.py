"""hub.v1.HubService over a Store: the hub is a courier, so it checks a document's sequence, never its signature.

Errors map to gRPC codes by table (``CODES``): bad input is INVALID_ARGUMENT naming the field, a lost race
FAILED_PRECONDITION naming both versions, a database that cannot be reached UNAVAILABLE.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import structlog

from hub import documents, fleet, routing
from hub.documents import HubRefusal
from hub.feeds import CLOSED, Feeds, Published, Watcher
from hub.metrics import HubMetrics
from hub.store import (
    Delivery,
    DocumentTooLarge,
    InvalidArgumentError,
    NodeReport,
    NodeState,
    SchemaTooNewError,
    Store,
    StoreError,
    StoreUnavailableError,
    UnknownVersionError,
    VersionConflict,
)
from hub.store.model import DELIVERY_ID, MAX_DELIVERIES, check_name
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc

log = structlog.get_logger("hub.service")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HubService"].full_name
DEFAULT_HEARTBEAT = 10.0  # seconds between heartbeats on a quiet Watch stream
DEFAULT_HISTORY = 20
# The store's refusals, as gRPC codes (most specific first: the first class the error is an instance of).
CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (VersionConflict, grpc.StatusCode.FAILED_PRECONDITION),
    (DocumentTooLarge, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (UnknownVersionError, grpc.StatusCode.OUT_OF_RANGE),
    (SchemaTooNewError, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreError, grpc.StatusCode.INTERNAL),
)
OUTCOMES = {grpc.StatusCode.INVALID_ARGUMENT: "invalid", grpc.StatusCode.FAILED_PRECONDITION: "conflict",
            grpc.StatusCode.UNAVAILABLE: "unavailable"}
T = TypeVar("T")


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message of a refusal (HubRefusal, a store error or bad input)."""
    if isinstance(exc, HubRefusal):
        return exc.code, exc.message
    code = next((code for kind, code in CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
    if isinstance(exc, DocumentTooLarge):
        return code, f"envelope: {exc}; nothing stored"
    return code, str(exc)


def _mapped(method: Callable[..., T]) -> Callable[..., T]:
    """A unary method whose refusals become the gRPC status CODES says."""
    @functools.wraps(method)
    def call(self: HubServicer, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return method(self, request, context)
        except (HubRefusal, StoreError, InvalidArgumentError) as exc:
            code, message = status_of(exc)
            log.info("hub.refused", method=method.__name__, code=code.name, reason=message)
            context.abort(code, message)
            raise  # abort raises; this line is for the type checker
    return call


def _report(report: NodeReport) -> pb.NodeStatus:
    return fleet.node_status(report.node, report, None, None, heartbeat=float("inf"))


def identities(context: grpc.ServicerContext) -> set[str]:
    """The client certificate's names (its CN and SANs); empty without mutual TLS."""
    auth = context.auth_context() or {}
    names = [*auth.get("x509_common_name", []), *auth.get("x509_subject_alternative_name", []),
             *(context.peer_identities() or [])]
    return {bytes(name).decode("utf-8", "replace") for name in names}


class HubServicer(pb_grpc.HubServiceServicer):
    """The hub's gRPC surface over one Store; Watch streams share one feed per cluster (hub.feeds)."""

    def __init__(self, store: Store, *, metrics: HubMetrics | None = None, heartbeat: float = DEFAULT_HEARTBEAT,
                 mutual_tls: bool = False, max_watchers: int = 1024,
                 max_report_bytes: int = fleet.DEFAULT_MAX_REPORT_BYTES) -> None:
        self.store, self.metrics = store, metrics or HubMetrics()
        self.max_report_bytes = max_report_bytes
        self.feeds = Feeds(store)
        self.heartbeat, self.mutual_tls, self.max_watchers = heartbeat, mutual_tls, max_watchers
        self._seen_lock = threading.Lock()
        self._seen: dict[tuple[str, str], float] = {}  # (cluster, node) -> last Watch activity, this replica
        # Watch activity not yet in the store, per cluster, and when each cluster's last batch went to it
        # (monotonic): one write per cluster per heartbeat, whatever the number of nodes (SQLite fsyncs each).
        self._unsaved: dict[str, dict[str, float]] = {}
        self._saved_at: dict[str, float] = {}

    def _db(self, call: Callable[..., T], *args: object) -> T:
        """A store call on the store's own few threads: the many threads that serve calls and hold Watch streams
        never each open a database connection (SQLite's are per thread)."""
        return self.feeds.read(call, *args)

    def close(self) -> None:
        """End every Watch stream and stop the feeds."""
        self.feeds.close()

    def release(self) -> None:
        """Stop the store's threads, once the server has stopped."""
        self.feeds.release()

    # -- Apply ---------------------------------------------------------------------------------------------------

    def Apply(self, request: pb.ApplyRequest, context: grpc.ServicerContext) -> pb.ApplyResponse:  # noqa: N802
        """Store the envelope as the next version, after the courier's checks; the outcome is counted."""
        try:
            response = self._apply(request)
        except (HubRefusal, StoreError, InvalidArgumentError) as exc:
            code, message = status_of(exc)
            self.metrics.applies.labels(OUTCOMES.get(code, "error")).inc()
            log.info("hub.apply_refused", cluster=request.cluster[:64], code=code.name, reason=message)
            context.abort(code, message)
            raise
        self.metrics.applies.labels("ok").inc()
        return response

    def _apply(self, request: pb.ApplyRequest) -> pb.ApplyResponse:
        cluster = check_name("cluster", request.cluster)
        expected = request.expected_version
        checked = documents.parse(request.envelope, self.store.max_envelope_bytes)
        documents.check_next(checked, cluster=cluster, expected_version=expected)
        latest = self._db(self.store.get, cluster)
        current = latest.version if latest is not None else 0
        if current != expected:
            raise VersionConflict(cluster, expected, current)
        documents.check_previous(checked, latest)
        document = checked.document
        stored = self._db(self.store.append, cluster, expected, request.envelope, document.author, document.message)
        documents.remember(stored, checked.payload_sha256)
        log.info("hub.applied", cluster=cluster, version=stored.version, payload_sha256=checked.payload_sha256,
                 author=document.author, size=len(request.envelope))
        return pb.ApplyResponse(version=stored.version, payload_sha256=checked.payload_sha256)

    # -- reads ---------------------------------------------------------------------------------------------------

    @_mapped
    def GetDocument(self, request: pb.GetDocumentRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> pb.GetDocumentResponse:
        """One version (0: the latest); NOT_FOUND when there is none."""
        cluster = check_name("cluster", request.cluster)
        version = self._db(self.store.get, cluster, request.version or None)
        if version is None:
            which = f"version {request.version}" if request.version else "any version"
            raise HubRefusal(grpc.StatusCode.NOT_FOUND, f"version: cluster {cluster} has no {which}")
        return pb.GetDocumentResponse(document=documents.to_document(version))

    @_mapped
    def History(self, request: pb.HistoryRequest, context: grpc.ServicerContext) -> pb.HistoryResponse:  # noqa: N802
        """Versions newest first, without their envelopes."""
        cluster = check_name("cluster", request.cluster)
        entries = self._db(self.store.history, cluster, request.limit or DEFAULT_HISTORY, request.before or None)
        return pb.HistoryResponse(entries=[documents.to_entry(entry, self._payload_sha(entry.cluster, entry.version,
                                                                                      entry.sha256))
                                           for entry in entries])

    def _payload_sha(self, cluster: str, version: int, envelope_sha: str) -> str:
        known = documents.known_sha(cluster, version, envelope_sha)
        if known is not None:
            return known
        stored = self._db(self.store.get, cluster, version)
        return documents.payload_sha256(stored) if stored is not None else ""

    # -- Watch ---------------------------------------------------------------------------------------------------

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchEvent]:  # noqa: N802
        """The latest document if newer than since_version, then each new one, heartbeats between."""
        try:
            cluster = check_name("cluster", request.cluster)
            node = check_name("node", request.node)
            self._check_identity(context, node)
            if self.feeds.stopping.is_set():  # a stream now would end at once: send the node elsewhere, or back later
                context.abort(grpc.StatusCode.UNAVAILABLE, "the hub is stopping")
            if self.feeds.watching() >= self.max_watchers:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"this hub holds {self.max_watchers} watchers, its most: try another replica")
            if request.audience:
                self._check_identity(context, request.audience, "audience")
                self._db(self.store.record_audience, cluster, node, request.audience)
            # Before reading the store: no append, and no delivery, falls between.
            watcher = self.feeds.subscribe(cluster, node)
        except (StoreError, InvalidArgumentError) as exc:
            code, message = status_of(exc)
            context.abort(code, message)
            raise
        context.add_callback(functools.partial(self.feeds.unsubscribe, watcher))
        self.metrics.watchers.inc()
        log.info("hub.watch_started", cluster=cluster, node=node, since_version=request.since_version)
        try:
            yield from self._stream(watcher, node, request.since_version)
        finally:
            self.feeds.unsubscribe(watcher)
            self._save_pending(cluster, node)
            self.metrics.watchers.dec()
            log.info("hub.watch_ended", cluster=cluster, node=node)

    def _stream(self, watcher: Watcher, node: str, since: int) -> Iterator[pb.WatchEvent]:
        cluster, held = watcher.cluster, since
        self._touch(cluster, node)
        current = watcher.current
        latest = current.version if current is not None else 0
        if since > latest:
            # The node is ahead of this hub (a restored database, another hub): it keeps its version; newer ones
            # still reach it, and heartbeats show it the hub's latest.
            log.warning("hub.watcher_ahead", cluster=cluster, node=node, since_version=since, latest=latest)
        # The first event comes at once, a document or a heartbeat: the node knows it is connected and what the
        # hub holds without waiting a heartbeat interval.
        if current is not None and current.version > since:
            yield self._send(current, cluster, node)
            held = current.version
        else:
            yield self._beat(cluster, held)
        # Deliveries without a verdict go again on each new stream (at-least-once: the node's gate refuses a nonce
        # spent or in flight, and the node answers a delivery it already decided with its first verdict).
        sent: set[str] = set()
        for delivery in self._open(cluster, node):
            yield self._deliver(delivery, sent)
        beat_at = time.monotonic() + self.heartbeat
        while True:
            try:
                item = watcher.inbox.get(timeout=max(0.0, beat_at - time.monotonic()))
            except queue.Empty:
                yield self._beat(cluster, held)
                self._touch(cluster, node)
                beat_at = time.monotonic() + self.heartbeat
                continue
            if item is CLOSED:
                return
            if isinstance(item, Delivery):
                if item.delivery_id not in sent:
                    yield self._deliver(item, sent)
                continue
            if item.version > held:
                yield self._send(item, cluster, node)
                held = item.version

    def _open(self, cluster: str, node: str) -> list[Delivery]:
        """The node's deliveries without a verdict (none when the store cannot say now: the next stream reads them)."""
        try:
            return self._db(self.store.open_deliveries, cluster, node)
        except StoreError as exc:
            log.warning("hub.deliveries_unread", cluster=cluster, node=node, error=str(exc))
            return []

    def _deliver(self, delivery: Delivery, sent: set[str]) -> pb.WatchEvent:
        """The delivery's event; marked delivered (a failure to mark it changes nothing the node sees)."""
        sent.add(delivery.delivery_id)
        if delivery.state == "queued":
            try:
                self._db(self.store.mark_delivered, delivery.delivery_id)
            except StoreError as exc:
                log.warning("hub.delivery_unmarked", delivery_id=delivery.delivery_id, error=str(exc))
        log.info("hub.delivery_sent", cluster=delivery.cluster, node=delivery.node, delivery_id=delivery.delivery_id,
                 op_id=delivery.op_id, op_kind=delivery.kind)
        return pb.WatchEvent(delivery=routing.to_delivery(delivery))

    def _beat(self, cluster: str, held: int) -> pb.WatchEvent:
        latest = self.feeds.latest(cluster)
        return pb.WatchEvent(heartbeat=pb.Heartbeat(latest_version=latest if latest is not None else held,
                                                    at_unix_ms=int(time.time() * 1000)))

    def _send(self, published: Published, cluster: str, node: str) -> pb.WatchEvent:
        self.metrics.sent.inc()
        log.info("hub.document_sent", cluster=cluster, node=node, version=published.version)
        return published.event

    def _touch(self, cluster: str, node: str) -> None:
        """Note ``node``'s Watch activity here, and in the store (so every replica's Status sees it): a cluster's
        activity goes there in one batch, at most once per heartbeat, from the store's threads."""
        now, tick = time.time(), time.monotonic()
        with self._seen_lock:
            self._seen[(cluster, node)] = now
            self._unsaved.setdefault(cluster, {})[node] = now
            if tick - self._saved_at.get(cluster, -self.heartbeat) < self.heartbeat:
                return
            self._saved_at[cluster] = tick
            batch = self._unsaved.pop(cluster)
        self.feeds.submit(self._save_seen, cluster, batch)

    def _save_pending(self, cluster: str, node: str) -> None:
        """At a stream's end: ``node``'s activity still waiting for its cluster's next batch goes to the store now
        (no other heartbeat of this node may come to carry it). Not while the hub stops."""
        if self.feeds.stopping.is_set():
            return
        with self._seen_lock:
            if node not in self._unsaved.get(cluster, {}):
                return
            self._saved_at[cluster] = time.monotonic()
            batch = self._unsaved.pop(cluster)
        self.feeds.submit(self._save_seen, cluster, batch)

    def _save_seen(self, cluster: str, batch: dict[str, float]) -> None:
        try:
            self.store.record_seen(cluster, batch)
        except (StoreError, InvalidArgumentError) as exc:
            # This replica's Status still shows them, and their next heartbeats bring them to the store again.
            log.warning("hub.seen_not_saved", cluster=cluster, nodes=len(batch), error=str(exc))

    def _check_identity(self, context: grpc.ServicerContext, name: str, field: str = "node") -> None:
        """With mutual TLS, ``name`` (a node, or the audience it answers to: SubmitOp routes signed ops by it) must be
        a name of the client certificate (its CN or a SAN): no node takes another's envelopes."""
        if not self.mutual_tls or (field != "node" and not name):
            return
        names = identities(context)
        if name not in names:
            log.warning("hub.identity_refused", field=field, name=name[:256], certificate=sorted(names))
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{field}: {name} is not a name of the client certificate ({', '.join(sorted(names))})")

    # -- Report and Status ---------------------------------------------------------------------------------------

    @_mapped
    def Report(self, request: pb.ReportRequest, context: grpc.ServicerContext) -> pb.ReportResponse:  # noqa: N802
        """Record a node's ACK or NACK (a NACK must give its reason)."""
        cluster = check_name("cluster", request.cluster)
        node = check_name("node", request.node)
        self._check_identity(context, node)
        reason = ": ".join(part for part in (request.reason, request.detail) if part)
        report = self._db(self.store.record_ack, cluster, node, request.version, request.ok, reason)
        self.metrics.reports.labels("ack" if request.ok else "nack").inc()
        log.info("hub.reported", cluster=cluster, node=node, version=request.version, ok=request.ok,
                 reason=request.reason)
        return pb.ReportResponse(node=_report(report))

    @_mapped
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:  # noqa: N802
        """Per node: the version held, the last ACK/NACK, when it was last seen (reported, or watched on any replica:
        the store has each replica's Watch activity within a heartbeat, this replica's own is merged at once), and
        from its StateReports its guests by sync state, its tick's outcome and whether it is stale."""
        cluster = check_name("cluster", request.cluster)
        latest = self._db(self.store.latest, cluster)
        acks = {report.node: report for report in self._db(self.store.nodes, cluster)}
        states = {state.node: state for state in self._db(self.store.node_states, cluster)}
        seen = self._watched(cluster)
        now = time.time()
        nodes = [fleet.node_status(node, acks.get(node), states.get(node), seen.get(node), heartbeat=self.heartbeat,
                                   now=now) for node in sorted({*acks, *states, *seen})]
        return pb.StatusResponse(latest_version=latest, nodes=nodes)

    # -- the fleet view: StateReports (hub.fleet) ---------------------------------------------------------------

    @_mapped
    def ReportState(self, request: pb.StateReport,  # noqa: N802
                    context: grpc.ServicerContext) -> pb.StateReportResponse:
        """Record a node's state after a tick: a full report, or a delta on top of the one held (else needs_full);
        and what it says of ops routed through the hub (``take_routed``). A report with seq 0 carries only that (the
        executor sends one as soon as it has a verdict, not waiting for its tick): the node's state is left as is."""
        size = request.ByteSize()
        if size > self.max_report_bytes:
            self.metrics.state_reports.labels("full" if request.full else "delta", "invalid").inc()
            raise InvalidArgumentError("report", f"{size} bytes, over the limit of {self.max_report_bytes}; "
                                                 "nothing recorded")
        cluster = check_name("cluster", request.cluster)
        node = check_name("node", request.node)
        self._check_identity(context, node)
        self._check_identity(context, request.audience, "audience")
        if not request.seq and not request.full:
            self.take_routed(cluster, node, request)
            return pb.StateReportResponse(needs_full=False, recorded_seq=0)
        kind = "full" if request.full else "delta"
        try:
            recorded = self._db(self.store.record_state, fleet.to_state_in(request))
        except InvalidArgumentError:
            self.metrics.state_reports.labels(kind, "invalid").inc()
            raise
        self.metrics.state_reports.labels(kind, "applied" if recorded.applied else "needs_full").inc()
        self.take_routed(cluster, node, request)
        log.info("hub.state_reported", cluster=cluster, node=node, seq=request.seq, full=request.full,
                 guests=len(request.guests), ops=len(request.ops), applied=recorded.applied)
        return pb.StateReportResponse(needs_full=not recorded.applied, recorded_seq=recorded.seq)

    def take_routed(self, cluster: str, node: str, report: pb.StateReport) -> None:
        """What a StateReport says of routed ops: the node's audience, its verdicts on deliveries (the first stands)
        and the fate of ops the hub delivered (kept on their deliveries for GetOpStatus). A bad entry is logged and
        skipped: it must not cost the rest of the report."""
        if report.audience:
            try:
                self._db(self.store.record_audience, cluster, node, report.audience)
            except InvalidArgumentError as exc:
                log.warning("hub.audience_refused", cluster=cluster, node=node, error=str(exc))
        for result in report.deliveries:
            verdict = functools.partial(self.store.record_verdict, op_id=result.op_id, reason=result.reason,
                                        detail=result.detail[:2000])
            try:
                recorded = self._db(verdict, cluster, node, result.delivery_id, result.decision)
            except InvalidArgumentError as exc:
                log.warning("hub.delivery_result_refused", cluster=cluster, node=node, error=str(exc))
                continue
            log.info("hub.delivery_answered", cluster=cluster, node=node, delivery_id=result.delivery_id,
                     decision=result.decision, op_id=result.op_id, reason=result.reason, recorded=recorded)
        fates = [(op.op_id, op.SerializeToString()) for op in report.ops if DELIVERY_ID.fullmatch(op.op_id)]
        if fates:
            self._db(self.store.record_op_reports, cluster, node, fates)

    @_mapped
    def GetNode(self, request: pb.GetNodeRequest, context: grpc.ServicerContext) -> pb.GetNodeResponse:  # noqa: N802
        """One node's status, guests and recent ops as last reported; NOT_FOUND for a node that never reported."""
        cluster = check_name("cluster", request.cluster)
        node = check_name("node", request.node)
        state = next((s for s in self._db(self.store.node_states, cluster) if s.node == node), None)
        if state is None:
            raise HubRefusal(grpc.StatusCode.NOT_FOUND, f"node: {node} has sent no state report for cluster {cluster}")
        ack = next((r for r in self._db(self.store.nodes, cluster) if r.node == node), None)
        status = fleet.node_status(node, ack, state, self._watched(cluster).get(node), heartbeat=self.heartbeat)
        guests = [fleet.guest_of(row) for row in self._db(self.store.guests, cluster, node)]
        ops = [fleet.op_of(row) for row in self._db(self.store.ops, cluster, node)]
        return pb.GetNodeResponse(status=status, guests=guests, ops=ops)

    def fleet(self) -> tuple[list[NodeState], list[NodeReport]]:
        """Every node's last StateReport, and the ACK/NACKs of the clusters they are in (for the metrics)."""
        states = self._db(self.store.node_states, None)
        acks = [ack for cluster in sorted({s.cluster for s in states}) for ack in self._db(self.store.nodes, cluster)]
        return states, acks

    def _watched(self, cluster: str) -> dict[str, float]:
        """Each node's last Watch activity on this replica."""
        with self._seen_lock:
            return {node: at for (name, node), at in self._seen.items() if name == cluster}

    @_mapped
    def ListPending(self, request: pb.ListPendingRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> pb.ListPendingResponse:
        """Every node's pending approvals from their latest reports, by node then vmid (each names its node)."""
        cluster = check_name("cluster", request.cluster)
        by_node: dict[str, list[pb.PendingApproval]] = {}
        for row in self._db(functools.partial(self.store.guests, pending_only=True), cluster):
            for item in fleet.guest_of(row).pending:
                item.node = row.node  # the node the hub heard it from, whatever the entry says
                by_node.setdefault(row.node, []).append(item)
        pending, omitted = fleet.fair_share(by_node)
        if omitted:
            log.warning("hub.pending_omitted", cluster=cluster, omitted=omitted)
        return pb.ListPendingResponse(pending=pending, omitted=omitted)

    @_mapped
    def SubmitOp(self, request: pb.SubmitOpRequest, context: grpc.ServicerContext) -> pb.SubmitOpResponse:  # noqa: N802
        """Queue a signed op (or op.revoke) for the node its payload's audience names; it goes on that node's
        Watch stream at once if it watches (any replica), else when it next connects. The hub verifies nothing."""
        cluster = check_name("cluster", request.cluster)
        route = routing.read(request.envelope)
        node = self._db(self.store.node_for_audience, cluster, route.audience)
        if node is None:
            raise HubRefusal(grpc.StatusCode.NOT_FOUND, f"payload.audience: no node of cluster {cluster} has "
                                                        f"reported audience {route.audience}")
        delivery = self._db(self.store.add_delivery, cluster, node, request.envelope, route.op_id, route.kind)
        log.info("hub.op_submitted", cluster=cluster, node=node, delivery_id=delivery.delivery_id, op_id=route.op_id,
                 op_kind=route.kind, vmid=route.vmid)
        return pb.SubmitOpResponse(delivery_id=delivery.delivery_id, node=node, op_id=route.op_id,
                                   op_kind=route.kind)

    @_mapped
    def GetOpStatus(self, request: pb.GetOpStatusRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> pb.GetOpStatusResponse:
        """Routed ops by delivery id or op id (every delivery of that op), or the most recent; NOT_FOUND for an id
        the hub never routed."""
        cluster = check_name("cluster", request.cluster)
        if request.limit > MAX_DELIVERIES:
            raise InvalidArgumentError("limit", f"must be <= {MAX_DELIVERIES}, not {request.limit}")
        found = self._db(self.store.deliveries, cluster, request.id or None, request.limit or DEFAULT_HISTORY)
        if request.id and not found:
            raise HubRefusal(grpc.StatusCode.NOT_FOUND, f"id: no delivery or op {request.id} was routed through "
                                                        f"this hub for cluster {cluster}")
        return pb.GetOpStatusResponse(ops=[routing.to_routed(delivery) for delivery in found])
