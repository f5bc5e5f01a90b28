"""StateReports into a real hub over gRPC on loopback: a full report of a node's guests, then small deltas.

Usage: python bench/bench_hub_reports.py [--guests 10000] [--reps 10]

One hub (in this process, real gRPC) per store: SQLite (WAL, synchronous=FULL) and PostgreSQL 15 (a real server
from initdb, fsync on, stopped by PID). A full report carries ``--guests`` guests (one in ten drifted, with a key
and both values), then ``--reps`` deltas of 10 changed guests each; then Status and GetNode of that node are
timed. Prints a Markdown table (milliseconds, median / max) and the full report's size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hub.store import PostgresStore, SqliteStore, Store
from hub.v1 import hub_pb2 as pb
from tests import pgserver
from tests.hub_helpers import running_hub

CLUSTER, NODE = "bench", "pve1@bench"


def guest(vmid: int, drifted: bool) -> pb.GuestState:
    """A guest in sync, or drifted on memory."""
    if not drifted:
        return pb.GuestState(vmid=vmid, name=f"guest-{vmid}", type="qemu", state=pb.SYNC_STATE_IN_SYNC,
                             declared_run_state="running", actual_run_state="running")
    return pb.GuestState(vmid=vmid, name=f"guest-{vmid}", type="qemu", state=pb.SYNC_STATE_DRIFTED,
                         diffs=[pb.KeyDiff(key="memory", declared="4096", actual="2048")],
                         declared_run_state="running", actual_run_state="running")


def report(seq: int, guests: list[pb.GuestState], full: bool) -> pb.StateReport:
    """A report of ``guests``: full, or a delta on top of seq - 1."""
    return pb.StateReport(cluster=CLUSTER, node=NODE, audience=NODE, session="bench", seq=seq,
                          base_seq=0 if full else seq - 1, full=full, guests=guests, interval_seconds=30,
                          tick_outcome="ok", at_unix_ms=int(time.time() * 1000))


def ms(call: Callable[[], object]) -> float:
    """How long ``call`` takes, ms."""
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def measure(store: Store, guests: int, reps: int) -> dict[str, list[float]]:
    """Times of one full report, ``reps`` deltas, Status and GetNode."""
    with running_hub(store) as hub:
        everyone = [guest(100 + n, n % 10 == 0) for n in range(guests)]
        full = report(1, everyone, True)
        times = {"full": [ms(lambda: hub.stub.ReportState(full, timeout=120))], "delta": [], "status": [],
                 "get_node": []}
        for rep in range(reps):
            changed = [guest(100 + n, rep % 2 == 0) for n in range(rep * 10, rep * 10 + 10)]
            request = report(rep + 2, changed, False)
            times["delta"].append(ms(lambda request=request: hub.stub.ReportState(request, timeout=60)))  # type: ignore[misc]
            times["status"].append(ms(lambda: hub.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=60)))
            times["get_node"].append(ms(lambda: hub.stub.GetNode(pb.GetNodeRequest(cluster=CLUSTER, node=NODE),
                                                                 timeout=60)))
        times["size"] = [float(full.ByteSize())]
    return times


@contextmanager
def postgres() -> Iterator[str]:
    """A durable PostgreSQL 15 database, stopped by PID after."""
    server = pgserver.start(durable=True)
    try:
        yield server.create_database("bench_reports")
    finally:
        pgserver.stop(server)


def main() -> None:
    """Run both stores and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        rows.append(("SQLite (WAL, synchronous=FULL)", measure(SqliteStore.in_dir(root), args.guests, args.reps)))
    with postgres() as conninfo:
        rows.append(("PostgreSQL 15 (fsync on)", measure(PostgresStore(conninfo), args.guests, args.reps)))
    print(f"{args.guests} guests (one in ten drifted), full report {rows[0][1]['size'][0] / 1e6:.2f} MB; "
          f"{args.reps} deltas of 10 guests")
    print("| store | full report ms | delta ms (median / max) | Status ms (median / max) | GetNode ms (median / max) |")
    print("|---|---|---|---|---|")
    for name, times in rows:
        cells = [f"{statistics.median(times[k]):.1f} / {max(times[k]):.1f}" for k in ("delta", "status", "get_node")]
        print(f"| {name} | {times['full'][0]:.0f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
