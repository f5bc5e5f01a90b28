"""Segment files on disk: naming, locking, recovery, durable writes and rotation.

Files are ``journal-NNNNNNNN.log`` in ascending order; only the last one is written to.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path

from journal.errors import JournalCorruptError
from journal.records import Record, scan

PREFIX, SUFFIX, TMP = "journal-", ".log", ".tmp"
PROBE_BYTES = 64 * 1024


def name(sequence: int) -> str:
    """File name of segment ``sequence``."""
    return f"{PREFIX}{sequence:08d}{SUFFIX}"


def fsync_dir(directory: Path) -> None:
    """Make a create, rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def close_quietly(fd: int) -> None:
    """Close ``fd`` if it is open."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def lock(directory: Path) -> int:
    """Take the directory's exclusive lock (BlockingIOError when another process holds it)."""
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def check_space(directory: Path) -> None:
    """Fail now, not on the first append, when the disk cannot take a few records."""
    probe = directory / ".probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, PROBE_BYTES)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def sequences(directory: Path) -> list[int]:
    """Sequence numbers of the segments present, ascending."""
    found = []
    for entry in directory.iterdir():
        stem = entry.name
        if stem.startswith(PREFIX) and stem.endswith(SUFFIX):
            digits = stem[len(PREFIX):-len(SUFFIX)]
            if digits.isdigit():
                found.append(int(digits))
    return sorted(found)


def recover(directory: Path) -> tuple[list[Record], int]:
    """Every record of every segment, in order, and the last segment's sequence (1 when none).

    A torn tail of the last segment (a crash mid-append: nothing valid after it) is truncated.
    Any other damage raises JournalCorruptError after copying the file aside.
    """
    for leftover in directory.glob(f"{PREFIX}*{TMP}"):
        leftover.unlink()  # an unfinished compaction: the old segments are still complete
    present = sequences(directory)
    records: list[Record] = []
    for sequence in present:
        path = directory / name(sequence)
        data = path.read_bytes()
        found, bad, valid_after = scan(data)
        if bad is not None:
            if valid_after or sequence != present[-1]:
                copy = f"{path}.corrupt-{int(time.time())}"
                shutil.copyfile(path, copy)
                raise JournalCorruptError(str(path), bad.offset, copy, bad.reason)
            _truncate(path, bad.offset)
        records.extend(found)
    return records, present[-1] if present else 1


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def open_active(directory: Path, sequence: int) -> tuple[int, int]:
    """Open segment ``sequence`` for appending (creating it durably); return fd and size."""
    path = directory / name(sequence)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    if created:
        fsync_dir(directory)
    return fd, os.fstat(fd).st_size


def write_all(fd: int, data: bytes) -> int:
    """Write every byte and ``fdatasync``; return the byte count."""
    view, written = memoryview(data), 0
    while written < len(data):
        written += os.write(fd, view[written:])
    os.fdatasync(fd)
    return written


def rotate(directory: Path, sequence: int, snapshot: bytes) -> tuple[int, int]:
    """Create segment ``sequence`` holding ``snapshot``, atomically and durably; return fd and size."""
    final = directory / name(sequence)
    tmp = final.with_name(final.name + TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, snapshot)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    fsync_dir(directory)
    return os.open(final, os.O_WRONLY | os.O_APPEND), len(snapshot)


def remove_before(directory: Path, sequence: int) -> None:
    """Delete the segments older than ``sequence`` (they are folded into it) durably."""
    for old in sequences(directory):
        if old < sequence:
            (directory / name(old)).unlink(missing_ok=True)
    fsync_dir(directory)


