"""The hub's store: append and read back a 10,000-guest desired-state document, SQLite and PostgreSQL side by side.

Usage: python bench/bench_hub_store.py [--guests 10000] [--reps 10]

Builds a desired file for one cluster of ``--guests`` guests on 5 nodes (~190 bytes of YAML each),
wraps it as a DSSE envelope (base64 payload, one Ed25519-sized signature), then for each store:
appends it ``--reps`` times (each a new version, committed durably: SQLite synchronous=FULL,
PostgreSQL with fsync on), reads the latest back (get), and measures how long a waiter on another
store object (another replica) takes to wake after an append returns. PostgreSQL is a real server
started from initdb in a temp dir (durable settings) and stopped by PID. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hub.store import PostgresStore, SqliteStore, Store
from tests import pgserver

CLUSTER = "bench"


def desired_yaml(guests: int) -> bytes:
    """A desired file for one cluster: ``guests`` guests spread over 5 nodes, each with a typical config."""
    lines = ["guests:"]
    for n in range(guests):
        vmid = 100 + n
        lines += [f"  - vmid: {vmid}", f"    node: pve{n % 5 + 1}", "    state: running", "    config:",
                  f"      memory: {2048 * (1 + n % 4)}", f"      cores: {1 + n % 8}", "      onboot: true",
                  f'      tags: "tenant{n % 97};prod"', f'      net0: "virtio,bridge=vmbr0,tag={100 + n % 400}"']
    return ("\n".join(lines) + "\n").encode()


def envelope(desired: bytes) -> bytes:
    """A DSSE envelope of a desired document holding ``desired`` (random signature: the store never reads it)."""
    payload = json.dumps({"cluster": CLUSTER, "version": 1, "role": "operators", "author": "bench",
                          "message": "apply", "created": int(time.time()), "previous_sha256": "",
                          "desired": desired.decode()}).encode()
    return json.dumps({"payloadType": "application/vnd.pve-reconcile.desired.v1+json",
                       "payload": base64.b64encode(payload).decode(),
                       "signatures": [{"keyid": "SHA256:bench", "sig": base64.b64encode(os.urandom(64)).decode()}]
                       }).encode()


def timed(call: Callable[[], object], reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls."""
    out = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def wake_latency(watcher: Store, writer: Store, data: bytes) -> float:
    """Milliseconds from an append's return (on ``writer``) to the wake of a waiter on ``watcher``."""
    latest, woke = writer.latest(CLUSTER), []
    thread = threading.Thread(target=lambda: woke.append((watcher.wait_for_change(CLUSTER, latest, 10),
                                                          time.perf_counter())))
    thread.start()
    time.sleep(0.3)  # asleep
    writer.append(CLUSTER, latest, data, "bench", "wake")
    appended = time.perf_counter()
    thread.join()
    assert woke and woke[0][0], "the waiter was not woken"
    return (woke[0][1] - appended) * 1000


def measure(name: str, open_store: Callable[[], Store], data: bytes, reps: int) -> dict[str, object]:
    """Append ``reps`` versions of ``data``, get the latest ``reps`` times, and time 5 wakes."""
    store, other = open_store(), open_store()
    try:
        appends = timed(lambda: store.append(CLUSTER, store.latest(CLUSTER), data, "bench", "apply"), reps)
        got = store.get(CLUSTER)
        assert got is not None and got.envelope == data
        gets = timed(lambda: store.get(CLUSTER), reps)
        wakes = [wake_latency(other, store, data) for _ in range(5)]
    finally:
        store.close()
        other.close()
    return {"store": name, "append": appends, "get": gets, "wake": wakes}


@contextmanager
def sqlite_store(root: Path) -> Iterator[Callable[[], Store]]:
    """Stores on one SQLite file in ``root``."""
    yield lambda: SqliteStore.in_dir(root / "sqlite")


@contextmanager
def postgres_store() -> Iterator[Callable[[], Store]]:
    """Stores (replicas) on a durable PostgreSQL server started for the run."""
    server = pgserver.start(durable=True)
    try:
        conninfo = server.create_database("hub_bench")
        yield lambda: PostgresStore(conninfo)
    finally:
        pgserver.stop(server)


def row(result: dict[str, object]) -> str:
    """A Markdown table row: medians and worst of append and get, median and worst wake."""
    def fmt(key: str) -> str:
        values = result[key]
        assert isinstance(values, list)
        return f"{statistics.median(values):.1f} / {max(values):.1f}"
    return f"| {result['store']} | {fmt('append')} | {fmt('get')} | {fmt('wake')} |"


def main() -> None:
    """Run both stores, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # warnings and up only
    yaml, started = desired_yaml(args.guests), time.perf_counter()
    data = envelope(yaml)
    print(f"document: {args.guests} guests, YAML {len(yaml) / 1e6:.2f} MB, DSSE envelope {len(data) / 1e6:.2f} MB "
          f"(built in {time.perf_counter() - started:.2f} s); {args.reps} appends and gets per store\n")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-hub-store-") as tmp:
        with sqlite_store(Path(tmp)) as open_sqlite:
            results.append(measure("SQLite (WAL, synchronous=FULL)", open_sqlite, data, args.reps))
        with postgres_store() as open_pg:
            results.append(measure("PostgreSQL 15 (fsync on, unix socket)", open_pg, data, args.reps))
    print("| store | append ms (median / max) | get latest ms (median / max) | wake of another replica ms "
          "(median / max) |")
    print("|---|---|---|---|")
    for result in results:
        print(row(result))


if __name__ == "__main__":
    main()
