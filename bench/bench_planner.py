"""Planner speed and memory: Plan over gRPC vs the bare gRPC round trip, at 1k/10k/50k guests.

Usage: python bench/bench_planner.py [--sizes 1000,10000,50000]

Every server is its own process on loopback (so its RSS is its own); the client sends the same
prebuilt, pre-serialized PlanRequest (1% drift) to (a) an echo server that parses the request and
returns it, (a') a sink that parses it and returns an empty response, and (b) the real planner
(`python -m planner serve`). Reported: median wall time per call, ratios, planner peak RSS (VmHWM).
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


@contextlib.contextmanager
def serving(args: list[str], port_from_json: bool) -> Iterator[tuple[int, Callable[[bytes], bytes]]]:
    """A server process and a call function for its Plan method; stopped (SIGTERM) on exit."""
    proc, port = start(args, port_from_json)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
            method = channel.unary_unary("/planner.v1.PlannerService/Plan")
            yield proc.pid, lambda payload: method(payload, timeout=600)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def interleaved(calls: dict[str, Callable[[bytes], bytes]], payload: bytes, reps: int) -> dict[str, float]:
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


def measure(n: int) -> str:
    """One table row for ``n`` guests (a fresh planner process, so its peak RSS is this n's)."""
    payload = snapshot(n).SerializeToString()
    planner_args = ["-m", "planner", "serve", "--listen", "127.0.0.1:0", "--log-format", "json"]
    with serving(["bench/echo_server.py", "--mode", "echo"], False) as (_, echo), \
            serving(["bench/echo_server.py", "--mode", "sink"], False) as (_, sink), \
            serving(planner_args, True) as (planner_pid, planner):
        median = interleaved({"echo": echo, "sink": sink, "plan": planner}, payload, REPS.get(n, 5))
        actions = len(pb.PlanResponse.FromString(planner(payload)).actions)
        rss = peak_rss_mb(planner_pid)
    echo_s, sink_s, plan_s = median["echo"], median["sink"], median["plan"]
    return (f"| {n:,} | {len(payload) / 1e6:.1f} | {echo_s * 1e3:.1f} | {sink_s * 1e3:.1f} | {plan_s * 1e3:.1f} "
            f"| {plan_s / echo_s:.2f} | {plan_s / sink_s:.2f} | {rss:.0f} | {actions} |")


def main() -> int:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,50000")
    sizes = [int(s) for s in parser.parse_args().sizes.split(",")]
    print("| guests | request MB | (a) echo ms | (a') sink ms | (b) Plan ms | b/a | b/a' "
          "| planner peak RSS MB | actions |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        print(measure(n), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
