"""The executor's hub provider: a real gRPC Watch on loopback, real keys and trust stores, real files in state_dir.

The hub here is a test-local ``HubService`` servicer on hub.v1's generated code (the hub's own code is
another part): it pushes documents, drops streams, falls silent, holds reports back, and records every Watch
(with its ``since_version``) and every Report. The executor's side is the provider the daemon builds,
verifying each document against its own trust store (docs/SAFETY.md §6.9).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.config import ConfigError
from common.grpcserver import ClientTls, ServerTls, server_credentials
from executor.app.wiring import hub_provider
from executor.config import ExecutorSettings
from executor.loop.engine import Engine, TickOutcome
from executor.loop.hub import HUB_CLIENT, HubProvider, HubSettings, backoff
from executor.loop.hubheld import HELD_FILE, HeldFileError, HeldFiles
from executor.metrics import ExecutorMetrics
from executor.signed.trust import TrustKeeper
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from planner import server
from safety import desireddoc
from safety.classify import Source
from safety.desireddoc import Held
from safety.signedop import Envelope
from tests.certs import Pki
from tests.executor_helpers import ROOT, LineReader, cli, unused_port
from tests.pve_memory import MemoryPve
from tests.signing import default_roles, key_entry, private, write_store

CLUSTER = "cluster-a"
AUDIENCE = "pve1@cluster-a"
WRITES = ("POST", "PUT", "DELETE")
DESIRED = "guests:\n  - vmid: 100\n    state: running\n    config:\n      memory: '4096'\n"
Make = Callable[..., Engine]


def store_doc(audience: str = AUDIENCE) -> dict[str, Any]:
    """publisher (desired.apply for ``audience``, threshold 1) held by alice; carol holds operator (ops only)."""
    return {"version": 1,
            "roles": [*default_roles(),
                      {"name": "publisher", "kinds": ["desired.apply"], "classes": ["APPROVAL"], "max_ttl": "1h",
                       "audiences": [audience], "threshold": 1}],
            "keys": [key_entry("alice", ["publisher", "operator"]), key_entry("carol", ["operator"])]}


def document(version: int, previous: str = "", *, desired: str = DESIRED, signers: tuple[str, ...] = ("alice",),
             cluster: str = CLUSTER, role: str = "publisher") -> bytes:
    """The envelope bytes of a document, as `desired sign` writes them and a hub sends them."""
    data = desireddoc.build_payload(cluster=cluster, version=version, role=role, author="alice@example.org",
                                    message=f"version {version}", created=int(time.time()) - 60,
                                    previous_sha256=previous, desired=desired)
    return desireddoc.to_bytes(desireddoc.seal(data, *(private(name) for name in signers)))


def sha(envelope: bytes) -> str:
    """The sha256 the next version names (of the signed payload)."""
    return desireddoc.payload_sha256(desireddoc.parse_envelope(envelope))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` until true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@dataclass
class TestHub(pb_grpc.HubServiceServicer):
    """A hub stand-in: each stream gets the latest document newer than its since_version, then every document
    pushed, with heartbeats between (unless ``silent``); ``drop`` ends the open streams; ``refuse`` aborts the
    next Watch calls UNAVAILABLE; ``hold`` keeps Report from answering (the node never hears its ACK landed)."""

    heartbeat: float = 0.1
    docs: list[pb.Document] = field(default_factory=list)
    watches: list[tuple[float, pb.WatchRequest]] = field(default_factory=list)
    arrived: list[pb.ReportRequest] = field(default_factory=list)  # every Report that reached the hub
    reports: list[pb.ReportRequest] = field(default_factory=list)  # the ones it answered
    silent: bool = False
    refuse: int = 0
    hold: threading.Event | None = None
    generation: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    __test__ = False  # not a test class

    def push(self, envelope: bytes) -> None:
        """Send ``envelope`` (whatever it claims) to every watcher."""
        version = int(json.loads(desireddoc.parse_envelope(envelope).payload)["version"])
        with self.cond:
            self.docs.append(pb.Document(cluster=CLUSTER, version=version, envelope=envelope,
                                         payload_sha256=sha(envelope)))
            self.cond.notify_all()

    def drop(self) -> None:
        """End every open stream (as a hub restart does)."""
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchEvent]:
        """The stream of the class docstring."""
        with self.cond:
            self.watches.append((time.monotonic(), request))
            self.cond.notify_all()
            if self.refuse:
                self.refuse -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "the hub is starting")
            generation, sent = self.generation, len(self.docs)
            latest = self.docs[-1] if self.docs else None
        if latest is not None and latest.version > request.since_version:
            yield pb.WatchEvent(document=latest)
        elif not self.silent:
            yield pb.WatchEvent(heartbeat=pb.Heartbeat(latest_version=latest.version if latest else 0))
        while context.is_active():
            with self.cond:
                self.cond.wait_for(self._news(sent, generation), self.heartbeat)
                if self.generation != generation:
                    return
                new, sent, silent = self.docs[sent:], len(self.docs), self.silent
            for doc in new:
                yield pb.WatchEvent(document=doc)
            if not new and not silent:
                yield pb.WatchEvent(heartbeat=pb.Heartbeat(latest_version=self.docs[-1].version if self.docs else 0))

    def _news(self, sent: int, generation: int) -> Callable[[], bool]:
        return lambda: len(self.docs) > sent or self.generation != generation

    def Report(self, request: pb.ReportRequest, context: grpc.ServicerContext) -> pb.ReportResponse:
        """Record the report (held back while ``hold`` is not set)."""
        with self.cond:
            self.arrived.append(request)
            self.cond.notify_all()
        hold = self.hold
        if hold is not None and not hold.wait(30):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "held")
        if not context.is_active():  # the node is gone: it never hears this answer
            return pb.ReportResponse()
        with self.cond:
            self.reports.append(request)
        return pb.ReportResponse(node=pb.NodeStatus(node=request.node, held_version=request.version))

    def Apply(self, request: pb.ApplyRequest, context: grpc.ServicerContext) -> pb.ApplyResponse:
        """Not this stand-in's part."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a stand-in: documents are pushed")
        return pb.ApplyResponse()

    def GetDocument(self, request: pb.GetDocumentRequest, context: grpc.ServicerContext) -> pb.GetDocumentResponse:
        """Not this stand-in's part."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a stand-in")
        return pb.GetDocumentResponse()

    def History(self, request: pb.HistoryRequest, context: grpc.ServicerContext) -> pb.HistoryResponse:
        """Not this stand-in's part."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a stand-in")
        return pb.HistoryResponse()

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        """Not this stand-in's part."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a stand-in")
        return pb.StatusResponse()

    def ReportState(self, request: pb.StateReport, context: grpc.ServicerContext) -> pb.StateReportResponse:
        """Not this stand-in's part (a node keeps working when its hub does not take reports)."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a stand-in")
        return pb.StateReportResponse()

    def GetNode(self, request: pb.GetNodeRequest, context: grpc.ServicerContext) -> pb.GetNodeResponse:
        """Not this stand-in's part."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a stand-in")
        return pb.GetNodeResponse()

    def ListPending(self, request: pb.ListPendingRequest,
                    context: grpc.ServicerContext) -> pb.ListPendingResponse:
        """Not this stand-in's part."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a stand-in")
        return pb.ListPendingResponse()

    def SubmitOp(self, request: pb.SubmitOpRequest, context: grpc.ServicerContext) -> pb.SubmitOpResponse:
        """Not this stand-in's part."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a stand-in")
        return pb.SubmitOpResponse()

    def GetOpStatus(self, request: pb.GetOpStatusRequest,
                    context: grpc.ServicerContext) -> pb.GetOpStatusResponse:
        """Not this stand-in's part."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a stand-in")
        return pb.GetOpStatusResponse()

    def since(self) -> list[int]:
        """The since_version of every Watch, in order."""
        return [request.since_version for _, request in self.watches]


