"""Planner speed and memory: Plan over gRPC vs the bare gRPC round trip, at 1k/10k/50k guests.

Usage: python bench/bench_planner.py [--sizes 1000,10000,50000] [--raw]

Every server is its own process on loopback (so its RSS is its own); the client sends the same
prebuilt PlanRequest (1% drift) through a typed call, as a stub does (serialize the request, parse
the response), to (a) an echo server that parses the request and returns it, (a') a sink that
parses it and returns an empty response, and (b) the real planner (`python -m planner serve`).
Calls are interleaved round-robin so machine noise hits all three alike. Reported: median wall
time per call, ratios, planner peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from google.protobuf.message import Message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.snapshot import snapshot
from planner.v1 import planner_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
REPS = {1_000: 40, 10_000: 15, 50_000: 5}
OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def start(args: list[str], port_from_json: bool) -> tuple[subprocess.Popen[str], int]:
    """Start a server process and read its bound port."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stream = proc.stderr if port_from_json else proc.stdout
    assert stream is not None
    for line in stream:
        if not port_from_json:
            return proc, int(line)
        event = json.loads(line)
        if event["event"] == "planner_listening":
            return proc, int(event["address"].rsplit(":", 1)[1])
    raise RuntimeError(f"{args} did not start")


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


Call = Callable[[object], object]


@contextlib.contextmanager
def serving(args: list[str], port_from_json: bool, response: type[Message], raw: bool) -> Iterator[tuple[int, Call]]:
    """A server process and a call of its Plan method; stopped (SIGTERM) on exit.

    Typed (default): the call serializes the prebuilt request and parses the response each time,
    as a client stub does. Raw: pre-serialized bytes out, bytes back unparsed (transport only).
    """
    proc, port = start(args, port_from_json)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
            method = channel.unary_unary(
                "/planner.v1.PlannerService/Plan",
                request_serializer=None if raw else pb.PlanRequest.SerializeToString,
                response_deserializer=None if raw else response.FromString)
            yield proc.pid, lambda request: method(request, timeout=600)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def interleaved(calls: dict[str, Call], payload: object, reps: int) -> dict[str, float]:
    """Median seconds per call of each server, calls interleaved so machine noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call(payload)  # warm-up
    for _ in range(reps):
        for name, call in calls.items():
            started = time.perf_counter()
            call(payload)
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(n: int, raw: bool) -> str:
    """One table row for ``n`` guests (a fresh planner process, so its peak RSS is this n's)."""
    request = snapshot(n)
    payload: object = request.SerializeToString() if raw else request
    planner_args = ["-m", "planner", "serve", "--listen", "127.0.0.1:0", "--log-format", "json"]
    with serving(["bench/echo_server.py", "--mode", "echo"], False, pb.PlanRequest, raw) as (_, echo), \
            serving(["bench/echo_server.py", "--mode", "sink"], False, pb.PlanResponse, raw) as (_, sink), \
            serving(planner_args, True, pb.PlanResponse, raw) as (planner_pid, planner):
        median = interleaved({"echo": echo, "sink": sink, "plan": planner}, payload, REPS.get(n, 5))
        answer = planner(payload)
        response = pb.PlanResponse.FromString(answer) if isinstance(answer, bytes) else answer
        assert isinstance(response, pb.PlanResponse)
        actions = len(response.actions)
        rss = peak_rss_mb(planner_pid)
    echo_s, sink_s, plan_s = median["echo"], median["sink"], median["plan"]
    return (f"| {n:,} | {request.ByteSize() / 1e6:.1f} | {echo_s * 1e3:.1f} | {sink_s * 1e3:.1f} | {plan_s * 1e3:.1f} "
            f"| {plan_s / echo_s:.2f} | {plan_s / sink_s:.2f} | {rss:.0f} | {actions} |")


def main() -> int:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--raw", action="store_true",
                        help="send pre-serialized bytes and leave responses unparsed (transport only)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("| guests | request MB | (a) echo ms | (a') sink ms | (b) Plan ms | b/a | b/a' "
          "| planner peak RSS MB | actions |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        print(measure(n, args.raw), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
