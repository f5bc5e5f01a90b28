"""Executor speed and memory against fakepve processes on loopback.

Usage: python bench/bench_executor.py [--guests 200] [--reads 1000] [--rss 10000]

(1) 200 stopped guests declared running, fakepve adding 50 ms to every request: convergence wall
time (one tick, waiting for its actions) at --max-parallel 8 and 1, and at 8 with the desired state
from a remote source (a hub), in the same run; the requests each made; and the computed limit: the
two guest lists, then per round of --max-parallel starts a start and one task poll, at 50 ms each.
(2) A tick over 1,000 guests with managed config and no drift, against the reads it needs alone
(the two guest lists and the 1,000 configs, with the same 8 reader threads).
(3) Peak RSS of an executor process ticking over 10,000 guests with managed config.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import logs
from executor.app.wiring import assemble, writer_for
from executor.loop.desired import Declared, StaticProvider
from executor.loop.engine import Engine
from executor.loop.funnel import Settings
from executor.loop.planner_client import PlannerClient
from executor.loop.queue import GuestQueue
from executor.pve.node import Connection, Credentials, ProxmoxNode
from safety.classify import Source

ROOT = Path(__file__).resolve().parent.parent
LATENCY = 0.05
_TMP: list[Path] = []  # the run's scratch directory, made at first use (an import makes none)


def scratch() -> Path:
    """The run's scratch directory (fakepve's certificate, the guest lists): made once, removed at exit."""
    if not _TMP:
        path = Path(tempfile.mkdtemp(prefix="bench-executor-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _TMP.append(path)
    return _TMP[0]


@contextmanager
def process(args: list[str], pattern: str) -> Iterator[str]:
    """A server process; yields the first match of ``pattern`` in its output; SIGTERM on exit."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            found = re.search(pattern, line)
            if found:
                break
        else:
            raise RuntimeError(f"{args[:3]} did not start")
        yield found.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@contextmanager
def fake(guests: list[dict[str, object]], latency: float = 0.0, time_scale: float = 0.0) -> Iterator[int]:
    """fakepve in its own process with these guests; yields its port."""
    from fakepve.certs import make_cert  # noqa: PLC0415 (a bench/test dependency only)

    cert, key, _ = make_cert(str(scratch()), hosts=("127.0.0.1",))
    spec = scratch() / f"guests-{len(guests)}-{latency}.json"
    spec.write_text(json.dumps({"guests": guests}))
    args = ["-m", "fakepve", str(spec), "--host", "127.0.0.1", "--port", "0", "--time-scale", str(time_scale),
            "--latency", str(latency), "--cert", cert, "--key", key]
    with process(args, r"listening on https://127\.0\.0\.1:(\d+)") as port:
        yield int(port)


@contextmanager
def planner() -> Iterator[str]:
    """The planner in its own process; yields its address."""
    with process(["-m", "planner", "serve", "--listen", "127.0.0.1:0", "--log-format", "json"],
                 r'"address": "([0-9.:]+)"') as address:
        yield address


def node(port: int, ca_file: str | None = None) -> ProxmoxNode:
    """The real adapter on the fake, its CA verified."""
    ca_file = ca_file or str(scratch() / "fakepve.crt")
    return ProxmoxNode(Connection(host="127.0.0.1", port=port, node="pve1", ca_file=ca_file,
                                  credentials=Credentials(user="root@pam", password="secret")))


def engine(port: int, address: str, desired: list[Declared], max_parallel: int, ca_file: str | None = None, *,
           source: Source = Source.LOCAL_FILE) -> Engine:
    """An engine without a journal (the journal has its own benchmark)."""
    reader = node(port, ca_file)
    return assemble(reader=reader, writer=writer_for(reader.session), journal=None, planner=PlannerClient(address),
                    provider=StaticProvider(desired, source=source), queue=GuestQueue(max_parallel),
                    engine=Settings()).engine


def count_requests(run: Engine) -> Counter[str]:
    """The requests the engine's session makes from now on, by method and path shape (login aside)."""
    counted: Counter[str] = Counter()

    def hook(response: object, *_args: object, **_kwargs: object) -> None:
        request = response.request  # type: ignore[attr-defined]
        counted[f"{request.method} {re.sub(r'/[0-9]+/|/UPID:[^/]+/', '/N/', request.path_url.split('?')[0])}"] += 1

    session = run.pve.session._api._store["session"]  # type: ignore[attr-defined]  # proxmoxer's requests session
    session.hooks["response"].append(hook)
    return counted