@dataclass
class Served:
    """A TestHub on a loopback port; ``stop`` ends it (a hub that went away)."""

    hub: TestHub
    port: int
    server: grpc.Server

    def stop(self) -> None:
        """Stop serving at once."""
        self.server.stop(0).wait()


def serve(hub: TestHub, port: int = 0, tls: ServerTls | None = None) -> Served:
    """``hub`` on 127.0.0.1 (a free port unless given; TLS with ``tls``)."""
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_HubServiceServicer_to_server(hub, grpc_server)
    address = f"127.0.0.1:{port}"
    bound = (grpc_server.add_secure_port(address, server_credentials(tls)) if tls
             else grpc_server.add_insecure_port(address))
    grpc_server.start()
    return Served(hub, bound, grpc_server)


@pytest.fixture(name="served")
def _served() -> Iterator[Served]:
    running = serve(TestHub())
    yield running
    running.stop()


@pytest.fixture(name="trust")
def _trust(tmp_path: Path) -> TrustKeeper:
    """The executor's trust keeper over a real store file (alice: publisher)."""
    state = tmp_path / "state"
    state.mkdir()
    return TrustKeeper(str(write_store(tmp_path, store_doc())), str(state))


def make_provider(made: list[HubProvider], port: int, trust: TrustKeeper, state: Path, *,
                  metrics: ExecutorMetrics | None = None, base: float = 0.05) -> HubProvider:
    """A started provider towards 127.0.0.1:``port`` keeping its files in ``state``: it expects a heartbeat every
    0.2 s (the stand-in sends one every 0.1 s, so a busy machine does not make a stream look dead), quick backoff."""
    provider = HubProvider(HubSettings(target=f"127.0.0.1:{port}", heartbeat=0.2, backoff_base=base, backoff_cap=0.8),
                           files=HeldFiles(state), trust=trust, audience=lambda: AUDIENCE,
                           metrics=metrics or ExecutorMetrics())
    made.append(provider)
    provider.start()
    return provider


