"""The node's state, reported to its hub after each tick (hub.v1 ``ReportState``), never in a tick's way.

The tick hands its summary over (``offer``: one assignment under a lock, the latest wins) and goes on; a thread
computes each guest's sync state (``executor.loop.fleet``) and the recent signed ops' fates, and sends what changed
since the report the hub confirmed (a delta), or everything (a full report) at start, after any failed call (the
hub may have lost or missed it: it is never guessed), and when the hub answers ``needs_full``. A call has a short
deadline; a hub that is gone leaves the node working as before, and the latest state is sent again, in full, every
``retry`` seconds until the hub answers. Several ticks that end while a call is out coalesce into one report.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import structlog

from executor.api.fates import fates
from executor.loop.engine import TickSummary
from executor.loop.fleet import guest_states
from executor.signed.desk import WaitingOp
from executor.v1 import executor_pb2 as epb
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from journal import Record

log = structlog.get_logger("executor.report")
RECENT_OPS = 100  # the most recent signed ops each report covers (the hub keeps 200 per node)
OPS_WINDOW = 1000  # journal records read for their fates (GetOpStatus reads as many)
OP_ID = re.compile(r"[0-9a-f]{32}")
_HAS_SHA = "payload_sha256" in epb.OpStatus.DESCRIPTOR.fields_by_name


def op_reports(statuses: Sequence[epb.OpStatus]) -> list[pb.OpReport]:
    """The executor's op fates (``executor.api.fates``) as hub.v1 OpReports, the most recent RECENT_OPS."""
    out = []
    for status in statuses[-RECENT_OPS:]:
        if not OP_ID.fullmatch(status.op_id):  # an id the hub would refuse, and with it the whole report
            continue
        fate = epb.OpFate.Name(status.fate).removeprefix("OP_FATE_").lower()
        out.append(pb.OpReport(op_id=status.op_id, vmid=status.vmid, op_kind=status.op_kind, fate=fate,
                               outcome=status.outcome, detail=status.detail[:2000], upid=status.upid,
                               at_unix_ms=max(0, status.at_unix_ms), signers=list(status.signers),
                               payload_sha256=getattr(status, "payload_sha256", "") if _HAS_SHA else ""))
    return out


def ops_of(records: Callable[[int], Sequence[Record]], waiting: Callable[[], Sequence[WaitingOp]],
           busy: Callable[[], Mapping[int, int]]) -> Callable[[], list[pb.OpReport]]:
    """What the reporter reads for the ops: the journal's recent records, the desk's waiting ops, the busy lanes."""
    return lambda: op_reports(fates(records(OPS_WINDOW), waiting(), busy()))


@dataclass(frozen=True, slots=True, kw_only=True)
class ReporterSettings:
    """How the reporter talks to the hub."""

    interval: float  # the node's tick interval (the hub calls it stale after two without a report)
    timeout: float = 3.0  # each ReportState call's deadline
    retry: float = 5.0  # a failed report is sent again (in full) after this long, or at the next tick if sooner


@dataclass(slots=True)
class _Held:
    """What the hub confirmed holding: the seq (0: nothing, the next report is full), each guest's and op's bytes."""

    seq: int = 0
    guests: dict[int, bytes] = field(default_factory=dict)
    ops: dict[tuple[str, str], bytes] = field(default_factory=dict)


