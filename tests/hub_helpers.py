"""The hub in tests: a signing key, signed documents, a hub on loopback, a watcher in a thread."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub import server
from hub.store import Store
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from opctl.desired import sign_document
from safety import desireddoc

KEY = Ed25519PrivateKey.generate()
CLUSTER = "lab"


def desired(*vmids: int, state: str = "running") -> str:
    """A desired file's text declaring ``vmids`` in ``state``."""
    return "guests:\n" + "".join(f"  - vmid: {vmid}\n    state: {state}\n" for vmid in vmids)


def envelope(text: str, version: int, previous: str = "", *, cluster: str = CLUSTER, message: str = "m") -> bytes:
    """``text`` signed as ``version`` of ``cluster``, replacing the document whose payload sha256 is ``previous``."""
    signed = sign_document(text, KEY, cluster=cluster, version=version, previous_sha256=previous, role="desired",
                           author="alice@example.org", message=message, now=time.time())
    return desireddoc.to_bytes(signed)


def write_key(path: Path) -> Path:
    """KEY as a PKCS8 PEM file, mode 0600 (what --key reads)."""
    path.write_bytes(KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    return path


@dataclass
class Hub:
    """A running hub and a stub to it."""

    running: server.Running
    store: Store
    channel: grpc.Channel
    stub: pb_grpc.HubServiceStub

    @property
    def address(self) -> str:
        """HOST:PORT."""
        return f"127.0.0.1:{self.running.port}"

    def apply(self, text: str, expected: int = -1, *, cluster: str = CLUSTER) -> pb.ApplyResponse:
        """``text`` as the next version (``expected``: the version expected, default the latest)."""
        latest = self.store.get(cluster)
        current = latest.version if latest is not None else 0
        expected = current if expected < 0 else expected
        previous = ""
        if expected:
            previous = self.stub.GetDocument(pb.GetDocumentRequest(cluster=cluster, version=expected)).document \
                .payload_sha256
        signed = envelope(text, expected + 1, previous, cluster=cluster)
        answer: pb.ApplyResponse = self.stub.Apply(pb.ApplyRequest(cluster=cluster, expected_version=expected,
                                                                   envelope=signed))
        return answer


@contextmanager
def running_hub(store: Store, listen: str = "127.0.0.1:0", **options: object) -> Iterator[Hub]:
    """A hub on ``listen`` (default: a free port on 127.0.0.1) over ``store`` (closed after), and a channel to it."""
    running = server.start(listen, store, **options)  # type: ignore[arg-type]
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield Hub(running, store, channel, pb_grpc.HubServiceStub(channel))
    finally:
        channel.close()
        server.stop(running, 0.5)
        store.close()


@dataclass
class Watching:
    """A Watch stream read in a thread: each event with the monotonic time it came."""

    call: object
    events: queue.Queue[tuple[float, pb.WatchEvent]] = field(default_factory=queue.Queue)
    error: list[grpc.RpcError] = field(default_factory=list)

    def next(self, timeout: float = 5.0) -> tuple[float, pb.WatchEvent]:
        """The next event and when it came."""
        return self.events.get(timeout=timeout)

    def next_document(self, timeout: float = 5.0) -> tuple[float, pb.Document]:
        """The next document event (heartbeats skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            at, event = self.next(max(0.01, deadline - time.monotonic()))
            if event.WhichOneof("event") == "document":
                return at, event.document

    def cancel(self) -> None:
        """End the stream."""
        self.call.cancel()  # type: ignore[attr-defined]


def watch(stub: pb_grpc.HubServiceStub, node: str, since: int = 0, *, cluster: str = CLUSTER) -> Watching:
    """Start watching ``cluster`` as ``node``, holding ``since``."""
    call = stub.Watch(pb.WatchRequest(cluster=cluster, node=node, since_version=since))
    watching = Watching(call)

    def read() -> None:
        try:
            for event in call:
                watching.events.put((time.monotonic(), event))
        except grpc.RpcError as exc:
            watching.error.append(exc)

    threading.Thread(target=read, daemon=True).start()
    return watching