def reports(hub: TestHub) -> list[tuple[int, bool, str]]:
    """(version, ok, reason) of every report the hub answered."""
    return [(r.version, r.ok, r.reason) for r in hub.reports]


def metric(metrics: ExecutorMetrics, name: str, **labels: str) -> float:
    """A sample's value (0 when absent)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def writes(pve: Any) -> list[tuple[str, str]]:
    """The mutating requests Proxmox received."""
    return [(m, p) for m, p, _ in pve.requests if m in WRITES and not p.endswith("/access/ticket")]


# --- convergence ---------------------------------------------------------------------------------------------


def test_a_signed_document_converges_a_guest_through_the_engine(
        served: Served, trust: TrustKeeper, tmp_path: Path, pve: MemoryPve, make_memory_engine: Make,
        providers: list[HubProvider]) -> None:
    """Version 1 from the hub is verified, written to state_dir, served as a remote source and ACKed; the
    daemon's engine then starts the guest and writes its memory, once. Version 2 replaces it, as a remote
    source: its stop of the node's only managed guest is refused by the blast radius rule."""
    vm = pve.add_vm(100, "web", status="stopped", config={"memory": 2048})
    metrics = ExecutorMetrics()
    provider = make_provider(providers, served.port, trust, tmp_path / "state", metrics=metrics)
    engine = make_memory_engine([], provider=provider)
    assert engine.tick(wait=True).queued == 0  # nothing held yet: nothing managed
    v1 = document(1)
    served.hub.push(v1)
    wait_for(lambda: reports(served.hub) == [(1, True, "")], "the ACK of version 1")
    assert provider.source is Source.HUB and provider.held == Held(version=1, sha256=sha(v1))
    assert (tmp_path / "state" / HELD_FILE).read_text() == f"1 {sha(v1)}\n"
    assert (tmp_path / "state" / "hub-document.1").read_bytes() == v1
    summary = engine.tick(wait=True)
    assert (summary.outcome, summary.failed) == (TickOutcome.OK, 0)
    assert (vm.status, str(vm.config["memory"])) == ("running", "4096")
    before = len(writes(pve))
    assert engine.tick(wait=True).queued == 0 and len(writes(pve)) == before
    v2 = document(2, sha(v1), desired=DESIRED.replace("running", "stopped"))
    served.hub.push(v2)
    wait_for(lambda: reports(served.hub)[-1:] == [(2, True, "")], "the ACK of version 2")
    summary = engine.tick(wait=True)
    assert (summary.refused, summary.pending, vm.status) == (1, 1, "running")  # blast_radius: APPROVAL_REQUIRED
    assert not (tmp_path / "state" / "hub-document.1").exists()
    assert metric(metrics, "pve_executor_hub_held_version") == 2
    assert 30 < metric(metrics, "pve_executor_hub_held_age_seconds") < 600  # signed a minute ago
    assert metric(metrics, "pve_executor_hub_connected") == 1
    assert metric(metrics, "pve_executor_hub_reports_total", verdict="ack", reason="none") == 2


