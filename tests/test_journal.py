"""The journal: lifecycle, idempotency, recovery from torn tails and corruption, compaction, failures."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from journal import (
    AlreadyAppliedError,
    IdempotencyConflictError,
    Journal,
    JournalCorruptError,
    JournalError,
    JournalOpenError,
    JournalWriteError,
    KeyInFlightError,
    Outcome,
    OutcomeUnknownError,
)
from journal.segments import name, sequences

UPID = "UPID:pve1:0000A1B2:00C3D4E5:6560F00D:qmstart:100:root@pam:"


@pytest.fixture(name="path")
def _path(tmp_path: Path) -> Path:
    return tmp_path / "journal"


def reopen(path: Path, **options: float) -> Journal:
    return Journal.open(path, **options)  # type: ignore[arg-type]


class Clock:
    """A settable clock for retention."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_lifecycle_records_in_flight_with_upid(path: Path) -> None:
    """begun, then task: in flight with its UPID; ended: gone."""
    with Journal.open(path) as journal:
        op = journal.begin(vmid=100, kind="start", payload={"timeout": 60})
        journal.task(op, UPID)
        (flight,) = journal.in_flight()
        assert (flight.op_id, flight.vmid, flight.kind, flight.upid, dict(flight.payload)) == (
            op, 100, "start", UPID, {"timeout": 60})
        journal.end(op, Outcome.OK)
        assert journal.in_flight() == []
        assert [type(r).__name__ for r in journal.recent()] == ["Begun", "TaskStarted", "Ended"]


def test_in_flight_operations_survive_a_reopen(path: Path) -> None:
    """What was begun and not ended is what the executor re-checks after a restart."""
    with Journal.open(path) as journal:
        done = journal.begin(vmid=100, kind="stop", payload={})
        journal.end(done, Outcome.FAILED, "VM 100 not running")
        waiting = journal.begin(vmid=101, kind="start", payload={})
        journal.task(waiting, UPID)
        no_upid = journal.begin(vmid=102, kind="set_config", payload={"memory": "4096"})
    with Journal.open(path) as journal:
        assert [(f.op_id, f.upid) for f in journal.in_flight()] == [(waiting, UPID), (no_upid, None)]


def test_task_or_end_of_an_unknown_operation_is_an_error(path: Path) -> None:
    """A UPID or an end for an operation that is not in flight is a caller bug, reported."""
    with Journal.open(path) as journal, pytest.raises(JournalError, match="not in flight"):
        journal.end("nope", Outcome.OK)


def test_keyed_operation_is_applied_across_restart(path: Path) -> None:
    """A one-shot op that ended ok is already applied after reopen, and cannot begin again."""
    with Journal.open(path) as journal:
        op = journal.begin(vmid=100, kind="snapshot", payload={"name": "pre-upgrade"}, key="snap-100-pre")
        assert not journal.already_applied("snap-100-pre")
        journal.end(op, Outcome.OK)
    with Journal.open(path) as journal:
        assert journal.already_applied("snap-100-pre", {"name": "pre-upgrade"})
        with pytest.raises(AlreadyAppliedError):
            journal.begin(vmid=100, kind="snapshot", payload={"name": "pre-upgrade"}, key="snap-100-pre")


def test_idempotency_refusals(path: Path) -> None:
    """Empty keys, other payloads, keys in flight and unknown outcomes are refused, never skipped."""
    with Journal.open(path) as journal:
        with pytest.raises(ValueError, match="empty"):
            journal.already_applied("")
        with pytest.raises(ValueError, match="empty"):
            journal.begin(vmid=100, kind="snapshot", payload={}, key="")
        op = journal.begin(vmid=100, kind="snapshot", payload={"name": "a"}, key="k")
        with pytest.raises(KeyInFlightError):
            journal.begin(vmid=100, kind="snapshot", payload={"name": "a"}, key="k")
        with pytest.raises(IdempotencyConflictError):
            journal.begin(vmid=100, kind="snapshot", payload={"name": "b"}, key="k")
        journal.end(op, Outcome.UNKNOWN)
        with pytest.raises(OutcomeUnknownError):
            journal.begin(vmid=100, kind="snapshot", payload={"name": "a"}, key="k")
        with pytest.raises(IdempotencyConflictError):
            journal.already_applied("k", {"name": "b"})
        assert not journal.already_applied("k", {"name": "a"})


def test_failed_one_shot_may_run_again(path: Path) -> None:
    """A keyed op that failed is not applied: it may be begun again."""
    with Journal.open(path) as journal:
        op = journal.begin(vmid=100, kind="snapshot", payload={}, key="k")
        journal.end(op, Outcome.FAILED, "storage full")
        assert not journal.already_applied("k")
        journal.end(journal.begin(vmid=100, kind="snapshot", payload={}, key="k"), Outcome.OK)
        assert journal.already_applied("k")


def test_keys_expire_after_the_retention_window(path: Path) -> None:
    """Idempotency is kept for the configured window, then forgotten."""
    clock = Clock()
    with Journal.open(path, retention=3600, clock=clock) as journal:
        journal.end(journal.begin(vmid=100, kind="snapshot", payload={}, key="k"), Outcome.OK)
        clock.now += 3599
        assert journal.already_applied("k")
        clock.now += 2
        assert not journal.already_applied("k")


def _write_ops(path: Path, count: int) -> list[str]:
    with Journal.open(path) as journal:
        return [journal.begin(vmid=100 + i, kind="start", payload={"i": i}) for i in range(count)]


