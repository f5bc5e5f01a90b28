"""Segment files on disk: naming, locking, recovery, durable writes and rotation.

Files are ``journal-NNNNNNNN.log`` in ascending order; only the last one is written to.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from journal.errors import JournalCorruptError
from journal.records import Body, scan

PREFIX, SUFFIX, TMP = "journal-", ".log", ".tmp"
PROBE_BYTES = 64 * 1024
PREALLOCATE_BYTES = 1024 * 1024
LOCK_FILE = "LOCK"  # the file a running executor holds an exclusive flock on


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
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
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


def recover(directory: Path, sink: Callable[[Body], None]) -> int:
    """Feed every record of every segment, in order, to ``sink``; return the last sequence (1 when none).

    A torn tail of the last segment (a crash mid-append: nothing valid after it) is truncated, as
    is the run of zeros an active segment keeps ahead of its data (left in an older segment when a
    crash came between a compaction's rename and its clean-up). Any other damage raises
    JournalCorruptError after copying the file aside.
    """
    for leftover in directory.glob(f"{PREFIX}*{TMP}"):
        leftover.unlink()  # an unfinished compaction: the old segments are still complete
    present = sequences(directory)
    for sequence in present:
        path = directory / name(sequence)
        data = path.read_bytes()
        bad, valid_after = scan(data, sink)
        if bad is not None:
            zeros_only = not data[bad.offset:].strip(b"\0")
            if valid_after or (sequence != present[-1] and not zeros_only):
                copy = f"{path}.corrupt-{int(time.time())}"
                shutil.copyfile(path, copy)
                raise JournalCorruptError(str(path), bad.offset, copy, bad.reason)
            _truncate(path, bad.offset)
    return present[-1] if present else 1


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


class ActiveSegment:
    """The segment being appended to, kept ahead of its data by a synced run of zeros.

    Overwriting blocks that already exist lets ``fdatasync`` flush the data alone; appending
    makes every sync also flush the file's new size (here about half the rate). The zeros are
    not records: recovery reads them as the end of the log and truncates them, and ``close``
    trims them.
    """

    def __init__(self, path: Path, fd: int, size: int, ahead: int = PREALLOCATE_BYTES) -> None:
        self.path, self.fd, self.size, self.ahead = path, fd, size, ahead
        self.capacity = size

    @classmethod
    def open(cls, directory: Path, sequence: int) -> ActiveSegment:
        """Open segment ``sequence`` for appending, creating it durably."""
        path = directory / name(sequence)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        if created:
            fsync_dir(directory)
        return cls(path, fd, os.fstat(fd).st_size)

    def append(self, data: bytes) -> None:
        """Write ``data`` after the last record and ``fdatasync``."""
        end = self.size + len(data)
        if end > self.capacity:
            self._extend(end)
        _pwrite_all(self.fd, data, self.size)
        os.fdatasync(self.fd)
        self.size = end

    def _extend(self, end: int) -> None:
        """Make room up to ``end`` and beyond; on a nearly full disk, just up to ``end``."""
        for zeros in (max(self.ahead, end - self.capacity), end - self.capacity):
            try:
                _pwrite_all(self.fd, bytes(zeros), self.capacity)
                os.fdatasync(self.fd)
            except OSError as exc:
                if exc.errno != errno.ENOSPC or zeros == end - self.capacity:
                    raise
                continue
            self.capacity += zeros
            return

    def close(self) -> None:
        """Trim the zeros and close (a failure here leaves only zeros recovery ignores)."""
        try:
            if self.capacity > self.size:
                os.ftruncate(self.fd, self.size)
                os.fdatasync(self.fd)
        except OSError:
            pass
        close_quietly(self.fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view, written = memoryview(data), 0
    while written < len(data):
        written += os.pwrite(fd, view[written:], offset + written)


def rotate(directory: Path, sequence: int, snapshot: bytes) -> ActiveSegment:
    """Create segment ``sequence`` holding ``snapshot``, atomically and durably."""
    final = directory / name(sequence)
    tmp = final.with_name(final.name + TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _pwrite_all(fd, snapshot, 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    fsync_dir(directory)
    return ActiveSegment(final, os.open(final, os.O_WRONLY), len(snapshot))


def remove_before(directory: Path, sequence: int) -> None:
    """Delete the segments older than ``sequence`` (they are folded into it) durably."""
    for old in sequences(directory):
        if old < sequence:
            (directory / name(old)).unlink(missing_ok=True)
    fsync_dir(directory)


