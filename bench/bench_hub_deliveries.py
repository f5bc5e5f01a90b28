"""Approvals through the hub: SubmitOp on one hub process to the delivery arriving on a node's Watch stream.

Usage: python bench/bench_hub_deliveries.py [--submits 20] [--postgres]

Starts two ``pve-hub serve`` processes on one store (SQLite in a temp dir, shared by both; with ``--postgres``, a
real PostgreSQL started from initdb in a temp dir, durable settings, stopped by PID): A takes the submits, B holds
the node's Watch stream (the node said its audience on it). Each of ``--submits`` signed envelopes (a stop, signed
with a test key; the hub verifies nothing) is timed from the SubmitOp call on A to its delivery on B's stream, and
once more with A holding the stream (one process). Prints a Markdown table (median / p99 / max, ms).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from safety import signedop
from tests import pgserver
from tests.signing import seal

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = "lab"
AUDIENCE = "pve1@lab"
PVE_HUB = [sys.executable, "-c", "import sys; from hub.cli import main; sys.exit(main(sys.argv[1:]))"]


def free_port() -> int:
    """A port free now on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_hub(stack: ExitStack, store: list[str]) -> str:
    """A ``pve-hub serve`` subprocess over ``store``; its address; stopped by PID when ``stack`` closes."""
    port = free_port()
    child = subprocess.Popen([*PVE_HUB, "serve", "--listen", f"127.0.0.1:{port}", *store, "--log-format", "json"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)

    def stop() -> None:
        child.send_signal(signal.SIGTERM)
        child.wait(30)
    stack.callback(stop)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    return address


def envelope() -> bytes:
    """A stop for pve1@lab signed by the test key alice (a fresh op id each)."""
    payload = {"v": 1, "op_id": uuid.uuid4().hex, "audience": AUDIENCE, "vmid": 100, "guest_type": "qemu",
               "kind": "stop", "params": {}, "class": "APPROVAL",
               "precondition": {"digest": "0" * 40, "run_state": "running"}, "challenge": None, "role": "operator",
               "not_before": 1, "not_after": 2, "reason": "bench"}
    return signedop.envelope_to_json(seal(json.dumps(payload).encode(), "alice"))


def measure(submit_to: str, watch_on: str, submits: int) -> list[float]:
    """Milliseconds from each SubmitOp on ``submit_to`` to its delivery on a stream held on ``watch_on``."""
    arrived: queue.Queue[tuple[str, float]] = queue.Queue()
    with grpc.insecure_channel(watch_on) as watch_channel, grpc.insecure_channel(submit_to) as submit_channel:
        call = pb_grpc.HubServiceStub(watch_channel).Watch(pb.WatchRequest(cluster=CLUSTER, node=AUDIENCE,
                                                                           audience=AUDIENCE))
        first = threading.Event()

        def read() -> None:
            try:
                for event in call:
                    first.set()
                    if event.HasField("delivery"):
                        arrived.put((event.delivery.delivery_id, time.monotonic()))
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
        first.wait(30)
        while not arrived.empty():  # deliveries of an earlier round, sent again on this new stream
            arrived.get()
        stub = pb_grpc.HubServiceStub(submit_channel)
        took = []
        for _ in range(submits):
            data = envelope()
            started = time.monotonic()
            answer = stub.SubmitOp(pb.SubmitOpRequest(cluster=CLUSTER, envelope=data), timeout=30)
            while True:
                delivery_id, at = arrived.get(timeout=30)
                if delivery_id == answer.delivery_id:
                    break
            took.append((at - started) * 1000)
        call.cancel()
    return took


def main() -> None:
    """Run and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=20)
    parser.add_argument("--postgres", action="store_true", help="store in a real PostgreSQL (initdb in a temp dir)")
    args = parser.parse_args()
    with ExitStack() as stack:
        state = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        store = ["--state-dir", str(state)]
        if args.postgres:
            server = pgserver.start(durable=True)
            stack.callback(pgserver.stop, server)
            dsn = state / "dsn"
            dsn.write_text(server.create_database("hub_bench"))
            store = ["--postgres-dsn-file", str(dsn)]
        a, b = start_hub(stack, store), start_hub(stack, store)
        measure(a, b, 1)  # the audience recorded, the feeds started
        rows = [("one hub process", measure(a, a, args.submits)), ("another hub process (replica)",
                                                                   measure(a, b, args.submits))]
    kind = "PostgreSQL 15 (fsync on)" if args.postgres else "SQLite (WAL, synchronous=FULL)"
    print(f"| store | node watching | SubmitOp to delivery ms (median / p99 / max), {args.submits} submits |")
    print("|---|---|---|")
    for name, took in rows:
        ordered = sorted(took)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        print(f"| {kind} | {name} | {statistics.median(took):.1f} / {p99:.1f} / {max(took):.1f} |")


if __name__ == "__main__":
    main()
