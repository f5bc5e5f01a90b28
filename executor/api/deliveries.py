"""Signed ops delivered by the hub: each goes to this node's own gate exactly as the local API's SubmitOp/RevokeOp.

The hub carries; it cannot approve (docs/SAFETY.md §6.9). A delivery's envelope is handed to the ``OpDesk`` as the
local API hands it (same verification, rate limit, journal), so an envelope the hub altered, an expired one or one
for another audience is refused here with the reason it gets locally. The verdict goes back to the hub in a
StateReport's ``deliveries`` (``DeliveryResult``), and the fate of each op accepted so in its ``ops``.

Delivery is at-least-once: the hub sends a delivery again on each new stream until it has the verdict. A delivery
this process already decided is answered with its first verdict and never reaches the desk again; after a restart
the desk itself refuses a nonce spent or in flight (so nothing runs twice), and that refusal of an op the journal
shows accepted (that op: its id and payload sha256, not another op under its id) is reported as the acceptance it
was; a revocation the journal holds a veto of by the same keys, as the revocation it was.

Reports: ``drain`` hands the verdicts not yet sent to whoever sends the node's StateReports (the tick's report
sender takes them when it exists); meanwhile this module sends them itself at once, in a report with seq 0 that
carries only deliveries and ops (the hub records those and leaves the node's report sequence alone).
"""

from __future__ import annotations

import collections
import hashlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from executor.api.fates import fates
from executor.gate.steps import revoked_key
from executor.loop.engine import Engine
from executor.signed.auth import revokers
from executor.signed.desk import REVOKE, OpDesk, RateLimitedError
from executor.v1 import executor_pb2 as epb
from hub.v1 import hub_pb2 as pb
from safety import signedop
from safety.payload import parse_payload
from safety.refusal import Refused

log = structlog.get_logger("executor.hub")
CALLER = "hub"  # the rate bucket deliveries pay from (the local API's callers have their own)
FOLLOW = 0.5  # seconds between looks at the fate of the ops accepted from the hub, while one is unsettled
RATE_RETRY = 1.0  # seconds before a rate-limited delivery is tried again
SEND_RETRY = 5.0  # seconds before a report the hub did not take is sent again (a hub down: one warning per retry)
REMEMBERED = 1024  # decided deliveries remembered (answered again without reaching the desk)
INBOX = 256  # deliveries waiting for the desk; more are dropped (the hub sends them again on the next stream)
OP_WINDOW = 1000  # journal records read for fates (all the journal keeps in memory)
SETTLED = {epb.OP_FATE_RAN: "ran", epb.OP_FATE_REFUSED: "refused", epb.OP_FATE_REVOKED: "revoked"}
FATES = {epb.OP_FATE_WAITING: "waiting", epb.OP_FATE_RUNNING: "running", **SETTLED}
ALREADY = frozenset({"NONCE_SPENT", "NONCE_IN_FLIGHT"})  # a redelivery after a restart: the desk's answer
OP_REVOKED = "OP_REVOKED"  # a revocation redelivered after a restart: the desk finds its veto journaled


@dataclass(frozen=True, slots=True)
class _Taken:
    """A delivery and the stream it came on (the cluster and node its answer names)."""

    delivery: pb.Delivery
    cluster: str
    node: str