# --- forgeries -----------------------------------------------------------------------------------------------


def test_forged_documents_are_nacked_with_their_reason_and_change_nothing(
        served: Served, trust: TrustKeeper, tmp_path: Path, providers: list[HubProvider]) -> None:
    """An unknown key, a signature over other bytes, a version lower than held, another cluster, a role without
    desired.apply, a desired text the loader refuses: each NACKed with its reason; the held version, the
    declared guests and the files on disk are as before."""
    metrics = ExecutorMetrics()
    provider = make_provider(providers, served.port, trust, tmp_path / "state", metrics=metrics)
    v1 = document(1)
    v2 = document(2, sha(v1))
    served.hub.push(v1)
    wait_for(lambda: len(served.hub.reports) == 1, "the ACK of v1")  # a hub sends a new watcher the latest only
    served.hub.push(v2)
    wait_for(lambda: len(served.hub.reports) == 2, "two ACKs")
    held, declared = provider.held, provider.desired()
    on_disk = {p.name: p.read_bytes() for p in (tmp_path / "state").iterdir() if p.name.startswith("hub-")}
    other = desireddoc.parse_envelope(document(3, sha(v2), desired=DESIRED.replace("4096", "8192")))
    spliced = Envelope(payload_type=desireddoc.PAYLOAD_TYPE, signatures=other.signatures,
                       payload=desireddoc.parse_envelope(document(3, sha(v2))).payload)  # alice's, over other bytes
    forged = {
        "UNKNOWN_KEY": document(3, sha(v2), signers=("mallory",)),
        "SIGNATURE_INVALID": desireddoc.to_bytes(spliced),
        "ROLLBACK": v1,
        "WRONG_AUDIENCE": document(3, sha(v2), cluster="cluster-b"),
        "ROLE_DENIES": document(3, sha(v2), signers=("carol",), role="operator"),
        "MALFORMED": document(3, sha(v2), desired="guests:\n  - vmid: 100\n    sate: running\n"),
    }
    for count, (reason, envelope) in enumerate(forged.items(), start=3):
        served.hub.push(envelope)
        wait_for(lambda: len(served.hub.reports) == count, f"the NACK {reason}")  # noqa: B023 - waited for here
        report = served.hub.reports[-1]
        assert (report.ok, report.reason) == (False, reason), report
    malformed = served.hub.reports[-1].detail
    assert "hub:cluster-a@3:3: sate: unknown key" in malformed, malformed  # the loader's own message
    assert provider.held == held and provider.desired() == declared
    assert on_disk == {p.name: p.read_bytes() for p in (tmp_path / "state").iterdir() if p.name.startswith("hub-")}
    for reason in forged:
        assert metric(metrics, "pve_executor_hub_reports_total", verdict="nack", reason=reason) == 1
    served.hub.push(v2)  # the version held, sent again: ACKed again, nothing new
    wait_for(lambda: reports(served.hub)[-1] == (2, True, ""), "the ACK of v2 again")
    assert provider.held == held


# --- the stream ----------------------------------------------------------------------------------------------


