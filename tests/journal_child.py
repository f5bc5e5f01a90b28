"""Child process for the crash tests: appends in a loop, reporting each acknowledged step, until killed.

Usage: python -m tests.journal_child DIR PREFIX [DIE_AT]. Prints, flushed, once the call returned
(so the parent knows exactly what was acknowledged):

- ``B op key at``: ``begin`` returned (key ``-`` for none; ``at`` the record's time);
- ``E op``: ``end`` returned;
- ``R? key reason`` before a refusal is journaled, ``R key reason`` once it returned.

The steps mix unkeyed operations, ordinary one-shot keys ended ok, burn keys (``op:``) ended
failed, ok and unknown, and refusals whose reason changes; the clock is set back an hour now and
then. With DIE_AT (one of ``DIE_POINTS``), the child SIGKILLs itself at that point of its first
compaction, after printing ``DIE point``: a real kill at an instant a timer rarely hits.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from journal import Journal, Outcome, segments

REASONS = ("APPROVAL_REQUIRED", "TOO_MANY_STOPS", "OUT_OF_SCOPE")
DIE_POINTS = ("snapshot-half-written", "before-rename", "after-rename", "before-removing-old")


class Clock:
    """The child's clock: real time, set back an hour on some steps (high_water must not follow it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def die(point: str) -> None:
    """Report the point, then SIGKILL this process."""
    print(f"DIE {point}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def die_in_compaction(point: str) -> None:
    """Arrange a SIGKILL at ``point`` of the next compaction (wrapping the segment functions it calls)."""
    rotate, write, fsync_dir, remove_before, rename = (segments.rotate, segments._pwrite_all, segments.fsync_dir,
                                                      segments.remove_before, os.rename)
    rotating = False

    def in_rotate(*args: Any) -> segments.ActiveSegment:
        nonlocal rotating
        rotating = True
        try:
            return rotate(*args)
        finally:
            rotating = False

    def half_write(fd: int, data: bytes, offset: int) -> None:
        if rotating and point == "snapshot-half-written":
            write(fd, data[:len(data) // 2], offset)
            die(point)
        write(fd, data, offset)

    def before_rename(src: Any, dst: Any) -> None:
        if rotating and point == "before-rename":
            die(point)
        rename(src, dst)

    def after_rename(directory: Path) -> None:
        if rotating and point == "after-rename":
            die(point)
        fsync_dir(directory)

    def before_removing(*args: Any) -> None:
        if point == "before-removing-old":
            die(point)
        remove_before(*args)

    patches: dict[str, Callable[..., Any]] = {"rotate": in_rotate, "_pwrite_all": half_write,
                                              "fsync_dir": after_rename, "remove_before": before_removing}
    for name, function in patches.items():
        setattr(segments, name, function)
    setattr(os, "rename", before_rename)  # noqa: B010 (mypy: os.rename's full signature)


def step(journal: Journal, clock: Clock, prefix: str, i: int) -> None:
    """One unit of work, reported as it is acknowledged."""
    clock.now = time.time() - (3600.0 if i % 7 == 5 else 0.0)
    shape = i % 6
    if shape == 5:
        refusal, reason = f"{100 + i % 4}:stop:{i % 3}", REASONS[(i // 6) % 3]
        print(f"R? {refusal} {reason}", flush=True)
        journal.refuse_if_new(vmid=100 + i % 4, kind="stop", reason=reason, detail=f"step {i}", key=refusal)
        print(f"R {refusal} {reason}", flush=True)
        return
    key = {1: f"{prefix}-{i}", 2: f"op:{prefix}-{i}", 4: f"op:{prefix}-{i}"}.get(shape)
    outcome = {2: Outcome.FAILED, 4: (Outcome.OK, Outcome.UNKNOWN)[i % 2]}.get(shape, Outcome.OK)
    op = journal.begin(vmid=100 + i % 50, kind="snapshot", payload={"name": f"{prefix}-{i}", "pad": "x" * (i % 97)},
                       key=key)
    print(f"B {op} {key or '-'} {clock.now!r}", flush=True)
    if i % 3:
        journal.task(op, f"UPID:pve:{i:08X}:00000000:00000000:qmsnapshot:{100 + i % 50}:root@pam:")
    journal.end(op, outcome, "" if outcome is Outcome.OK else "storage gone")
    print(f"E {op}", flush=True)


def main() -> None:
    """Append until killed."""
    directory, prefix = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        die_in_compaction(sys.argv[3])
    clock = Clock()
    journal = Journal.open(directory, segment_bytes=8192, clock=clock)
    print("READY", flush=True)
    i = 0
    while True:
        step(journal, clock, prefix, i)
        i += 1


if __name__ == "__main__":
    main()