def test_torn_tail_is_truncated_at_every_offset_of_the_last_record(path: Path) -> None:
    """A crash mid-append leaves a partial last record: it is dropped, everything before it kept."""
    ops = _write_ops(path, 3)
    segment = path / name(sequences(path)[-1])
    whole = segment.read_bytes()
    with Journal.open(path) as journal:
        journal.begin(vmid=999, kind="stop", payload={"x": "y" * 50})
    last = segment.read_bytes()[len(whole):]
    for cut in range(len(last)):
        segment.write_bytes(whole + last[:cut])
        with Journal.open(path) as journal:
            assert [f.op_id for f in journal.in_flight()] == ops, cut
        assert segment.read_bytes() == whole, cut


def test_corruption_in_the_middle_is_an_error_naming_file_and_offset(path: Path) -> None:
    """A damaged record followed by valid ones is never skipped: error, file and offset, copy kept."""
    _write_ops(path, 5)
    segment = path / name(sequences(path)[-1])
    data = bytearray(segment.read_bytes())
    offset = len(data) // 2
    data[offset] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError) as info:
        Journal.open(path)
    assert info.value.path == str(segment)
    assert 0 < info.value.offset <= offset
    assert Path(info.value.copy).read_bytes() == bytes(data)
    assert segment.read_bytes() == bytes(data)  # nothing repaired behind the operator's back
    assert str(segment) in str(info.value) and str(info.value.offset) in str(info.value)


def test_zeros_left_in_an_older_segment_are_not_corruption(path: Path) -> None:
    """A crash between a compaction's rename and its clean-up leaves the old segment's zero run."""
    ops = _write_ops(path, 3)
    old = path / name(1)
    old.write_bytes(old.read_bytes() + bytes(4096))
    (path / name(2)).write_bytes(b"")
    with Journal.open(path) as journal:
        assert [f.op_id for f in journal.in_flight()] == ops
    old.write_bytes(old.read_bytes() + b"garbage" + bytes(100))
    with pytest.raises(JournalCorruptError):
        Journal.open(path)


def test_concurrent_appends_are_safe_and_group_committed(path: Path) -> None:
    """16 threads appending at once: every record lands, in fewer syncs than records."""
    with Journal.open(path) as journal:
        acked: list[str] = []

        def writer(w: int) -> None:
            for i in range(50):
                op = journal.begin(vmid=100 + w, kind="start", payload={"i": i})
                journal.end(op, Outcome.OK)
                acked.append(op)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        appends, syncs = journal.stats
        assert appends == 16 * 50 * 2
        assert syncs < appends
    with Journal.open(path, keep_recent=10_000) as journal:
        ended = {r.op_id for r in journal.recent(10_000) if type(r).__name__ == "Ended"}
        assert ended == set(acked)


def test_compaction_keeps_what_recovery_and_idempotency_need(path: Path) -> None:
    """With small segments the journal stays small and keeps in-flight ops and live keys."""
    clock = Clock()
    with Journal.open(path, segment_bytes=4096, retention=100, clock=clock) as journal:
        old_key = journal.begin(vmid=100, kind="snapshot", payload={}, key="old")
        journal.end(old_key, Outcome.OK)
        clock.now += 200  # "old" is now out of the window
        keep = journal.begin(vmid=101, kind="start", payload={})
        journal.task(keep, UPID)
        journal.end(journal.begin(vmid=102, kind="snapshot", payload={}, key="fresh"), Outcome.OK)
        for i in range(500):
            journal.end(journal.begin(vmid=103, kind="start", payload={"i": i}), Outcome.OK)
    assert len(sequences(path)) == 1
    assert (path / name(sequences(path)[0])).stat().st_size <= 4096 * 2
    with Journal.open(path, retention=100, clock=clock) as journal:
        assert [(f.op_id, f.upid) for f in journal.in_flight()] == [(keep, UPID)]
        assert journal.already_applied("fresh")
        assert not journal.already_applied("old")


def test_a_crash_during_compaction_loses_nothing(path: Path) -> None:
    """A half-written snapshot is discarded; old and new segments side by side replay as one."""
    ops = _write_ops(path, 3)
    (path / (name(2) + ".tmp")).write_bytes(b"\xa5J partial")
    with Journal.open(path) as journal:
        assert [f.op_id for f in journal.in_flight()] == ops
    (path / name(2)).write_bytes((path / name(1)).read_bytes())  # rename done, old not yet removed
    with Journal.open(path) as journal:
        assert [f.op_id for f in journal.in_flight()] == ops


@contextlib.contextmanager
def tiny_filesystem(tmp_path: Path, size: str = "256k") -> Iterator[Path]:
    """A real, small tmpfs, so the disk really fills up (needs root to mount)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                            capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_failed_write_poisons_the_journal(tmp_path: Path) -> None:
    """Disk full mid-run: that append fails, and every later one is refused, even after space frees."""
    with tiny_filesystem(tmp_path) as mount, Journal.open(mount / "journal") as journal:
        with pytest.raises(JournalWriteError):
            for i in range(100_000):
                journal.begin(vmid=100, kind="set_config", payload={"i": i, "pad": "x" * 500})
        assert journal.failed
        for leftover in (mount / "journal").glob("*.log"):
            os.truncate(leftover, 0)
        with pytest.raises(JournalWriteError, match="failed earlier"):
            journal.begin(vmid=100, kind="start", payload={})


def test_open_failures_are_clear_errors(tmp_path: Path) -> None:
    """Not a directory, a full disk, or a journal in use: JournalOpenError saying which."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(JournalOpenError, match="cannot open journal"):
        Journal.open(blocker / "journal")
    with Journal.open(tmp_path / "j"), pytest.raises(JournalOpenError, match="in use"):
        Journal.open(tmp_path / "j")
    with tiny_filesystem(tmp_path, "64k") as mount:
        (mount / "filler").write_bytes(b"\0" * (64 * 1024 - 4096))
        with pytest.raises(JournalOpenError, match="No space left"):
            Journal.open(mount / "journal")