def test_a_dropped_stream_reconnects_with_backoff_and_resumes_from_its_version(
        served: Served, trust: TrustKeeper, tmp_path: Path, providers: list[HubProvider]) -> None:
    """A hub that ends the stream, then refuses four Watch calls: the node tries again after full-jitter delays
    that grow (each at most base * 2**attempt), and every Watch asks for what is newer than version 1."""
    provider = make_provider(providers, served.port, trust, tmp_path / "state", base=0.1)
    v1 = document(1)
    served.hub.push(v1)
    wait_for(lambda: len(served.hub.reports) == 1, "the ACK")
    served.hub.refuse = 4
    served.hub.drop()
    wait_for(lambda: len(served.hub.watches) >= 6, "four refused Watch calls and a fifth that stays", timeout=15)
    assert served.hub.since()[:6] == [0, 1, 1, 1, 1, 1]
    times = [at for at, _ in served.hub.watches[1:6]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for attempt, gap in enumerate(gaps, start=1):  # the first reconnect (after a stream that worked) is attempt 0
        assert gap <= 0.1 * 2 ** attempt + 0.5, (attempt, gaps)
    assert provider.held.version == 1 and len(served.hub.reports) == 1
    v2 = document(2, sha(v1))
    served.hub.push(v2)
    wait_for(lambda: reports(served.hub)[-1] == (2, True, ""), "version 2 on the resumed stream")


def test_backoff_is_full_jitter_capped() -> None:
    """The delay's upper bound doubles per attempt up to the cap; the draw is from zero to it."""
    top = [backoff(n, 0.5, 30.0, draw=lambda low, high: high) for n in range(10)]
    assert top == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert {backoff(n, 0.5, 30.0, draw=lambda low, high: low) for n in range(10)} == {0.0}
    assert backoff(10_000, 0.5, 30.0, draw=lambda low, high: high) == 30.0


def test_a_silent_hub_is_left_after_three_heartbeats(
        served: Served, trust: TrustKeeper, tmp_path: Path, providers: list[HubProvider]) -> None:
    """A stream that carries nothing (a hung hub, a dead path) is cancelled after 3 heartbeat intervals (0.6 s)
    and opened again; while the hub talks, heartbeats keep one stream."""
    make_provider(providers, served.port, trust, tmp_path / "state")
    wait_for(lambda: len(served.hub.watches) == 1, "the first Watch")
    time.sleep(1.0)  # 10 heartbeats: one stream throughout
    assert len(served.hub.watches) == 1
    served.hub.silent = True
    served.hub.drop()
    wait_for(lambda: len(served.hub.watches) >= 2, "the second Watch")
    started = served.hub.watches[-1][0]
    wait_for(lambda: len(served.hub.watches) >= 3, "the reconnect after silence", timeout=5)
    assert served.hub.watches[2][0] - started >= 0.6  # 3 x 0.2 s of silence first


def test_no_watch_until_the_nodes_cluster_is_known(served: Served, trust: TrustKeeper, tmp_path: Path,
                                                   providers: list[HubProvider]) -> None:
    """While Proxmox has not said the cluster (the audience reads NODE@), nothing is watched; then the Watch
    names the cluster and the node's audience."""
    audience = ["pve1@"]
    provider = HubProvider(HubSettings(target=f"127.0.0.1:{served.port}", heartbeat=0.2, backoff_base=0.05,
                                       backoff_cap=0.2),
                           files=HeldFiles(tmp_path / "state"), trust=trust, audience=lambda: audience[0],
                           metrics=ExecutorMetrics())
    providers.append(provider)
    provider.start()
    time.sleep(0.5)
    assert served.hub.watches == []
    audience[0] = AUDIENCE
    wait_for(lambda: len(served.hub.watches) == 1, "the Watch")
    request = served.hub.watches[0][1]
    assert (request.cluster, request.node, request.since_version) == (CLUSTER, AUDIENCE, 0)


def test_mutual_tls_towards_the_hub(pki: Pki, trust: TrustKeeper, tmp_path: Path,
                                    providers: list[HubProvider]) -> None:
    """A hub that requires a client certificate of its CA: the node's certificate gets the stream and version 1;
    a certificate of another CA never reaches the servicer."""
    running = serve(TestHub(), tls=ServerTls(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca))
    try:
        running.hub.push(document(1))

        def node(cert: str, key: str, state: str) -> HubProvider:
            tls = ClientTls(ca=pki.ca, cert=cert, key=key, names=HUB_CLIENT)
            made = HubProvider(HubSettings(target=f"127.0.0.1:{running.port}", tls=tls, heartbeat=0.2,
                                           backoff_base=0.05, backoff_cap=0.2),
                               files=HeldFiles(tmp_path / state), trust=trust, audience=lambda: AUDIENCE,
                               metrics=ExecutorMetrics())
            providers.append(made)
            (tmp_path / state).mkdir(exist_ok=True)
            made.start()
            return made

        rogue = node(pki.rogue_cert, pki.rogue_key, "rogue")
        good = node(pki.client_cert, pki.client_key, "state")
        wait_for(lambda: reports(running.hub) == [(1, True, "")], "the ACK over mutual TLS")
        assert good.held.version == 1 and rogue.held.version == 0 and len(running.hub.watches) == 1
    finally:
        running.stop()


# --- restarts --------------------------------------------------------------------------------------------------


def test_a_restart_with_the_hub_down_keeps_converging_on_the_document_on_disk(
        served: Served, trust: TrustKeeper, tmp_path: Path, pve: MemoryPve, make_memory_engine: Make,
        providers: list[HubProvider]) -> None:
    """Version 1 taken, the executor and the hub both gone; a new executor over the same state_dir, with no hub
    to reach, serves version 1 at once (verified again against the trust store) and corrects a drift."""
    vm = pve.add_vm(100, "web", status="stopped", config={"memory": 2048})
    first = make_provider(providers, served.port, trust, tmp_path / "state")
    served.hub.push(document(1))
    wait_for(lambda: len(served.hub.reports) == 1, "the ACK")
    first.close()
    served.stop()
    metrics = ExecutorMetrics()
    again = make_provider(providers, unused_port(), trust, tmp_path / "state", metrics=metrics)
    engine = make_memory_engine([], provider=again)
    engine.tick(wait=True)
    assert (vm.status, str(vm.config["memory"])) == ("running", "4096")
    vm.status = "stopped"  # someone stopped it while the hub is down
    engine.tick(wait=True)
    assert vm.status == "running"
    assert metric(metrics, "pve_executor_hub_held_version") == 1
    assert metric(metrics, "pve_executor_hub_connected") == 0
    assert metric(metrics, "pve_executor_hub_held_document_trusted") == 1


def test_nothing_on_disk_and_no_hub_manages_nothing(trust: TrustKeeper, tmp_path: Path, pve: MemoryPve,
                                                    make_memory_engine: Make, providers: list[HubProvider]) -> None:
    """A first start with the hub unreachable: nothing declared, no Proxmox request at all."""
    pve.add_vm(100, "web", status="stopped")
    provider = make_provider(providers, unused_port(), trust, tmp_path / "state")
    before = len(pve.requests)
    assert make_memory_engine([], provider=provider).tick(wait=True).queued == 0
    assert provider.desired() == [] and provider.held == Held() and pve.requests[before:] == []


def test_a_held_document_whose_signer_was_revoked_is_no_longer_applied(
        served: Served, tmp_path: Path, providers: list[HubProvider]) -> None:
    """A store that revokes alice, loaded while version 1 (hers) is held: it is no longer served (nothing managed,
    the metric says so) and the hub is asked for it again, which is NACKed KEY_REVOKED; the floor stays at 1.
    A restart under that store does the same at once; a version 2 signed by bob, whom it trusts, is taken."""
    state = tmp_path / "state"
    state.mkdir()
    path = write_store(tmp_path, store_doc())
    keeper, metrics = TrustKeeper(str(path), str(state)), ExecutorMetrics()
    first = make_provider(providers, served.port, keeper, state, metrics=metrics)
    v1 = document(1)
    served.hub.push(v1)
    wait_for(lambda: len(served.hub.reports) == 1, "the ACK")
    assert [d.vmid for d in first.desired()] == [100]
    revoking = store_doc()
    revoking["version"] = 2
    revoking["keys"].append(key_entry("bob", ["publisher"]))
    revoking["revoked"] = {"keys": [revoking["keys"][0]["id"]]}
    write_store(tmp_path, revoking)
    keeper.reload()  # as a tick or SIGHUP does
    assert first.desired() == [] and first.held.version == 1
    assert metric(metrics, "pve_executor_hub_held_document_trusted") == 0
    wait_for(lambda: served.hub.since()[-1:] == [0], "a Watch asking for version 1 again")
    wait_for(lambda: reports(served.hub)[-1] == (1, False, "KEY_REVOKED"), "the NACK of version 1")
    first.close()
    again = make_provider(providers, served.port, TrustKeeper(str(path), str(state)), state, metrics=metrics)
    assert again.desired() == [] and again.held.version == 1
    assert metric(metrics, "pve_executor_hub_held_document_trusted") == 0
    wait_for(lambda: len(served.hub.watches) >= 3 and served.hub.since()[-1] == 0, "the restart's Watch")
    served.hub.push(document(2, sha(v1), signers=("bob",)))
    wait_for(lambda: reports(served.hub)[-1] == (2, True, ""), "version 2 by bob")
    assert [d.vmid for d in again.desired()] == [100]
    assert metric(metrics, "pve_executor_hub_held_document_trusted") == 1


def test_a_key_expired_since_does_not_void_the_document_it_signed(served: Served, tmp_path: Path,
                                                                   providers: list[HubProvider]) -> None:
    """Restarted after alice's key expired (rotation, not revocation): version 1, which she signed while it was
    valid, is still served from disk; a new document signed with her expired key is refused KEY_EXPIRED."""
    state = tmp_path / "state"
    state.mkdir()
    path = write_store(tmp_path, store_doc())
    first = make_provider(providers, served.port, TrustKeeper(str(path), str(state)), state)
    v1 = document(1)
    served.hub.push(v1)
    wait_for(lambda: len(served.hub.reports) == 1, "the ACK")
    first.close()
    expired = store_doc()
    expired["version"] = 2
    expired["keys"][0] = key_entry("alice", ["publisher", "operator"],
                                   not_after=dt.datetime.fromtimestamp(time.time() - 10, dt.UTC))
    write_store(tmp_path, expired)
    again = make_provider(providers, served.port, TrustKeeper(str(path), str(state)), state)
    assert [d.vmid for d in again.desired()] == [100]
    served.hub.push(document(2, sha(v1)))
    wait_for(lambda: reports(served.hub)[-1] == (2, False, "KEY_EXPIRED"), "the NACK of version 2")
    assert again.held.version == 1


def test_an_unreadable_held_file_refuses_the_hub_source(tmp_path: Path, trust: TrustKeeper) -> None:
    """A held line that does not parse is an error, never a silent start from version 0."""
    state = tmp_path / "state"
    (state / HELD_FILE).write_text("seven\n")
    with pytest.raises(HeldFileError, match="hub-held"):
        HubProvider(HubSettings(target="127.0.0.1:1"), files=HeldFiles(state), trust=trust,
                    audience=lambda: AUDIENCE, metrics=ExecutorMetrics())


def test_the_daemon_refuses_to_start_on_an_unreadable_held_file(tmp_path: Path, trust: TrustKeeper,
                                                                 pve: MemoryPve) -> None:
    """The wiring turns it into a configuration error (exit 2) naming the file and what to do."""
    state = tmp_path / "state"
    (state / HELD_FILE).write_text("3 not-a-sha\n")
    settings = ExecutorSettings(hub="127.0.0.1:1", trust_store="t.toml", state_dir=str(state))
    with pytest.raises(ConfigError, match=r"hub-held.*remove it to take the hub's latest version"):
        hub_provider(settings, pve, trust, ExecutorMetrics())


# --- the daemon ------------------------------------------------------------------------------------------------


def idle_ticks(log: LineReader) -> list[dict[str, Any]]:
    """The daemon's ticks so far that found nothing to do."""
    events = []
    for line in list(log.lines):
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return [e for e in events if e.get("event") == "tick" and e.get("outcome") == "ok" and e.get("queued") == 0]


def _daemon(command: list[str]) -> tuple[subprocess.Popen[str], LineReader]:
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    return child, LineReader(child.stderr)


def test_kill_9_between_saving_and_the_ack_applies_nothing_twice(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """The daemon takes version 1 (on disk), converges the guest, and is SIGKILLed while the hub holds its ACK
    back. Restarted, it watches from version 1, ACKs it again and writes nothing more to Proxmox: one start,
    one config write in all."""
    fakepve.add_vm(100, "vm100", status="stopped", config={"memory": 2048, "cores": 1})
    audience = "pve1@fakecluster"
    store = write_store(tmp_path, store_doc(audience))
    hold = threading.Event()
    hub = TestHub(hold=hold)
    running = serve(hub)
    v1 = desireddoc.to_bytes(desireddoc.seal(desireddoc.build_payload(
        cluster="fakecluster", version=1, role="publisher", author="alice@example.org", message="v1",
        created=int(time.time()), previous_sha256="", desired=DESIRED), private("alice")))
    hub.push(v1)
    command = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path,
                  "run", "--hub", f"127.0.0.1:{running.port}", "--trust-store", str(store), "--state-dir",
                  str(tmp_path / "state"), "--interval", "0.2", "--hub-heartbeat", "0.2",
                  "--listen", f"127.0.0.1:{unused_port()}")
    child, _ = _daemon(command)
    try:
        wait_for(lambda: len(hub.arrived) == 1, "the ACK on its way", timeout=30)
        wait_for(lambda: fakepve.vm(100).status == "running" and str(fakepve.vm(100).config["memory"]) == "4096",
                 "the guest converged", timeout=30)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert hub.reports == []  # the hub never answered it
    hold.set()
    first_run = [(m, p) for m, p, _ in fakepve.requests if m in WRITES and "/100/" in p]
    child, log = _daemon(command)
    try:
        wait_for(lambda: reports(hub) == [(1, True, "")], "the ACK said again", timeout=30)
        wait_for(lambda: len(idle_ticks(log)) >= 2, "two ticks with nothing to do", timeout=30)
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        running.stop()
    assert hub.since()[0] == 0 and set(hub.since()[1:]) == {1}  # the restart resumes from version 1
    assert [(m, p) for m, p, _ in fakepve.requests if m in WRITES and "/100/" in p] == first_run
    assert sum(p.endswith("/status/start") for _, p in first_run) == 1
    assert sum(p.endswith("/config") for _, p in first_run) == 1


def test_hub_with_desired_is_a_config_error(tmp_path: Path) -> None:
    """A node takes one source: --hub with --desired exits 2 naming both; --hub without a trust store, or with a
    --hub-ca that cannot be read, too."""
    desired = tmp_path / "desired.yaml"
    desired.write_text(DESIRED)
    password = tmp_path / "password"
    password.write_text("secret\n")
    base = [sys.executable, "-m", "executor", "run", "--node", "pve1", "--pve-url", "https://127.0.0.1:1",
            "--pve-user", "root@pam", "--pve-password-file", str(password), "--state-dir", str(tmp_path / "state"),
            "--hub", "127.0.0.1:1"]
    both = subprocess.run([*base, "--desired", str(desired), "--trust-store", str(tmp_path / "t.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert both.returncode == 2, both.stderr
    assert "a node takes one source" in both.stderr and "Traceback" not in both.stderr
    bare = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert bare.returncode == 2 and "needs trust_store" in bare.stderr, bare.stderr
    store = write_store(tmp_path, store_doc())
    ca = subprocess.run([*base, "--trust-store", str(store), "--hub-ca", str(tmp_path / "no-ca.pem"),
                         "--listen", f"127.0.0.1:{unused_port()}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, check=False)
    assert ca.returncode == 2 and "hub_ca" in ca.stderr and "no-ca.pem" in ca.stderr, ca.stderr
