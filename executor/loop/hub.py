"""The hub as a desired-state provider: a Watch stream, each document verified here, the last one kept on disk.

The hub is a courier (docs/SAFETY.md §6.9): a document is taken because keys of this executor's own trust
store signed it for this cluster, never because the hub sent it. Each one is verified
(``safety.desireddoc.verify_document``: signature, role with ``desired.apply`` for this audience, threshold,
cluster, the version floor held here), parsed with the desired file's own loader, written to state_dir
(``HeldFiles``) and only then served to the engine, then ACKed; a refused one is NACKed with its reason
and changes nothing. ``desired()`` never waits for the hub: a hub that is down, restarting or never
reached leaves the node on its last verified document (or, with none ever taken, managing nothing).

At start the document on disk is verified again against the trust store in force, with the key expiry
judged at the document's signed ``created`` time: a key that expired since does not void what it signed
while valid (keys are rotated on a schedule; the next version replaces the document), but a key revoked
since, or a role that no longer grants ``desired.apply`` here, does: the node then manages nothing
(loudly, ``pve_executor_hub_held_document_trusted`` 0) and keeps its version floor, until a version the
store trusts arrives. Revocation is the operators' emergency brake; a node that kept applying what a
revoked key signed would ignore it. A document revoked by its sha256 (``[revoked].documents``) is refused and
voided the same way. A floor pushed up by what was revoked is lowered only by the trust store: its
``[[floor_resets]]`` names the cluster's replacement (version, sha256), which a node whose held document no
longer verifies, and whose floor it names (``replaces``), takes as its floor (``hub-held``, durably), and then
takes that document, or a later one, from the hub. Nothing a hub sends lowers a floor.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
import structlog

from common.grpcserver import OWN_SUBCHANNELS, ClientTls, channel_credentials
from executor.loop.desired import Declared, DesiredStateError, parse
from executor.loop.hubheld import HeldFileError, HeldFiles, reset_line
from executor.metrics import ExecutorMetrics
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from safety import desireddoc
from safety.classify import Source
from safety.desireddoc import Held, VerifiedDocument
from safety.refusal import RefusalReason, Refused
from safety.truststore import TrustStore

log = structlog.get_logger("executor.hub")
HUB_CLIENT = ("hub_ca", "hub_client_cert", "hub_client_key")  # the settings a bad TLS file's error names
SILENT_HEARTBEATS = 3  # a stream without an event for this many heartbeat intervals is dead: reconnect


class DeliveryHandler(Protocol):
    """Where signed ops the hub delivers go (``executor.api.deliveries.HubDeliveries``: this node's own gate)."""

    def take(self, delivery: pb.Delivery, cluster: str, node: str) -> None:
        """Queue ``delivery`` (from the stream of ``cluster`` as ``node``); never blocks the stream."""


class TrustSource(Protocol):
    """The trust store in force (the executor's ``TrustKeeper``)."""

    def current(self) -> TrustStore | None:
        """The store, or None when none is configured or it never loaded."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HubSettings:
    """Where the hub is and how to keep a stream to it."""

    target: str  # HOST:PORT or a gRPC target
    cluster: str | None = None  # None: the cluster part of the executor's audience (NODE@CLUSTER)
    tls: ClientTls | None = None
    heartbeat: float = 10.0  # the hub's heartbeat interval
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    report_timeout: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Taken:
    """What the provider serves: the floor, and the guests of that version when its document is trusted."""

    held: Held
    created: int = -1  # the document's signed time; -1: no document read (0 is a time a signer may give)
    guests: tuple[Declared, ...] = ()
    trusted: bool = False  # the held version's document verified here (False: floor only, nothing managed)
    store: TrustStore | None = None  # the store it verified against (untrusted: the store it was last judged by)
    envelope: bytes = b""
    identity: tuple[str, str] = ("", "")  # (cluster, node) it verified for


def backoff(attempt: int, base: float, cap: float, draw: Callable[[float, float], float] = random.uniform) -> float:
    """Full jitter: a delay drawn from [0, min(cap, base * 2**attempt)] (AWS's "full jitter")."""
    return draw(0.0, min(cap, base * 2 ** min(attempt, 30)))


class HubProvider:
    """A ``DesiredProvider`` fed by a Watch thread; ``start`` it, ``close`` it."""

    source = Source.HUB  # remote: the gate's remote rules, blast radius included

    def __init__(self, settings: HubSettings, *, files: HeldFiles, trust: TrustSource, audience: Callable[[], str],
                 metrics: ExecutorMetrics, clock: Callable[[], float] = time.time) -> None:
        """Reads the held files now (HeldFileError when they exist and cannot be read: never a silent version 0)."""
        self.settings, self._files, self._trust, self._audience = settings, files, trust, audience
        self._metrics, self._clock = metrics, clock
        on_disk = files.load()
        self._shown: Held | None = None  # the held version the info metric shows
        self._taken = _Taken(held=on_disk.held, envelope=on_disk.envelope)
        self._loaded = False  # the document on disk verified (or found wanting) against the audience and store
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._call: grpc.Future | None = None
        self._thread: threading.Thread | None = None
        self._pending: pb.ReportRequest | None = None  # the last report the hub has not confirmed
        # Signed ops the hub delivers (the wiring sets it once the op desk exists); None: left for the next stream.
        self.deliveries: DeliveryHandler | None = None
        self._channel = (grpc.secure_channel(settings.target, channel_credentials(settings.tls), options=_OPTIONS)
                         if settings.tls else grpc.insecure_channel(settings.target, options=_OPTIONS))
        self._stub = pb_grpc.HubServiceStub(self._channel)
        metrics.hub_held_version.set_function(lambda: float(self._taken.held.version))
        metrics.hub_held_age.set_function(self._age)
        metrics.hub_held_trusted.set_function(lambda: float(self._taken.trusted or not self._taken.held.version))

    @property
    def _taken(self) -> _Taken:
        return self._state

    @_taken.setter
    def _taken(self, value: _Taken) -> None:
        """Every change of what is held goes through here, so ``pve_executor_hub_held_info`` always shows it."""
        self._state = value
        if value.held != self._shown:
            info = self._metrics.hub_held_info
            info.clear()  # one series: the version held now
            info.labels(str(value.held.version), value.held.sha256).set(1)
            self._shown = value.held

    # --- the provider -------------------------------------------------------------------------------------------

    def desired(self) -> list[Declared]:
        """The guests of the held version (empty until a trusted one is held); never waits for the hub.

        When the trust store in force changed since the held document verified (a reload, SIGHUP), it is
        verified again first, as at a restart: a running node and a restarted one serve the same. A held
        version found wanting is taken from disk again under a store that changed since (one fixed after a start
        without one): the watch thread loads it, so the node need not wait for a new version.
        """
        taken = self._taken
        current = self._trust.current()
        if taken.store is not current:
            if taken.trusted:
                taken = self._recheck(taken)
            elif taken.held.version and self._loaded:
                self._retry(current)
        return list(taken.guests)

    def _retry(self, store: TrustStore | None) -> None:
        """Have the watch thread load the held document again (once per store: ``store`` is recorded)."""
        with self._lock:
            if self._taken.trusted or self._taken.store is store:
                return
            self._taken = dataclasses.replace(self._taken, store=store)
            self._loaded = False
        self._reconnect()

    def _recheck(self, taken: _Taken) -> _Taken:
        """``taken`` against the store in force (its guests kept, not parsed again); untrusted when it fails."""
        try:
            store = self._trust.current()  # read once: the store recorded is the one that verified
            # Against its own (version, sha256): the same document again (a jump is judged when it was taken).
            if self._verify(taken.envelope, *taken.identity, taken.held, store, at_created=True).held != taken.held:
                raise Refused(RefusalReason.FORK, f"the document held is not version {taken.held.version}")
            now = _Taken(held=taken.held, created=taken.created, guests=taken.guests, trusted=True,
                         store=store, envelope=taken.envelope, identity=taken.identity)
        except Refused as exc:
            log.error("hub_held_document_untrusted", version=taken.held.version, sha256=taken.held.sha256,
                      error=str(exc), consequence="managing nothing until the hub sends a version the trust store "
                                                  "trusts; the version floor is kept")
            now = _Taken(held=taken.held, created=taken.created, envelope=taken.envelope, identity=taken.identity,
                         store=store)  # judged under it: not tried again until the store changes
            now = self._floor_reset(now, store) or now
        with self._lock:
            if self._taken is taken:  # the watch thread may have taken a new version meanwhile: that one stands
                self._taken = now
            now = self._taken
        if not now.trusted:
            self._reconnect()  # watch from the version before, so the hub sends this one again (and it is NACKed)
        return now

    def _floor_reset(self, untrusted: _Taken, store: TrustStore | None) -> _Taken | None:
        """The floor ``store`` resets this cluster to, saved and in force, for a held document found untrusted.

        The trust store (root's, versioned, on every node) names the replacement of a floor that a revoked key or
        document pushed up (``[[floor_resets]]``): the node holds its (version, sha256) without a document, and so
        takes that very document, or a later one, from the hub. None when the store names no reset for this
        cluster, it is the floor held already, it is above it (a later version is taken as usual), or it does not
        name this floor among those it replaces (a reset meant for other nodes' floors).
        """
        cluster = untrusted.identity[0]
        reset = store.floor_resets.get(cluster) if store is not None and cluster else None
        held = untrusted.held
        if reset is None or reset.version > held.version or (reset.version, reset.sha256) == (held.version,
                                                                                               held.sha256):
            return None
        if held.sha256 not in reset.replaces:  # meant for other nodes' floors: lowering this one would roll it back
            log.warning("hub_floor_reset_not_for_this_floor", cluster=cluster, version=reset.version,
                        sha256=reset.sha256, held_version=held.version, held_sha256=held.sha256,
                        consequence="the floor is kept; to lower it, list its sha256 in the reset's replaces")
            return None
        try:
            passed = reset_line(cluster, reset.version, reset.sha256) in self._files.passed()
        except HeldFileError as exc:
            log.error("hub_floor_reset_unreadable", error=str(exc), consequence="the floor is kept")
            return None
        if passed:  # left in the store from an earlier incident: a version above it was taken here since
            log.warning("hub_floor_reset_ignored", cluster=cluster, version=reset.version, sha256=reset.sha256,
                        held_version=held.version, consequence="a version above it was taken here since; the floor "
                                                               "is kept (name a new reset to lower it)")
            return None
        floor = Held(version=reset.version, sha256=reset.sha256)
        try:
            self._files.reset(floor)
        except OSError as exc:
            log.error("hub_floor_reset_not_saved", version=floor.version, path=str(self._files.state_dir),
                      error=exc.strerror or str(exc), consequence="the floor is kept; tried again at the next start "
                                                                  "or trust store reload")
            return None
        log.warning("hub_floor_reset", cluster=cluster, from_version=held.version, from_sha256=held.sha256,
                    version=floor.version, sha256=floor.sha256, trust_store_version=store.version if store else 0,
                    consequence="managing nothing until the hub sends this version (or a later one)")
        return _Taken(held=floor, store=store, identity=untrusted.identity)

    def _reconnect(self) -> None:
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    @property
    def held(self) -> Held:
        """The version floor held here."""
        return self._taken.held

    def _age(self) -> float:
        taken = self._taken
        return max(0.0, self._clock() - taken.created) if taken.created >= 0 else 0.0

    # --- the thread ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Take the document on disk now when this node's identity is known (so the first tick has it), then
        start watching (a daemon thread, which takes it later otherwise)."""
        identity = self._identity()
        if identity is not None:
            self._load(*identity)
        self._thread = threading.Thread(target=self._run, name="hub-watch", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop watching, end the stream, close the channel."""
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
        self._channel.close()

    @property
    def channel(self) -> grpc.Channel:
        """The channel to the hub (its TLS and client certificate): the state reporter calls over it too."""
        return self._channel

    def identity(self) -> tuple[str, str] | None:
        """(cluster, node) this executor watches and reports as; None while its audience is unknown."""
        return self._identity()

    def _identity(self) -> tuple[str, str] | None:
        """(cluster, node): the hub's cluster and this executor's audience; None while the audience is unknown."""
        audience = self._audience()
        node, _, cluster = audience.partition("@")
        cluster = self.settings.cluster or cluster
        known = node and cluster and not audience.endswith("@")  # NODE@ while Proxmox has not said its cluster
        return (cluster, audience) if known else None

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            identity = self._identity()
            if identity is None:
                log.warning("hub_identity_unknown", audience=self._audience(),
                            consequence="not watching until this node's cluster is known (set executor_id "
                                        "or hub_cluster)")
                attempt += 1
            else:
                try:
                    if not self._loaded:
                        self._load(*identity)
                    attempt = 0 if self._watch(*identity) else attempt + 1
                except Exception:  # a bug here must not end the thread: the node would never hear of a new version
                    log.exception("hub_watch_crashed")
                    attempt += 1
            self._stop.wait(backoff(attempt, self.settings.backoff_base, self.settings.backoff_cap))

    def _load(self, cluster: str, node: str) -> None:
        """Verify the document on disk again, against the store in force (see the module's docstring)."""
        held, envelope = self._taken.held, self._taken.envelope
        self._loaded = True
        if not held.version:
            log.info("hub_nothing_held", consequence="managing nothing until the hub sends a version")
            return
        store = self._trust.current()
        try:
            verified = self._verify(envelope, cluster, node, held, store, at_created=True)  # as in _recheck
            if verified.held != held:
                raise Refused(RefusalReason.FORK, f"the document on disk is not version {held.version}")
            self._install(verified, parse(verified.document.desired, f"hub:{cluster}@{verified.document.version}"),
                          envelope, (cluster, node), store)
            log.info("hub_held_document_loaded", version=held.version, sha256=held.sha256,
                     guests=len(self._taken.guests))
            # The ACK may have been lost with the last run (killed between saving and reporting): say it again.
            self._pending = pb.ReportRequest(cluster=cluster, node=node, version=held.version, ok=True)
        except (Refused, DesiredStateError) as exc:
            log.error("hub_held_document_untrusted", version=held.version, sha256=held.sha256, error=str(exc),
                      consequence="managing nothing until the hub sends a version the trust store trusts; "
                                  "the version floor is kept")
            with self._lock:
                if not self._taken.trusted and self._taken.held == held:  # judged under it: desired() retries
                    self._taken = dataclasses.replace(self._taken, store=store)  # when the store changes
                    reset = self._floor_reset(dataclasses.replace(self._taken, identity=(cluster, node)), store)
                    self._taken = reset or self._taken

    def _since(self) -> int:
        """The version to watch from: the one held, or the one before when its document is not trusted here."""
        taken = self._taken
        return taken.held.version if taken.trusted or not taken.held.version else taken.held.version - 1

    def _watch(self, cluster: str, node: str) -> bool:
        """One Watch stream until it ends; True when it carried at least one event (the hub was reached)."""
        since = self._since()
        # node is this executor's audience (``_identity``): said so, the hub routes envelopes naming it here.
        call = self._stub.Watch(pb.WatchRequest(cluster=cluster, node=node, since_version=since, audience=node))
        with self._lock:
            self._call = call
        if self._stop.is_set():
            call.cancel()
        last, done, reached, told = [time.monotonic()], threading.Event(), False, False
        watchdog = threading.Thread(target=self._watchdog, args=(call, last, done), name="hub-watchdog", daemon=True)
        watchdog.start()
        code, detail = "ended", ""
        try:
            for event in call:
                last[0] = time.monotonic()
                if not reached:
                    reached = True
                    self._metrics.hub_connected.set(1)
                    log.info("hub_connected", hub=self.settings.target, cluster=cluster, since_version=since)
                    self._resend(cluster, node)
                if event.HasField("delivery"):
                    self._deliver(event.delivery, cluster, node)
                elif event.HasField("document") and not self._take(event.document, cluster, node):
                    code, reached = "not_saved", False  # try again after a backoff: the hub sends it again
                    break
                if event.HasField("heartbeat") and not told:
                    told = self._tell_held(cluster, node, event.heartbeat.latest_version)
        except grpc.RpcError as exc:
            code, detail = _code(exc), str(exc.details() or "")[:200]
        finally:
            done.set()
            call.cancel()  # a stream left by a break or a bug must not stay open at the hub
            with self._lock:
                self._call = None
            self._metrics.hub_connected.set(0)
        if not self._stop.is_set():
            log.warning("hub_disconnected" if reached else "hub_unreachable", hub=self.settings.target, code=code,
                        detail=detail, held_version=self._taken.held.version)
        return reached

    def _tell_held(self, cluster: str, node: str, latest: int) -> bool:
        """A hub whose latest version is below the one held here (a restored database, another hub) keeps the node's
        version (docs/HUB.md) but may not know it: ACK it again, once per stream, so its Status shows it. True when
        told (or nothing to tell)."""
        taken = self._taken
        if latest >= taken.held.version:
            return True
        if not taken.trusted or self._pending is not None:  # a report not yet confirmed goes first (next stream)
            return False
        log.warning("hub_behind_node", held_version=taken.held.version, hub_latest=latest,
                    consequence="the version held is kept and ACKed again; newer versions are still taken")
        self._report(cluster, node, taken.held.version, None)
        return True

    def _watchdog(self, call: grpc.Future, last: list[float], done: threading.Event) -> None:
        """Cancel a stream silent for SILENT_HEARTBEATS heartbeat intervals (a hub that hangs, a dead path)."""
        limit = SILENT_HEARTBEATS * self.settings.heartbeat
        while not done.wait(min(limit / 4, 1.0)):
            if time.monotonic() - last[0] > limit:
                log.warning("hub_silent", seconds=round(limit, 1), consequence="reconnecting")
                call.cancel()
                return

    # --- one document -------------------------------------------------------------------------------------------

    def _verify(self, envelope: bytes, cluster: str, node: str, held: Held, store: TrustStore | None, *,
                at_created: bool = False) -> VerifiedDocument:
        if store is None:
            raise Refused(RefusalReason.TRUST_STORE_INVALID, "no trust store in force here (trust_store): "
                                                             "no document can be verified")
        now = self._clock()
        if at_created:  # a document already taken: a key's expiry is judged when it signed (module docstring)
            now = desireddoc.parse_payload(desireddoc.parse_envelope(envelope).payload).created
        return desireddoc.verify_document(envelope, store, cluster=cluster, audience=node, held_version=held.version,
                                          held_sha256=held.sha256, now=now)

    def _take(self, document: pb.Document, cluster: str, node: str) -> bool:
        """Verify, parse, persist, swap, ACK; or NACK with the reason and keep what is held. False when the
        document could not be saved (nothing applied, nothing reported: the next stream brings it again)."""
        taken = self._taken
        try:
            store = self._trust.current()  # read once: a reload after this is seen by desired()'s re-check
            verified = self._verify(document.envelope, cluster, node, taken.held, store)
            if verified.unchanged and taken.trusted:
                self._report(cluster, node, verified.document.version, None)
                return True
            name = f"hub:{cluster}@{verified.document.version}"
            try:
                guests = parse(verified.document.desired, name)
            except DesiredStateError as exc:
                raise Refused(RefusalReason.MALFORMED, str(exc)) from exc
        except Refused as exc:
            log.warning("hub_document_refused", version=document.version, reason=exc.reason.value,
                        detail=exc.detail, held_version=taken.held.version)
            self._report(cluster, node, document.version, exc)
            return True
        try:
            self._pass_reset(store, cluster, verified.held)
            self._files.save(document.envelope, verified.held)  # on disk before it is served: a restart keeps it
        except OSError as exc:
            log.error("hub_document_not_saved", version=verified.document.version, path=str(self._files.state_dir),
                      error=exc.strerror or str(exc), consequence="not applied; taken again from the next stream")
            return False
        self._install(verified, guests, document.envelope, (cluster, node), store)
        log.info("hub_document_applied", version=verified.document.version, sha256=verified.sha256,
                 author=verified.document.author, message=verified.document.message, guests=len(guests),
                 signers=list(verified.signers))
        self._report(cluster, node, verified.document.version, None)
        return True

    def _pass_reset(self, store: TrustStore | None, cluster: str, held: Held) -> None:
        """Record the store's floor reset of ``cluster`` passed when ``held`` (about to be saved) is above it.

        Before the save: a crash between the two leaves the reset passed and the old version held (fail-closed).
        """
        reset = store.floor_resets.get(cluster) if store is not None else None
        if reset is None or held.version <= reset.version:
            return
        line = reset_line(cluster, reset.version, reset.sha256)
        try:
            passed = self._files.passed()
        except HeldFileError as exc:  # not saved (the next stream brings it again), as a failed write
            raise OSError(str(exc)) from exc
        if line not in passed:
            self._files.mark_passed(line)
            log.info("hub_floor_reset_passed", cluster=cluster, version=reset.version, sha256=reset.sha256,
                     held_version=held.version, consequence="this reset never lowers this node's floor again")

    def _install(self, verified: VerifiedDocument, guests: list[Declared], envelope: bytes,
                 identity: tuple[str, str], store: TrustStore | None) -> None:
        """Serve ``verified``, recording the store it verified against (never the one in force by now)."""
        with self._lock:
            self._taken = _Taken(held=verified.held, created=verified.document.created, guests=tuple(guests),
                                 trusted=True, store=store, envelope=envelope, identity=identity)

    # --- deliveries ---------------------------------------------------------------------------------------------

    def _deliver(self, delivery: pb.Delivery, cluster: str, node: str) -> None:
        handler = self.deliveries
        if handler is None:
            log.warning("hub_delivery_ignored", delivery_id=delivery.delivery_id,
                        consequence="signed operations are not set up here; the hub keeps it for the next stream")
            return
        handler.take(delivery, cluster, node)

    def report_state(self, report: pb.StateReport) -> bool:
        """Send one StateReport; True when the hub took it (False: logged, the caller keeps what it carried)."""
        try:
            self._stub.ReportState(report, timeout=self.settings.report_timeout)
        except grpc.RpcError as exc:
            log.warning("hub_state_report_failed", code=_code(exc), deliveries=len(report.deliveries),
                        consequence="sent again with the next")
            return False
        return True

    # --- reports ------------------------------------------------------------------------------------------------

    def _report(self, cluster: str, node: str, version: int, refused: Refused | None) -> None:
        """ACK (``refused`` None) or NACK; counted; one the hub did not confirm is sent again on the next stream."""
        verdict, reason = ("ack", "") if refused is None else ("nack", refused.reason.value)
        self._metrics.hub_reports.labels(verdict, reason or "none").inc()
        self._pending = pb.ReportRequest(cluster=cluster, node=node, version=version, ok=refused is None,
                                         reason=reason, detail=refused.detail[:2000] if refused else "")
        self._resend(cluster, node)

    def _resend(self, cluster: str, node: str) -> None:
        request = self._pending
        if request is None or (request.cluster, request.node) != (cluster, node):
            return
        try:
            self._stub.Report(request, timeout=self.settings.report_timeout)
        except grpc.RpcError as exc:
            log.warning("hub_report_failed", version=request.version, ok=request.ok, code=_code(exc),
                        consequence="sent again on the next stream")
            return
        self._pending = None


def _code(exc: grpc.RpcError) -> str:
    """The status code's name of a failed call."""
    return str((exc.code() or grpc.StatusCode.UNKNOWN).name)


_OPTIONS = [("grpc.max_receive_message_length", desireddoc.MAX_ENVELOPE + (1 << 20)), OWN_SUBCHANNELS]