class StateReporter:
    """Sends the node's state to the hub from its own thread; ``offer`` each tick's summary, ``start``, ``close``."""

    def __init__(self, channel: grpc.Channel, settings: ReporterSettings, *,
                 identity: Callable[[], tuple[str, str] | None], held_version: Callable[[], int],
                 ops: Callable[[], list[pb.OpReport]] = list,
                 deliveries: Callable[[], list[pb.DeliveryResult]] | None = None) -> None:
        """``identity``: (cluster, node) or None while unknown; ``deliveries``: drained at each report (kept until one
        the hub confirmed carried them)."""
        self._stub = pb_grpc.HubServiceStub(channel)
        self.settings = settings
        self._identity, self._held_version, self._ops, self._deliveries = identity, held_version, ops, deliveries
        self.session = uuid.uuid4().hex
        self._seq = 0
        self._lock = threading.Lock()
        self._slot: TickSummary | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._held = _Held()
        self._guests: dict[int, pb.GuestState] = {}
        self._last: TickSummary | None = None
        self._unsent: list[pb.DeliveryResult] = []
        self._failing = False
        self._pending: tuple[dict[int, bytes], dict[tuple[str, str], bytes]] = ({}, {})  # what the call out carries
        self.sent: list[pb.StateReport] = []  # the last few reports the hub confirmed (for tests and debugging)
        self.failed: list[str] = []  # the status codes of the last few calls that failed

    def offer(self, summary: TickSummary) -> None:
        """Hand a tick's summary over (the engine's after_tick hook): returns at once; the latest wins."""
        with self._lock:
            self._slot = summary
        self._wake.set()

    def start(self) -> None:
        """Start the reporting thread."""
        self._thread = threading.Thread(target=self._run, name="hub-report", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (a call out ends within its deadline)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.retry if self._failing else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                summary, self._slot = self._slot, None
            try:
                if summary is not None:
                    self._absorb(summary)
                if self._last is not None:
                    self._report()
            except Exception:  # a bug here must not end the thread: the hub would call the node stale
                log.exception("hub_state_report_crashed")
                self._failing, self._held = True, _Held()

    def _absorb(self, summary: TickSummary) -> None:
        """The guests' states after this tick (a tick that ended before it planned keeps the last ones)."""
        self._last = summary
        identity = self._identity()
        if summary.view is not None and identity is not None:
            self._guests = guest_states(summary.view, audience=identity[1], previous=self._guests)

    def _report(self) -> None:
        """Send a report; once more, in full, if the hub asks for one."""
        identity = self._identity()
        if identity is None:
            return
        for _ in range(2):
            request = self._request(*identity)
            try:
                answer = self._stub.ReportState(request, timeout=self.settings.timeout)
            except grpc.RpcError as exc:
                self._failed(request, exc)
                return
            if self._failing:
                log.info("hub_state_report_resumed", seq=request.seq, full=request.full)
            self._failing = False
            if not answer.needs_full:
                self._confirmed(request)
                return
            log.info("hub_state_report_needs_full", seq=request.seq, hub_seq=answer.recorded_seq)
            self._held = _Held()

    def _request(self, cluster: str, node: str) -> pb.StateReport:
        assert self._last is not None
        self._seq += 1
        if self._deliveries is not None:
            self._unsent += self._deliveries()
        held, full = self._held, not self._held.seq
        guests = {vmid: g.SerializeToString(deterministic=True) for vmid, g in self._guests.items()}
        ops = {(o.op_id, o.payload_sha256): o for o in self._ops()}
        summary = self._last
        request = pb.StateReport(
            cluster=cluster, node=node, audience=node, session=self.session, seq=self._seq,
            base_seq=0 if full else held.seq, full=full,
            guests=[self._guests[v] for v in sorted(guests) if full or held.guests.get(v) != guests[v]],
            removed_vmids=[] if full else sorted(set(held.guests) - set(guests)),
            ops=[o for k, o in ops.items() if full or held.ops.get(k) != o.SerializeToString(deterministic=True)],
            deliveries=self._unsent, at_unix_ms=int((summary.started + summary.duration) * 1000),
            # The daemon waits its interval after each tick: a report comes every interval plus a tick's length.
            interval_seconds=self.settings.interval + summary.duration, held_version=self._held_version(),
            tick_outcome=summary.outcome.name.lower(), tick_error=summary.error[:2000])
        self._pending = (guests, {k: o.SerializeToString(deterministic=True) for k, o in ops.items()})
        return request

    def _confirmed(self, request: pb.StateReport) -> None:
        guests, ops = self._pending
        self._held = _Held(seq=request.seq, guests=guests, ops=ops)
        self._unsent = self._unsent[len(request.deliveries):]
        self.sent = [*self.sent[-9:], request]
        log.debug("hub_state_reported", seq=request.seq, full=request.full, guests=len(request.guests),
                  removed=len(request.removed_vmids), ops=len(request.ops))

    def _failed(self, request: pb.StateReport, exc: grpc.RpcError) -> None:
        """The hub may or may not have recorded it: the next report is full."""
        status = exc.code() or grpc.StatusCode.UNKNOWN
        code = status.name
        self.failed = [*self.failed[-9:], code]
        if not self._failing or status is grpc.StatusCode.INVALID_ARGUMENT:  # a bug here: said every time
            log.warning("hub_state_report_failed", seq=request.seq, code=code, detail=str(exc.details() or "")[:200],
                        consequence=f"the node works on; its state is sent in full every {self.settings.retry:g} s "
                                    "until the hub answers")
        self._failing, self._held = True, _Held()