def limit_seconds(n: int, max_parallel: int) -> float:
    """The computed limit: the two guest lists, then per round of lanes a start and one task poll, 50 ms each."""
    return (2 + 2 * -(-n // max_parallel)) * LATENCY


def converge_seconds(n: int, address: str, max_parallel: int, source: Source = Source.LOCAL_FILE) -> tuple[float, int]:
    """Wall time of one tick starting n stopped guests, with 50 ms per request; and its requests."""
    guests = [{"vmid": 100 + i, "name": f"vm{i}", "status": "stopped"} for i in range(n)]
    with fake(guests, latency=LATENCY, time_scale=1.0) as port:
        run = engine(port, address, [Declared(vmid=100 + i, state="running") for i in range(n)], max_parallel,
                     source=source)
        requests = count_requests(run)
        started = time.perf_counter()
        summary = run.tick(wait=True)
        elapsed = time.perf_counter() - started
        assert summary.succeeded == n, summary
        run.queue.close(5)
        run.close()
    return elapsed, sum(requests.values())


def no_drift_tick(n: int, address: str) -> tuple[float, float]:
    """Median tick time over n in-sync guests with managed config, and median time of its reads alone."""
    guests = [{"vmid": 100 + i, "name": f"vm{i}", "status": "running", "config": {"memory": 2048, "cores": 2}}
              for i in range(n)]
    desired = [Declared(vmid=100 + i, state="running", config={"memory": "2048", "cores": "2"}) for i in range(n)]
    with fake(guests) as port:
        run = engine(port, address, desired, 8)
        pve = run.pve
        readers = ThreadPoolExecutor(max_workers=8)

        def reads_only() -> None:
            listed = pve.guests()
            list(readers.map(lambda g: pve.config(g.type, g.vmid), listed))

        ticks, reads = [], []
        for _ in range(3):
            started = time.perf_counter()
            assert run.tick(wait=True).queued == 0
            ticks.append(time.perf_counter() - started)
            started = time.perf_counter()
            reads_only()
            reads.append(time.perf_counter() - started)
        run.close()
        readers.shutdown()
    return statistics.median(ticks), statistics.median(reads)


def rss_child(port: int, address: str, n: int, ca_file: str) -> None:
    """In a child process: one tick over n guests, then print peak RSS in MB."""
    desired = [Declared(vmid=100 + i, state="running", config={"memory": "2048", "cores": "2"}) for i in range(n)]
    run = engine(port, address, desired, 8, ca_file)
    assert run.tick(wait=True).queued == 0
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM"))
    print(hwm / 1024)


def rss(n: int, address: str) -> float:
    """Peak RSS of a process running the executor's tick over n guests."""
    guests = [{"vmid": 100 + i, "name": f"vm{i}", "status": "running", "config": {"memory": 2048, "cores": 2}}
              for i in range(n)]
    with fake(guests) as port:
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(port), address, str(n),
                              str(scratch() / "fakepve.crt")], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main() -> int:
    """Run the three measurements and print a table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--guests", type=int, default=200)
    parser.add_argument("--reads", type=int, default=1000)
    parser.add_argument("--rss", type=int, default=10_000)
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logs.configure("json", stream=sys.stderr, level=logging.WARNING)
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1], int(args.rss_child[2]), args.rss_child[3])
        return 0
    with planner() as address:
        eight, eight_requests = converge_seconds(args.guests, address, 8)
        one, one_requests = converge_seconds(args.guests, address, 1)
        hub, hub_requests = converge_seconds(args.guests, address, 8, Source.HUB)
        tick, reads = no_drift_tick(args.reads, address)
        peak = rss(args.rss, address)
    print("| measure | figure | target |")
    print("|---|---:|---|")
    limit8, limit1 = limit_seconds(args.guests, 8), limit_seconds(args.guests, 1)
    print(f"| converge {args.guests} guests, 50 ms/request, --max-parallel 8 | {eight:.2f} s = {eight / limit8:.2f}× "
          f"the limit ({limit8:.2f} s); {eight_requests} requests | ≤ 1.2× |")
    print(f"| same, --max-parallel 1 | {one:.1f} s = {one / eight:.1f}× slower ({one / limit1:.2f}× its limit, "
          f"{limit1:.1f} s); {one_requests} requests | ≥ 5× |")
    print(f"| same, --max-parallel 8, desired state from a hub | {hub:.2f} s = {hub / limit8:.2f}× the limit; "
          f"{hub_requests} requests | ≤ 1.2× |")
    print(f"| tick over {args.reads:,} in-sync guests / its reads alone | {tick:.2f} s / {reads:.2f} s "
          f"= {tick / reads:.2f}× | ≤ 1.2× |")
    print(f"| executor peak RSS, tick over {args.rss:,} guests | {peak:.0f} MB | ≤ 150 MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
