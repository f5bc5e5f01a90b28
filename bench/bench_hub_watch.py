"""The hub's Watch: apply to the last of N watchers, and how many watchers one hub process holds, with its memory.

Usage: python bench/bench_hub_watch.py [--watchers 50] [--applies 20] [--hold 1000] [--postgres]

Starts one ``pve-hub serve`` process (SQLite in a temp dir; with ``--postgres``, a real PostgreSQL started from
initdb in a temp dir, durable settings, stopped by PID). In this process, ``--watchers`` Watch streams (grpc.aio,
one channel each, as separate executors would have) watch one cluster; each of ``--applies`` signed applies is
timed from the Apply call to the moment the last watcher has the new version (p50/p99/max), and three applies
of a ``--guests`` document (signed before the clock starts; ~0.5 MB of YAML for 10,000). Then ``--hold``
watchers are opened and held, one version is applied and the time until all have it is measured; the hub's RSS
and threads are read from /proc before and after. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from tests import pgserver
from tests.hub_helpers import desired, envelope

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = "lab"
PVE_HUB = [sys.executable, "-c", "import sys; from hub.cli import main; sys.exit(main(sys.argv[1:]))"]


def free_port() -> int:
    """A port free now on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def proc_status(pid: int) -> tuple[float, int]:
    """RSS in MiB and thread count of ``pid``."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def start_hub(stack: ExitStack, state: Path, postgres: bool) -> tuple[str, subprocess.Popen[bytes]]:
    """A ``pve-hub serve`` subprocess; its address; stopped by PID when ``stack`` closes."""
    port = free_port()
    store = ["--state-dir", str(state)]
    if postgres:
        server = pgserver.start(durable=True)
        stack.callback(pgserver.stop, server)
        dsn = state / "dsn"
        state.mkdir(parents=True, exist_ok=True)
        dsn.write_text(server.create_database("hub_bench"))
        store = ["--postgres-dsn-file", str(dsn)]
    child = subprocess.Popen([*PVE_HUB, "serve", "--listen", f"127.0.0.1:{port}", *store, "--max-watchers", "1100",
                              "--log-format", "json"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        child.send_signal(signal.SIGTERM)
        child.wait(30)
    stack.callback(stop)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    return address, child


class Watchers:
    """``count`` Watch streams, one aio channel each; when each saw each version."""

    def __init__(self, address: str, count: int, prefix: str) -> None:
        self.address, self.count, self.prefix = address, count, prefix
        self.seen: dict[int, list[float]] = {}
        self.ready = 0
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def _one(self, n: int) -> None:
        channel = grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        stub = pb_grpc.HubServiceStub(channel)
        first = True
        async for event in stub.Watch(pb.WatchRequest(cluster=CLUSTER, node=f"{self.prefix}{n}@{CLUSTER}",
                                                      since_version=await self._latest(stub))):
            if first:
                self.ready, first = self.ready + 1, False
            if event.WhichOneof("event") == "document":
                self.seen.setdefault(event.document.version, []).append(time.monotonic())

    @staticmethod
    async def _latest(stub: pb_grpc.HubServiceStub) -> int:
        return int((await stub.Status(pb.StatusRequest(cluster=CLUSTER))).latest_version)

    async def start(self, timeout: float = 120) -> None:
        """Open every stream; return once each has had its first event (a heartbeat)."""
        self.tasks = [asyncio.create_task(self._one(n)) for n in range(self.count)]
        deadline = time.monotonic() + timeout
        while self.ready < self.count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.ready} of {self.count} watchers ready")
            await asyncio.sleep(0.05)

    async def all_have(self, version: int, timeout: float = 30) -> float:
        """When the last watcher had ``version`` (monotonic)."""
        deadline = time.monotonic() + timeout
        while len(self.seen.get(version, ())) < self.count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.seen.get(version, ()))} of {self.count} watchers have v{version}")
            await asyncio.sleep(0.002)
        return max(self.seen[version])

    async def close(self) -> None:
        """Cancel the streams and close the channels."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


async def apply_next(stub: pb_grpc.HubServiceStub, vmids: int) -> tuple[int, float]:
    """Sign the next version, then apply it; its version and the monotonic time the Apply call started."""
    latest = (await stub.GetDocument(pb.GetDocumentRequest(cluster=CLUSTER))).document if (
        await stub.Status(pb.StatusRequest(cluster=CLUSTER))).latest_version else None
    current = latest.version if latest is not None else 0
    signed = envelope(desired(*range(100, 100 + vmids)), current + 1,
                      latest.payload_sha256 if latest is not None else "", cluster=CLUSTER)
    started = time.monotonic()
    answer = await stub.Apply(pb.ApplyRequest(cluster=CLUSTER, expected_version=current, envelope=signed))
    return int(answer.version), started


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run(args: argparse.Namespace, address: str, hub: subprocess.Popen[bytes]) -> None:
    """The two measurements, printed as a Markdown table."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.HubServiceStub(channel)
        watchers = Watchers(address, args.watchers, "w")
        await watchers.start()
        spans = []
        for n in range(args.applies):
            version, started = await apply_next(stub, 1 + n % 10)
            spans.append((await watchers.all_have(version) - started) * 1000)
        big = []
        for _ in range(3):
            version, started = await apply_next(stub, args.guests)
            big.append((await watchers.all_have(version, timeout=120) - started) * 1000)
        await watchers.close()
        rss0, threads0 = proc_status(hub.pid)
        held = Watchers(address, args.hold, "h")
        opened = time.monotonic()
        await held.start()
        open_s = time.monotonic() - opened
        rss1, threads1 = proc_status(hub.pid)
        version, started = await apply_next(stub, 3)
        fan = (await held.all_have(version, timeout=60) - started) * 1000
        await held.close()
    store = "PostgreSQL 15 (fsync on)" if args.postgres else "SQLite (WAL, synchronous=FULL)"
    print(f"| store | apply to last of {args.watchers} watchers, ms (p50 / p99 / max over {args.applies}) | "
          f"{args.guests:,}-guest document to the last of {args.watchers}, ms (median of 3) | "
          f"{args.hold} watchers: open s, apply to last ms | hub RSS MiB (before / holding) | hub threads |")
    print("|---|---|---|---|---|---|")
    print(f"| {store} | {statistics.median(spans):.1f} / {pct(spans, 0.99):.1f} / {max(spans):.1f} | "
          f"{statistics.median(big):.0f} | "
          f"{open_s:.1f}, {fan:.0f} | {rss0:.0f} / {rss1:.0f} | {threads0} / {threads1} |")


def main() -> None:
    """Parse flags, start the hub, measure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=50)
    parser.add_argument("--applies", type=int, default=20)
    parser.add_argument("--hold", type=int, default=1000)
    parser.add_argument("--guests", type=int, default=10_000, help="guests of the large document applied")
    parser.add_argument("--postgres", action="store_true", help="store in a real PostgreSQL (initdb in a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp, ExitStack() as stack:
        address, hub = start_hub(stack, Path(tmp) / "state", args.postgres)
        asyncio.run(run(args, address, hub))


if __name__ == "__main__":
    main()