class HubDeliveries:
    """The desk's counter for the hub: ``take`` (the Watch thread) queues; a thread submits, answers, follows."""

    def __init__(self, desk: OpDesk, engine: Engine, send: Callable[[pb.StateReport], bool],
                 audience: Callable[[], str]) -> None:
        """``send``: one StateReport to the hub, True when it answered; ``audience``: this node's audience."""
        self._desk, self._engine, self._send, self._audience = desk, engine, send, audience
        self._inbox: queue.Queue[_Taken] = queue.Queue(INBOX)
        self._lock = threading.Lock()
        self._answered: collections.OrderedDict[str, pb.DeliveryResult] = collections.OrderedDict()
        self._results: list[pb.DeliveryResult] = []  # verdicts the hub has not confirmed
        self._followed: dict[str, str] = {}  # op_id -> the fate last reported ("" none yet)
        self._where: tuple[str, str] | None = None  # (cluster, node) of the last stream
        self._retry_at = 0.0  # monotonic: no report before this after one failed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hub-deliveries", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (a delivery not decided yet is sent again by the hub on the next stream)."""
        self._stop.set()
        self._thread.join(timeout)

    def take(self, delivery: pb.Delivery, cluster: str, node: str) -> None:
        """Queue a delivery from the Watch stream (never blocks it)."""
        try:
            self._inbox.put_nowait(_Taken(delivery, cluster, node))
        except queue.Full:
            log.warning("hub_delivery_dropped", delivery_id=delivery.delivery_id,
                        consequence="the hub sends it again on the next stream")

    def drain(self) -> list[pb.DeliveryResult]:
        """The verdicts not yet sent (for the node's StateReport); ``requeue`` them if the report fails."""
        with self._lock:
            results, self._results = self._results, []
        return results

    def requeue(self, results: list[pb.DeliveryResult]) -> None:
        """Verdicts a report could not deliver: sent with the next."""
        with self._lock:
            self._results[:0] = results

    # --- the thread -----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                taken = self._inbox.get(timeout=FOLLOW)
            except queue.Empty:
                taken = None
            try:
                if taken is not None:
                    self._where = (taken.cluster, taken.node)
                    self._decide(taken.delivery)
                self._report()
            except Exception:  # one delivery's trouble never ends the thread: the next could not be taken
                log.exception("hub_delivery_crashed")

    def _decide(self, delivery: pb.Delivery) -> None:
        """Answer a decided delivery again; else wait out recovery and hand the envelope to the desk."""
        with self._lock:
            first = self._answered.get(delivery.delivery_id)
            if first is not None:
                self._results.append(first)
        if first is not None:
            log.info("hub_delivery_repeated", delivery_id=delivery.delivery_id, decision=first.decision,
                     op_id=first.op_id)
            return
        while self._engine.recovering.is_set():  # as the local API answers UNAVAILABLE: no op before recovery ends
            if self._stop.wait(FOLLOW):
                return
        result = self._submit(delivery)
        with self._lock:
            self._answered[delivery.delivery_id] = result
            while len(self._answered) > REMEMBERED:
                self._answered.popitem(last=False)
            self._results.append(result)
            if result.decision == "accepted" and result.op_id:
                self._followed.setdefault(result.op_id, "")
        log.info("hub_delivery_decided", delivery_id=delivery.delivery_id, decision=result.decision,
                 op_id=result.op_id, reason=result.reason)

    def _submit(self, delivery: pb.Delivery) -> pb.DeliveryResult:
        answer = pb.DeliveryResult(delivery_id=delivery.delivery_id)
        try:
            envelope = signedop.parse_envelope_json(delivery.envelope)
        except Refused as exc:
            answer.decision, answer.reason, answer.detail = "refused", exc.reason.value, exc.detail
            return answer
        revoke = _kind(envelope) == REVOKE
        call, done = (self._desk.revoke, "revoked") if revoke else (self._desk.submit, "accepted")
        while True:
            try:
                op_id, refusal = call(envelope, CALLER)
                break
            except RateLimitedError:
                if self._stop.wait(RATE_RETRY):
                    raise
        answer.op_id = op_id or _claimed_id(envelope, revoke)
        if refusal is None:
            answer.decision = done
        elif not revoke and refusal.reason in ALREADY and self._known(answer.op_id, _sha256(envelope)):
            answer.decision, answer.detail = "accepted", f"accepted before (a redelivery): {refusal.detail}"
        elif revoke and refusal.reason == OP_REVOKED and self._vetoed(answer.op_id, envelope):
            answer.decision, answer.detail = "revoked", f"revoked before (a redelivery): {refusal.detail}"
        else:
            answer.decision, answer.reason, answer.detail = "refused", refusal.reason, refusal.detail
        return answer

    def _vetoed(self, op_id: str, envelope: signedop.Envelope) -> bool:
        """The journal holds a veto of ``op_id`` by every key that signed ``envelope`` (revoked before this
        redelivery: the desk refuses it as already revoked, and it stands)."""
        prior = self._engine.gate.records.last_refusal(revoked_key(op_id)) if op_id else None
        keys = {signature.keyid for signature in envelope.signatures}
        return prior is not None and bool(keys) and keys <= set(revokers(prior[1]))

    def _known(self, op_id: str, payload_sha256: str) -> bool:
        """The journal or the desk has this op (its id and payload) waiting, running or ran (accepted before this
        redelivery); another op under its id, which may have run, is not it."""
        return any(status.op_id == op_id and status.payload_sha256 == payload_sha256
                   and status.fate in (epb.OP_FATE_WAITING, epb.OP_FATE_RUNNING, epb.OP_FATE_RAN)
                   for status in self._fates())

    def _fates(self) -> list[epb.OpStatus]:
        records = self._engine.gate.records.recent(OP_WINDOW)
        return fates(records, self._desk.waiting(), self._engine.status().busy)

    # --- the answer to the hub ------------------------------------------------------------------------------------

    def _report(self) -> None:
        """Send the verdicts not sent and the fates of followed ops that changed, in one seq-0 StateReport."""
        where = self._where
        if where is None or time.monotonic() < self._retry_at:
            return
        ops = self._changed_fates()
        results = self.drain()
        if not results and not ops:
            return
        report = pb.StateReport(cluster=where[0], node=where[1], audience=self._audience(), deliveries=results,
                                ops=[op for op, _ in ops], at_unix_ms=int(time.time() * 1000))
        if self._send(report):
            self._retry_at = 0.0
            with self._lock:
                for op, fate in ops:
                    if fate in SETTLED.values():
                        self._followed.pop(op.op_id, None)
                    elif op.op_id in self._followed:
                        self._followed[op.op_id] = fate
            return
        self._retry_at = time.monotonic() + SEND_RETRY
        self.requeue(results)

    def _changed_fates(self) -> list[tuple[pb.OpReport, str]]:
        with self._lock:
            followed = dict(self._followed)
        if not followed:
            return []
        changed = []
        for status in self._fates():
            if status.op_id in followed:
                fate = FATES.get(status.fate, "")
                if fate and fate != followed[status.op_id]:
                    changed.append((_op_report(status, fate), fate))
        return changed


