"""Journal speed and memory, on the disk of the directory given (default: a temp dir under bench/).

Usage: python bench/bench_journal.py [--dir DIR] [--seconds 3]

Measures, in one run on the same disk: (1) the raw rate of ``os.write`` + ``os.fdatasync`` of a
record-sized buffer, (2) durable appends/s with one writer, (3) with 16 concurrent writers (group
commit), (4) reopen time of a journal holding 1,000,000 records, (5) RSS of a process holding
100,000 idempotency keys. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from journal import Journal, Outcome
from journal.records import Applied, Begun, Ended, TaskStarted, encode
from journal.segments import name

PAYLOAD = {"set": {"memory": "4096", "cores": "2", "onboot": "1"}, "digest": "3f2a" * 10}


def raw_rate(directory: Path, seconds: float, size: int, prezeroed: bool = False) -> float:
    """write+fdatasync per second of a ``size``-byte buffer appended to a file (the target's floor).

    With ``prezeroed``, the same writes overwrite a file already zero-filled and synced, which is
    how the journal's active segment writes: the ceiling of that technique on this disk.
    """
    fd = os.open(directory / "raw", os.O_WRONLY | os.O_CREAT | (0 if prezeroed else os.O_APPEND), 0o600)
    if prezeroed:
        os.write(fd, bytes(64 * 1024 * 1024))
        os.fsync(fd)
    data, count, deadline = b"x" * size, 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        os.pwrite(fd, data, count * size) if prezeroed else os.write(fd, data)
        os.fdatasync(fd)
        count += 1
    elapsed = time.perf_counter() - started
    os.close(fd)
    return count / elapsed


def append_rate(directory: Path, seconds: float, writers: int) -> tuple[float, float, float]:
    """Durable ``begin`` calls per second with ``writers`` threads, records per sync, CPU use (1.0 = a core)."""
    with Journal.open(directory, segment_bytes=1 << 30) as journal:
        counts = [0] * writers
        stop = time.perf_counter() + seconds

        def run(slot: int) -> None:
            while time.perf_counter() < stop:
                journal.begin(vmid=100 + slot, kind="set_config", payload=PAYLOAD)
                counts[slot] += 1

        started, cpu = time.perf_counter(), time.process_time()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        appends, syncs = journal.stats
    return sum(counts) / elapsed, appends / max(syncs, 1), cpu / elapsed


def million_records(directory: Path) -> int:
    """Write a segment of 1,000,000 records (begun/task/ended triples) directly; return its size."""
    chunks = []
    for i in range(333_334):
        op, at = f"{i:032x}", 1.7e9 + i
        chunks.append(encode(Begun(op_id=op, vmid=100 + i % 1000, kind="set_config", payload=PAYLOAD, key=None, at=at)))
        chunks.append(encode(TaskStarted(op_id=op, upid=f"UPID:pve1:{i:08X}:00C3D4E5:6560F00D:qmconfig:100:root@pam:",
                                         at=at)))
        chunks.append(encode(Ended(op_id=op, outcome=Outcome.OK, error="", at=at)))
    data = b"".join(chunks[:1_000_000])
    (directory / name(1)).write_bytes(data)
    return len(data)


def reopen_seconds(directory: Path) -> float:
    """Wall time of Journal.open on the million-record journal."""
    started = time.perf_counter()
    Journal.open(directory, segment_bytes=1 << 40).close()
    return time.perf_counter() - started


def keys_rss_mb(directory: Path) -> tuple[float, float]:
    """RSS and peak RSS (MB) of a fresh process that opened a journal holding 100,000 keys."""
    chunks = [encode(Applied(key=f"snapshot-{i}-pre-upgrade", payload_hash=i.to_bytes(32, "big"), op_id=f"{i:032x}",
                             outcome=Outcome.OK, at=time.time())) for i in range(100_000)]
    (directory / name(1)).write_bytes(b"".join(chunks))
    probe = (
        "import sys; sys.path.insert(0, sys.argv[2]); from journal import Journal; j = Journal.open(sys.argv[1]); "
        "assert j.already_applied('snapshot-99999-pre-upgrade'); import gc; gc.collect(); "
        "print(*(l.split()[1] for l in open('/proc/self/status') if l.startswith(('VmRSS', 'VmHWM'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(directory), str(Path(__file__).resolve().parent.parent)],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[1]) / 1024, int(out[0]) / 1024


def main() -> int:
    """Run every measurement and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: under bench/)")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=args.dir or Path(__file__).parent))
    try:
        fresh = iter(range(20))

        def workdir() -> Path:
            path = base / str(next(fresh))
            path.mkdir()
            return path

        record_size = len(encode(Begun(op_id="0" * 32, vmid=100, kind="set_config", payload=PAYLOAD, key=None,
                                       at=time.time())))
        raw = raw_rate(workdir(), args.seconds, record_size)
        overwrite = raw_rate(workdir(), args.seconds, record_size, prezeroed=True)
        one, _, _ = append_rate(workdir(), args.seconds, 1)
        many, per_sync, cpu = append_rate(workdir(), args.seconds, 16)
        million = workdir()
        size = million_records(million)
        reopen = reopen_seconds(million)
        rss, peak = keys_rss_mb(workdir())
    finally:
        shutil.rmtree(base)
    print("| measure | figure | target |")
    print("|---|---:|---|")
    print(f"| raw write+fdatasync, appending ({record_size} B) | {raw:,.0f}/s | (the floor) |")
    print(f"| raw pwrite+fdatasync into a pre-zeroed file | {overwrite:,.0f}/s | (the journal's technique) |")
    print(f"| durable appends, 1 writer | {one:,.0f}/s = {one / raw:.0%} of raw appending, "
          f"{one / overwrite:.0%} of pre-zeroed | ≥ 70% of raw |")
    print(f"| durable appends, 16 writers | {many:,.0f}/s = {many / one:.1f}× 1 writer "
          f"({per_sync:.1f} records per sync, CPU {cpu:.0%} of a core) | ≥ 10× 1 writer |")
    print(f"| reopen, 1,000,000 records ({size / 1e6:.0f} MB) | {reopen:.2f} s | ≤ 5 s |")
    print(f"| RSS holding 100,000 idempotency keys | {rss:.0f} MB (peak {peak:.0f} MB) | ≤ 100 MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
