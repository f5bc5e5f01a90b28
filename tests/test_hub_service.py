"""hub.v1.HubService over real gRPC on loopback, on SQLite and (across replicas) PostgreSQL; pve-hub in subprocesses."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.grpcserver import ClientTls, ServerTls, channel_credentials
from hub.service import status_of
from hub.store import (
    DocumentTooLarge,
    InvalidArgumentError,
    PostgresStore,
    SqliteStore,
    StoreUnavailableError,
    UnknownVersionError,
    VersionConflict,
)
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from tests import certs
from tests.executor_helpers import unused_port
from tests.hub_helpers import CLUSTER, KEY, Hub, desired, envelope, running_hub, watch, write_key

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT = 0.2


@pytest.fixture(name="hub")
def _hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(SqliteStore.in_dir(tmp_path / "state"), heartbeat=HEARTBEAT) as hub:
        yield hub


def refused(call: Any, request: Any) -> grpc.RpcError:
    """The error ``call(request)`` answers (fails the test if it succeeds)."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    return caught.value


def test_apply_conflict_history_show(hub: Hub) -> None:
    """Versions 1 and 2 are stored; an apply that expected 1 after 2 is refused naming both; reads see both."""
    first = hub.apply(desired(100), 0)
    second = hub.apply(desired(100, 101), 1)
    assert (first.version, second.version) == (1, 2)
    late = envelope(desired(102), 2, first.payload_sha256)
    error = refused(hub.stub.Apply, pb.ApplyRequest(cluster=CLUSTER, expected_version=1, envelope=late))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expected version 1" in error.details() and "latest is 2" in error.details()
    history = hub.stub.History(pb.HistoryRequest(cluster=CLUSTER)).entries
    assert [(e.version, e.payload_sha256, e.author) for e in history] == [
        (2, second.payload_sha256, "alice@example.org"), (1, first.payload_sha256, "alice@example.org")]
    latest = hub.stub.GetDocument(pb.GetDocumentRequest(cluster=CLUSTER)).document
    one = hub.stub.GetDocument(pb.GetDocumentRequest(cluster=CLUSTER, version=1)).document
    assert (latest.version, latest.payload_sha256, one.version) == (2, second.payload_sha256, 1)
    assert one.envelope == hub.store.get(CLUSTER, 1).envelope  # type: ignore[union-attr]
    missing = refused(hub.stub.GetDocument, pb.GetDocumentRequest(cluster=CLUSTER, version=9))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "version 9" in missing.details()
    registry = hub.running.metrics.registry
    assert registry.get_sample_value("pve_hub_applies_total", {"outcome": "ok"}) == 2
    assert registry.get_sample_value("pve_hub_applies_total", {"outcome": "conflict"}) == 1


def _bad_applies() -> list[tuple[str, pb.ApplyRequest, grpc.StatusCode, str]]:
    good = envelope(desired(100), 1)
    return [
        ("no cluster", pb.ApplyRequest(cluster="", envelope=good), grpc.StatusCode.INVALID_ARGUMENT, "cluster"),
        ("empty", pb.ApplyRequest(cluster=CLUSTER), grpc.StatusCode.INVALID_ARGUMENT, "envelope"),
        ("not json", pb.ApplyRequest(cluster=CLUSTER, envelope=b"{nope"), grpc.StatusCode.INVALID_ARGUMENT,
         "envelope"),
        ("reformatted", pb.ApplyRequest(cluster=CLUSTER, envelope=good.replace(b"\n", b"\n ")),
         grpc.StatusCode.INVALID_ARGUMENT, "envelope"),
        ("other cluster", pb.ApplyRequest(cluster="prod", envelope=good), grpc.StatusCode.INVALID_ARGUMENT,
         "document.cluster"),
        ("version 2 first", pb.ApplyRequest(cluster=CLUSTER, envelope=envelope(desired(100), 2, "a" * 64)),
         grpc.StatusCode.INVALID_ARGUMENT, "document.version"),
        ("skips ahead", pb.ApplyRequest(cluster=CLUSTER, expected_version=3, envelope=good),
         grpc.StatusCode.INVALID_ARGUMENT, "document.version"),
    ]