def _kind(envelope: signedop.Envelope) -> str:
    """The payload's kind as it claims ("" when it does not parse: the desk says why)."""
    try:
        return parse_payload(envelope.payload).kind
    except Refused:
        return ""


def _sha256(envelope: signedop.Envelope) -> str:
    """The payload sha256 that tells this op from another under its op id (as the journal and op status key it)."""
    return hashlib.sha256(envelope.payload).hexdigest()


def _claimed_id(envelope: signedop.Envelope, revoke: bool) -> str:
    """The op id the payload names (a revocation: the op it revokes); "" when it does not parse."""
    try:
        payload = parse_payload(envelope.payload)
    except Refused:
        return ""
    return str(payload.params.get("op_id", "")) if revoke else payload.op_id


def _op_report(status: epb.OpStatus, fate: str) -> pb.OpReport:
    """The executor's fate of an op as the hub's OpReport."""
    detail = status.detail
    if status.reason != epb.REFUSAL_REASON_UNSPECIFIED:
        detail = f"{epb.RefusalReason.Name(status.reason).removeprefix('REFUSAL_REASON_')}: {detail}"
    return pb.OpReport(op_id=status.op_id, vmid=status.vmid, op_kind=status.op_kind, fate=fate,
                       outcome=status.outcome, detail=detail, upid=status.upid, at_unix_ms=status.at_unix_ms,
                       signers=list(status.signers))