@pytest.mark.parametrize(("request_", "code", "field"), [case[1:] for case in _bad_applies()],
                         ids=[case[0] for case in _bad_applies()])
def test_a_bad_apply_names_the_field_and_stores_nothing(hub: Hub, request_: pb.ApplyRequest, code: grpc.StatusCode,
                                                        field: str) -> None:
    """Each bad apply is refused with its code, the message starts with the field; nothing is stored."""
    error = refused(hub.stub.Apply, request_)
    assert error.code() == code and error.details().startswith(field), error.details()
    assert hub.store.latest(CLUSTER) == 0 and hub.store.latest("prod") == 0


def test_a_document_that_does_not_replace_the_latest_is_refused(hub: Hub) -> None:
    """previous_sha256 must be the stored latest payload's: FAILED_PRECONDITION naming the field."""
    hub.apply(desired(100), 0)
    forged = envelope(desired(101), 2, "b" * 64)
    error = refused(hub.stub.Apply, pb.ApplyRequest(cluster=CLUSTER, expected_version=1, envelope=forged))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith("document.previous_sha256") and hub.store.latest(CLUSTER) == 1


def test_other_calls_name_the_bad_field(hub: Hub) -> None:
    """GetDocument, History, Report, Status and Watch: INVALID_ARGUMENT naming the field."""
    cases = [(hub.stub.GetDocument, pb.GetDocumentRequest(cluster="bad name"), "cluster"),
             (hub.stub.History, pb.HistoryRequest(cluster=CLUSTER, limit=5000), "limit"),
             (hub.stub.Report, pb.ReportRequest(cluster=CLUSTER, node="", version=1, ok=True), "node"),
             (hub.stub.Report, pb.ReportRequest(cluster=CLUSTER, node="n1@lab", version=1, ok=False), "reason"),
             (hub.stub.Status, pb.StatusRequest(cluster=""), "cluster")]
    for call, request, field in cases:
        error = refused(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(field), error.details()
    watching = watch(hub.stub, "bad node!")
    deadline = time.monotonic() + 5
    while not watching.error and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watching.error[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert watching.error[0].details().startswith("node")


def test_an_envelope_over_the_size_limit_is_refused_and_not_stored(tmp_path: Path) -> None:
    """Over the store's limit: INVALID_ARGUMENT naming the envelope and the limit; nothing stored."""
    with running_hub(SqliteStore.in_dir(tmp_path / "state", max_envelope_bytes=4096)) as hub:
        big = envelope(desired(*range(100, 200)), 1)
        assert len(big) > 4096
        error = refused(hub.stub.Apply, pb.ApplyRequest(cluster=CLUSTER, envelope=big))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("envelope") and "4096" in error.details()
        assert hub.stub.History(pb.HistoryRequest(cluster=CLUSTER)).entries == []
        assert hub.apply(desired(100), 0).version == 1  # a small one still goes in


def test_a_watcher_gets_a_new_version_within_a_second(hub: Hub) -> None:
    """Watching from nothing: heartbeats, then the applied version within a second of the apply."""
    watching = watch(hub.stub, "n1@lab")
    _, first = watching.next()
    assert first.WhichOneof("event") == "heartbeat" and first.heartbeat.latest_version == 0
    for n in (1, 2, 3):
        started = time.monotonic()
        applied = hub.apply(desired(100 + n))
        at, document = watching.next_document()
        assert (document.version, document.payload_sha256) == (n, applied.payload_sha256)
        assert at - started < 1.0, f"version {n} reached the watcher {at - started:.3f}s after the apply started"
    watching.cancel()


def test_heartbeats_carry_the_latest_version(hub: Hub) -> None:
    """On a quiet stream a heartbeat every interval, naming the hub's latest version."""
    hub.apply(desired(100), 0)
    watching = watch(hub.stub, "n1@lab", since=1)
    got = [watching.next() for _ in range(4)]
    times = [at for at, _ in got]
    assert all(event.WhichOneof("event") == "heartbeat" and event.heartbeat.latest_version == 1 for _, event in got)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(HEARTBEAT * 0.5 < gap < HEARTBEAT * 5 for gap in gaps), gaps
    watching.cancel()


def test_a_watcher_resumes_from_its_version(hub: Hub) -> None:
    """since_version: the latest at once if newer, nothing if current, a heartbeat if ahead of the hub."""
    for n in range(3):
        hub.apply(desired(100 + n))
    behind = watch(hub.stub, "n1@lab", since=1)
    _, document = behind.next_document(timeout=1.0)
    assert document.version == 3
    current = watch(hub.stub, "n2@lab", since=3)
    ahead = watch(hub.stub, "n3@lab", since=7)
    for stream in (current, ahead):
        _, event = stream.next()
        assert event.WhichOneof("event") == "heartbeat" and event.heartbeat.latest_version == 3
    hub.apply(desired(200))
    for stream in (behind, current):
        assert stream.next_document()[1].version == 4
    for stream in (behind, current, ahead):
        stream.cancel()


def test_many_watchers_share_one_feed_thread(hub: Hub) -> None:
    """Twenty watchers of one cluster: one feed thread waits on the store, and each gets the new version."""
    streams = [watch(hub.stub, f"n{i}@lab") for i in range(20)]
    for stream in streams:
        stream.next()
    feeds = [t for t in threading.enumerate() if t.name.startswith("hub-feed-")]
    assert [t.name for t in feeds] == [f"hub-feed-{CLUSTER}"]
    hub.apply(desired(100), 0)
    assert {stream.next_document()[1].version for stream in streams} == {1}
    for stream in streams:
        stream.cancel()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("hub-feed-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith("hub-feed-")], "the idle feed did not stop"


class CountingStore:
    """A real store whose document reads are counted (get and since: the calls that return an envelope)."""

    def __init__(self, store: SqliteStore) -> None:
        self.store, self.reads = store, 0

    def get(self, cluster: str, version: int | None = None) -> Any:
        """Counted."""
        self.reads += 1
        return self.store.get(cluster, version)

    def since(self, cluster: str, version: int) -> Any:
        """Counted."""
        self.reads += 1
        return self.store.since(cluster, version)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_reconnecting_watchers_are_answered_from_memory(tmp_path: Path) -> None:
    """Thirty nodes reconnecting at once (a hub restart) get the latest from the feed: the store reads it once."""
    counting = CountingStore(SqliteStore.in_dir(tmp_path / "state"))
    with running_hub(counting, heartbeat=HEARTBEAT) as hub:
        hub.apply(desired(100), 0)
        before = counting.reads
        streams = [watch(hub.stub, f"n{i}@lab") for i in range(30)]
        assert {stream.next_document()[1].version for stream in streams} == {1}
        assert counting.reads - before <= 1, f"{counting.reads - before} reads of the document for 30 watchers"
        for stream in streams:
            stream.cancel()


def test_report_and_status(hub: Hub) -> None:
    """ACK moves the held version, NACK keeps it with the reason; a node that only watched is listed too."""
    hub.apply(desired(100), 0)
    hub.apply(desired(101))
    ack = hub.stub.Report(pb.ReportRequest(cluster=CLUSTER, node="n1@lab", version=2, ok=True)).node
    assert (ack.held_version, ack.ok) == (2, True)
    hub.stub.Report(pb.ReportRequest(cluster=CLUSTER, node="n2@lab", version=1, ok=True))
    nack = hub.stub.Report(pb.ReportRequest(cluster=CLUSTER, node="n2@lab", version=2, ok=False,
                                            reason="SIGNATURE_INVALID", detail="key k1 is unknown")).node
    assert (nack.held_version, nack.reported_version, nack.ok) == (1, 2, False)
    watching = watch(hub.stub, "n3@lab", since=2)
    watching.next()
    status = hub.stub.Status(pb.StatusRequest(cluster=CLUSTER))
    assert status.latest_version == 2
    rows = {node.node: (node.held_version, node.reported_version, node.ok, node.reason) for node in status.nodes}
    assert rows == {"n1@lab": (2, 2, True, ""), "n2@lab": (1, 2, False, "SIGNATURE_INVALID: key k1 is unknown"),
                    "n3@lab": (0, 0, False, "")}
    assert all(node.last_seen_unix_ms > (time.time() - 60) * 1000 for node in status.nodes)
    watching.cancel()


def _node_pki(directory: Path) -> tuple[certs.Pki, str, str]:
    """The test PKI and a client certificate whose CN is the node n1@lab."""
    pki = certs.make_pki(directory)
    ca_pem = Path(pki.ca).read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    # The CA's key is not kept by make_pki: make another CA for the node and trust both.
    node_ca_key, node_ca = certs._ca("node CA")
    key, cert = certs._leaf(node_ca_key, node_ca, "n1@lab", server=False)
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    both = directory / "both-ca.pem"
    both.write_bytes(ca.public_bytes(serialization.Encoding.PEM) + node_ca.public_bytes(serialization.Encoding.PEM))
    (directory / "n1.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "n1.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return pki, str(both), str(directory)


def test_with_mutual_tls_a_node_is_its_certificate(tmp_path: Path) -> None:
    """Report and Watch for the certificate's own node pass; for another node: PERMISSION_DENIED."""
    pki, both, where = _node_pki(tmp_path / "pki")
    tls = ServerTls(cert=pki.server_cert, key=pki.server_key, client_ca=both)
    with running_hub(SqliteStore.in_dir(tmp_path / "state"), tls=tls, heartbeat=HEARTBEAT) as hub:
        credentials = channel_credentials(ClientTls(ca=pki.ca, cert=f"{where}/n1.pem", key=f"{where}/n1.key"))
        with grpc.secure_channel(f"127.0.0.1:{hub.running.port}", credentials) as channel:
            stub = pb_grpc.HubServiceStub(channel)
            stub.Report(pb.ReportRequest(cluster=CLUSTER, node="n1@lab", version=0, ok=True), timeout=10)
            error = refused(stub.Report, pb.ReportRequest(cluster=CLUSTER, node="n2@lab", version=0, ok=True))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "n1@lab" in error.details()
            mine = watch(stub, "n1@lab")
            assert mine.next()[1].WhichOneof("event") == "heartbeat"
            other = watch(stub, "n2@lab")
            deadline = time.monotonic() + 5
            while not other.error and time.monotonic() < deadline:
                time.sleep(0.02)
            assert other.error[0].code() == grpc.StatusCode.PERMISSION_DENIED
            mine.cancel()
        assert [n.node for n in hub.store.nodes(CLUSTER)] == ["n1@lab"]


def test_an_apply_on_one_replica_reaches_a_watcher_of_the_other(pg_server: Any) -> None:
    """Two hubs on one PostgreSQL: a watcher of B gets A's apply within a second."""
    conninfo = pg_server.create_database(f"hub_replicas_{os.getpid()}")
    with running_hub(PostgresStore(conninfo), heartbeat=HEARTBEAT) as a, \
            running_hub(PostgresStore(conninfo), heartbeat=HEARTBEAT) as b:
        watching = watch(b.stub, "n1@lab")
        watching.next()
        for n in (1, 2):
            started = time.monotonic()
            applied = a.apply(desired(100 + n))
            at, document = watching.next_document()
            assert (document.version, document.payload_sha256) == (applied.version, applied.payload_sha256)
            assert at - started < 1.0, f"{at - started:.3f}s"
        watching.cancel()


# -- pve-hub in subprocesses ---------------------------------------------------------------------------------------

PVE_HUB = [sys.executable, "-c", "import sys; from hub.cli import main; sys.exit(main(sys.argv[1:]))"]


def pve_hub(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``pve-hub ARGS`` in a subprocess, from this tree."""
    return subprocess.run([*PVE_HUB, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _free_port() -> int:
    """A loopback port for a hub child to listen on (no other test of this run takes it)."""
    return unused_port()


def _serve(state: Path, port: int) -> subprocess.Popen[str]:
    child = subprocess.Popen([*PVE_HUB, "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
                              "--log-format", "json"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            child.kill()
            raise
    return child


@pytest.fixture(name="served")
def _served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A ``pve-hub serve`` subprocess on SQLite: its address and state dir; stopped by its PID."""
    port, state = _free_port(), tmp_path / "state"
    child = _serve(state, port)
    try:
        yield f"127.0.0.1:{port}", state
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(30)


def test_sigkill_and_restart_on_the_same_state_dir_keeps_the_versions(tmp_path: Path) -> None:
    """A hub killed with SIGKILL after two applies comes back with both, and goes on to version 3."""
    port, state = _free_port(), tmp_path / "state"
    child = _serve(state, port)
    key = write_key(tmp_path / "k.pem")
    (tmp_path / "d.yaml").write_text(desired(100), encoding="utf-8")
    common = ["--hub", f"127.0.0.1:{port}", "--cluster", CLUSTER]
    for n in (1, 2):
        (tmp_path / "d.yaml").write_text(desired(100, 100 + n), encoding="utf-8")
        done = pve_hub("apply", str(tmp_path / "d.yaml"), *common, "--key", str(key), "--role", "desired",
                       "--message", f"v{n}")
        assert done.returncode == 0, done.stderr
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    child = _serve(state, port)
    try:
        done = pve_hub("history", *common)
        assert done.returncode == 0 and [line.split()[0] for line in done.stdout.splitlines()[1:]] == ["2", "1"]
        done = pve_hub("apply", str(tmp_path / "d.yaml"), *common, "--key", str(key), "--role", "desired",
                       "--message", "v3", "--check-version", "2")
        assert done.returncode == 0 and "applied version 3" in done.stderr, done.stderr
    finally:
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0


def test_the_cli_apply_history_show_status(served: tuple[str, Path], tmp_path: Path) -> None:
    """apply shows the diff and exits 0; a stale --check-version exits 1 naming both; history, show, status."""
    address, _ = served
    key = write_key(tmp_path / "k.pem")
    common = ["--hub", address, "--cluster", CLUSTER]
    signing = ["--key", str(key), "--role", "desired"]
    path = tmp_path / "d.yaml"
    path.write_text(desired(100), encoding="utf-8")
    done = pve_hub("apply", str(path), *common, *signing, "--message", "first", "--check-version", "0")
    assert done.returncode == 0, done.stderr
    assert "+++ " + str(path) in done.stdout and "+  - vmid: 100" in done.stdout
    path.write_text(desired(100, 101), encoding="utf-8")
    done = pve_hub("apply", str(path), *common, *signing, "--message", "add 101")
    assert done.returncode == 0, done.stderr
    assert "--- version 1" in done.stdout and "+  - vmid: 101" in done.stdout and "-  - vmid: 100" not in done.stdout
    done = pve_hub("apply", str(path), *common, *signing, "--message", "stale", "--check-version", "1")
    assert done.returncode == 1 and "--check-version 1" in done.stderr and "is 2" in done.stderr, done.stderr
    done = pve_hub("history", *common)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[1].split()[0] == "2" and lines[1].endswith("add 101") and lines[2].endswith("first")
    done = pve_hub("show", "1", *common)
    assert done.returncode == 0 and done.stdout == desired(100) and "version 1" in done.stderr
    assert "first" in done.stderr
    with grpc.insecure_channel(address) as channel:
        pb_grpc.HubServiceStub(channel).Report(pb.ReportRequest(cluster=CLUSTER, node="n1@lab", version=2, ok=False,
                                                                reason="ROLLBACK", detail="held 3"))
    done = pve_hub("status", *common)
    assert done.returncode == 4, done.stderr  # a NACK: an operator is needed
    assert "latest version 2" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("n1@lab"))
    assert "NACK v2" in row and "ROLLBACK: held 3" in row and "(behind)" in row
    done = pve_hub("show", "9", *common)
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr


def test_the_loser_of_an_apply_race_is_refused_before_it_signs(hub: Hub, tmp_path: Path) -> None:
    """An operator reads the diff against version 1 and types the key's passphrase (here: a FIFO the test writes
    once another apply stored version 2, the window widened on purpose). Two documents signed under one version
    are both valid to every node (docs/SAFETY.md §6.9), so apply reads the latest again after the passphrase and
    refuses, exit 1, before it signs: before, it signed a version 2 and the hub (a courier that could keep it)
    refused only the upload."""
    hub.apply(desired(100), 0)
    key = tmp_path / "k.pem"
    key.write_bytes(KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"secret")))
    key.chmod(0o600)
    fifo = tmp_path / "passphrase"
    os.mkfifo(fifo)
    path = tmp_path / "d.yaml"
    path.write_text(desired(100, 101), encoding="utf-8")
    child = subprocess.Popen([*PVE_HUB, "apply", str(path), "--hub", hub.address, "--cluster", CLUSTER, "--key",
                              str(key), "--passphrase-file", str(fifo), "--role", "desired", "--message", "late"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "--- version 1\n"  # the diff: then the key
        hub.apply(desired(100, 102))  # another operator's apply lands meanwhile
        with open(fifo, "w", encoding="utf-8") as passphrase:
            passphrase.write("secret\n")
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 1, err
    assert "version 2 of cluster lab was applied since the diff above" in err and "nothing signed" in err, err
    assert [entry.version for entry in hub.store.history(CLUSTER)] == [2, 1]


def test_the_cli_refuses_a_bad_file_and_an_absent_hub(served: tuple[str, Path], tmp_path: Path) -> None:
    """A desired file with a mistake: exit 2 naming file and line, nothing sent; no hub: exit 1; bad flag: 2."""
    address, _ = served
    key = write_key(tmp_path / "k.pem")
    path = tmp_path / "bad.yaml"
    path.write_text("guests:\n  - vmid: 100\n    stat: running\n", encoding="utf-8")
    done = pve_hub("apply", str(path), "--hub", address, "--cluster", CLUSTER, "--key", str(key), "--role", "desired",
                   "--message", "typo")
    assert done.returncode == 2 and f"{path}:3: stat" in done.stderr and "Traceback" not in done.stderr
    assert pve_hub("history", "--hub", address, "--cluster", CLUSTER).stdout.strip().endswith("no version yet")
    done = pve_hub("status", "--hub", f"127.0.0.1:{_free_port()}", "--cluster", CLUSTER)
    assert done.returncode == 1 and "unavailable" in done.stderr and "Traceback" not in done.stderr
    assert pve_hub("show", "x", "--cluster", CLUSTER).returncode == 2
    done = pve_hub("--version")
    assert done.returncode == 0 and done.stdout.startswith("pve-hub ")


def test_serve_names_a_bad_store_and_never_prints_the_dsn(tmp_path: Path) -> None:
    """No DSN file: exit 2 naming the setting; a database that cannot be reached: exit 1, the password unseen."""
    done = pve_hub("serve", "--listen", "127.0.0.1:0", "--postgres-dsn-file", str(tmp_path / "absent"))
    assert done.returncode == 2 and "postgres_dsn_file" in done.stderr and "Traceback" not in done.stderr
    dsn = tmp_path / "dsn"
    dsn.write_text(f"host={tmp_path / 'nowhere'} user=hub password=sekrit-42 dbname=hub connect_timeout=2\n")
    done = pve_hub("serve", "--listen", "127.0.0.1:0", "--postgres-dsn-file", str(dsn))
    assert done.returncode == 1 and "cannot open the PostgreSQL store" in done.stderr, done.stderr
    assert "sekrit-42" not in done.stderr + done.stdout and "Traceback" not in done.stderr


def test_store_refusals_map_to_their_codes() -> None:
    """The table of store errors to gRPC codes: each message names what it is about."""
    cases = [(VersionConflict("lab", 1, 2), grpc.StatusCode.FAILED_PRECONDITION, "expected version 1"),
             (DocumentTooLarge("lab", 10, 5), grpc.StatusCode.INVALID_ARGUMENT, "envelope: "),
             (InvalidArgumentError("node", "must not be empty"), grpc.StatusCode.INVALID_ARGUMENT, "node: "),
             (StoreUnavailableError("cannot reach the database"), grpc.StatusCode.UNAVAILABLE, "cannot reach"),
             (UnknownVersionError("lab", 9, 3), grpc.StatusCode.OUT_OF_RANGE, "version 9")]
    for error, code, words in cases:
        got, message = status_of(error)
        assert got == code and words in message, (error, got, message)
