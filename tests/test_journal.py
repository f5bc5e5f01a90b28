"""The journal: lifecycle, idempotency, recovery from torn tails and corruption, compaction, failures."""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from journal import (
    AlreadyAppliedError,
    Applied,
    Begun,
    Ended,
    IdempotencyConflictError,
    Journal,
    JournalCorruptError,
    JournalError,
    JournalOpenError,
    JournalWriteError,
    KeyInFlightError,
    NonceSpentError,
    Outcome,
    OutcomeUnknownError,
    Record,
    RefusalRecord,
    TaskStarted,
    segments,
)
from journal.records import encode
from journal.segments import name, sequences
from tests.tmpfs import tiny_filesystem

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
    """A keyed op that failed is not applied: it may be begun again (an ordinary key, not an ``op:`` one)."""
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


# --- burn keys: the nonces of signed operations -------------------------------------------------

def _fill(journal: Journal, count: int) -> None:
    """Unkeyed operations begun and ended: enough of them make a small journal compact."""
    for i in range(count):
        journal.end(journal.begin(vmid=900, kind="start", payload={"i": i}), Outcome.OK)


@pytest.mark.parametrize("outcome", list(Outcome))
def test_a_spent_nonce_is_refused_whatever_the_outcome(path: Path, outcome: Outcome) -> None:
    """An ``op:`` key is spent by its begin: after ok, failed or unknown it never begins again, even after reopen."""
    with Journal.open(path) as journal:
        op = journal.begin(vmid=100, kind="destroy", payload={"purge": 1}, key="op:n1")
        journal.end(op, outcome, "" if outcome is Outcome.OK else "storage gone")
        for payload in ({"purge": 1}, {"purge": 0}):  # another payload does not make it fresh
            with pytest.raises(NonceSpentError) as info:
                journal.begin(vmid=100, kind="destroy", payload=payload, key="op:n1")
            assert (info.value.key, info.value.op_id, info.value.outcome) == ("op:n1", op, outcome)
    with Journal.open(path) as journal:
        with pytest.raises(NonceSpentError) as info:
            journal.begin(vmid=100, kind="destroy", payload={"purge": 1}, key="op:n1")
        assert info.value.outcome is outcome
        with pytest.raises(NonceSpentError):
            journal.check_key("op:n1")
        assert journal.already_applied("op:n1") is (outcome is Outcome.OK)
        assert journal.in_flight() == []


def test_a_nonce_in_flight_is_refused_as_in_flight_then_spent(path: Path) -> None:
    """While its op runs (also across a restart) an ``op:`` key is in flight; once ended, it is spent."""
    with Journal.open(path) as journal:
        op = journal.begin(vmid=100, kind="detach", payload={"key": "scsi1"}, key="op:n2")
        with pytest.raises(KeyInFlightError):
            journal.begin(vmid=100, kind="detach", payload={"key": "scsi2"}, key="op:n2")
        with pytest.raises(KeyInFlightError):
            journal.check_key("op:n2")
    with Journal.open(path) as journal:
        (flight,) = journal.in_flight()
        assert (flight.op_id, flight.key) == (op, "op:n2")
        with pytest.raises(KeyInFlightError):
            journal.begin(vmid=100, kind="detach", payload={"key": "scsi1"}, key="op:n2")
        journal.end(op, Outcome.FAILED, "not applied")  # what recovery writes after a crash before the call
        with pytest.raises(NonceSpentError):
            journal.begin(vmid=100, kind="detach", payload={"key": "scsi1"}, key="op:n2")


def test_two_begins_under_one_op_id_at_once_refuse_the_second_and_the_journal_stays(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two signed ops under one op id (each its own nonce) begin at once: the second checked the id while the
    first's record was being written (the lock released; the window widened on purpose). It must be refused in
    flight, its nonce left unspent: two begun records under one id made the first's end pop the second's, and
    the second's end then failed the journal (benign-only from then on)."""
    writing, go = threading.Event(), threading.Event()
    real = segments.ActiveSegment.append

    def slow_first_write(self: segments.ActiveSegment, data: bytes) -> None:
        if not writing.is_set():
            writing.set()
            go.wait(10)
        real(self, data)

    monkeypatch.setattr(segments.ActiveSegment, "append", slow_first_write)
    results: dict[str, object] = {}

    def begin(key: str) -> None:
        try:
            results[key] = journal.begin(vmid=100, kind="detach", payload={"key": key}, key=key, op_id="a" * 32)
        except KeyInFlightError as exc:
            results[key] = exc

    with Journal.open(path) as journal:
        first, second = (threading.Thread(target=begin, args=(key,)) for key in ("op:a:1", "op:a:2"))
        first.start()
        assert writing.wait(10)
        second.start()
        second.join(1)  # refused at once; without the reservation it queues behind the first's write
        go.set()
        first.join(10)
        second.join(10)
        assert results["op:a:1"] == "a" * 32 and isinstance(results["op:a:2"], KeyInFlightError), results
        journal.end("a" * 32, Outcome.OK)
        assert not journal.failed and journal.in_flight() == []
        journal.check_key("op:a:2")  # unspent: the op may be submitted again


def test_a_burned_nonce_is_spent_with_no_operation_across_reopen_and_compaction(path: Path) -> None:
    """``burn`` spends an ``op:`` key in one durable record and begins nothing (a signed op refused for the
    guest's state): begin and check_key then raise NonceSpentError (FAILED), after a reopen and a compaction
    too. A key already spent or in flight is left as it is; an ordinary key cannot be burned."""
    with Journal.open(path, segment_bytes=4096) as journal:
        assert journal.burn("op:stale", op_id="a1", why="DIGEST_STALE: signed for abc, the guest's is def")
        assert journal.in_flight() == [] and journal.stats[0] == 1
        with pytest.raises(NonceSpentError) as info:
            journal.begin(vmid=150, kind="guest.destroy", payload={}, key="op:stale")
        assert (info.value.op_id, info.value.outcome) == ("a1", Outcome.FAILED)
        assert not journal.burn("op:stale", op_id="a2", why="again")
        running = journal.begin(vmid=150, kind="guest.destroy", payload={}, key="op:running")
        assert not journal.burn("op:running", op_id="a3", why="in flight")
        journal.end(running, Outcome.OK)
        with pytest.raises(ValueError, match="burn key"):
            journal.burn("ordinary", op_id="a4", why="not a nonce")
        _fill(journal, 60)
    assert sequences(path)[0] > 1  # compacted
    with Journal.open(path) as journal:
        with pytest.raises(NonceSpentError) as info:
            journal.check_key("op:stale")
        assert (info.value.op_id, info.value.outcome) == ("a1", Outcome.FAILED)
        with pytest.raises(NonceSpentError) as info:
            journal.check_key("op:running")
        assert info.value.outcome is Outcome.OK
        journal.check_key("op:fresh")


def test_check_key_refuses_exactly_as_begin_would_and_writes_nothing(path: Path) -> None:
    """The read-only look-up raises what begin would, for ordinary and burn keys, and leaves no record."""
    with Journal.open(path) as journal:
        journal.check_key("op:fresh")
        journal.check_key("ordinary", {"a": 1})
        journal.end(journal.begin(vmid=100, kind="snapshot", payload={"a": 1}, key="ordinary"), Outcome.OK)
        with pytest.raises(AlreadyAppliedError):
            journal.check_key("ordinary")
        with pytest.raises(IdempotencyConflictError):
            journal.check_key("ordinary", {"a": 2})
        with pytest.raises(ValueError, match="empty"):
            journal.check_key("")
        assert journal.stats[0] == 2
        journal.begin(vmid=100, kind="destroy", payload={}, key="op:fresh")  # check_key spent nothing


def test_spent_nonces_survive_compaction_until_retention_expires(path: Path) -> None:
    """Compaction carries every spent ``op:`` key (with its outcome) forward; past retention it may be forgotten."""
    clock = Clock()
    spent = {}
    with Journal.open(path, segment_bytes=4096, retention=3600, clock=clock) as journal:
        for outcome in Outcome:
            key = f"op:{outcome.value}"
            spent[key] = (journal.begin(vmid=100, kind="destroy", payload={}, key=key), outcome)
            journal.end(spent[key][0], outcome)
        journal.end(journal.begin(vmid=100, kind="snapshot", payload={}, key="plain"), Outcome.FAILED)
        _fill(journal, 60)
    assert sequences(path)[0] > 1  # compacted: the begun/ended records of the nonces are gone
    clock.now += 3000
    with Journal.open(path, segment_bytes=4096, retention=3600, clock=clock) as journal:
        carried = {r.key: (r.op_id, r.outcome) for r in journal.recent(1000) if isinstance(r, Applied)}
        assert carried == spent  # FAILED included; the failed ordinary key is not carried
        for key, (op, outcome) in spent.items():
            with pytest.raises(NonceSpentError) as info:
                journal.check_key(key)
            assert (info.value.op_id, info.value.outcome) == (op, outcome)
        clock.now += 601  # past retention: an op this old is refused on time before its nonce is looked up
        _fill(journal, 60)
    with Journal.open(path, segment_bytes=4096, retention=3600, clock=clock) as journal:
        assert not [r for r in journal.recent(1000) if isinstance(r, Applied)]
        for key in spent:
            journal.check_key(key)


def _model_refusal(history: dict[int, Outcome | None], slot: int, burn: bool) -> type[Exception] | None:
    """What a begin under key ``slot`` should meet, from the outcomes so far (the spec, written plainly)."""
    if slot not in history:
        return None
    outcome = history[slot]
    if outcome is None:
        return KeyInFlightError
    if burn:
        return NonceSpentError
    return {Outcome.OK: AlreadyAppliedError, Outcome.UNKNOWN: OutcomeUnknownError}.get(outcome)


@settings(max_examples=40, deadline=None)
@given(st.booleans(), st.lists(st.tuples(st.integers(0, 3), st.sampled_from([None, *Outcome]), st.booleans()),
                               max_size=25))
def test_keys_follow_their_rules_through_any_history_and_reopen(burn: bool,
                                                                steps: list[tuple[int, Outcome | None, bool]]) -> None:
    """Any sequence of begins, ends and restarts: a burn key never begins twice; failure frees an ordinary key."""
    history: dict[int, Outcome | None] = {}  # key slot -> outcome of its current op (None: in flight)
    ops: dict[int, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal.open(Path(tmp) / "j", segment_bytes=2048)
        try:
            for slot, outcome, reopen in steps:
                key = f"{'op:' if burn else 'k'}{slot}"
                if slot in history and history[slot] is None and outcome is not None:
                    journal.end(ops[slot], outcome)
                    history[slot] = outcome
                    if outcome is Outcome.FAILED and not burn:
                        del history[slot]
                    continue
                expected = _model_refusal(history, slot, burn)
                if expected is None:
                    ops[slot] = journal.begin(vmid=100, kind="op", payload={}, key=key)
                    history[slot] = None
                else:
                    with pytest.raises(expected):
                        journal.begin(vmid=100, kind="op", payload={}, key=key)
                if reopen:
                    journal.close()
                    journal = Journal.open(Path(tmp) / "j", segment_bytes=2048)
        finally:
            journal.close()


# --- the high-water mark ------------------------------------------------------------------------

def test_high_water_is_the_largest_time_seen_and_survives_reopen_and_compaction(path: Path) -> None:
    """A clock set back does not lower it; it survives a restart and a compaction that dropped its record."""
    clock = Clock()
    with Journal.open(path, segment_bytes=4096, clock=clock) as journal:
        assert journal.high_water == 0.0
        peak = clock.now + 7200
        clock.now = peak  # the record at the peak is an unkeyed op: compaction drops it
        journal.end(journal.begin(vmid=100, kind="start", payload={}), Outcome.OK)
        clock.now = peak - 7200  # the clock is set back two hours
        journal.refuse(vmid=100, kind="destroy", reason="EXPIRED")
        assert journal.high_water == peak
        _fill(journal, 60)
        assert journal.high_water == peak
    assert sequences(path)[0] > 1
    with Journal.open(path, clock=clock) as journal:
        assert journal.high_water == peak
        assert all(r.at < peak for r in journal.recent(1000))  # only the mark carried it


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e5), st.booleans()), min_size=1, max_size=30))
def test_high_water_never_goes_backwards(steps: list[tuple[float, bool]]) -> None:
    """Whatever the clock does, with restarts and compactions between, high_water is the largest time so far."""
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal.open(Path(tmp) / "j", segment_bytes=1024, clock=clock)
        seen = previous = 0.0
        try:
            for i, (at, reopen) in enumerate(steps):
                clock.now = at
                journal.end(journal.begin(vmid=100, kind="start", payload={"pad": "x" * (i * 7 % 100)}), Outcome.OK)
                seen = max(seen, at)
                if reopen:
                    journal.close()
                    journal = Journal.open(Path(tmp) / "j", segment_bytes=1024, clock=clock)
                assert journal.high_water == seen >= previous
                previous = journal.high_water
        finally:
            journal.close()


# --- refusals -------------------------------------------------------------------------------------

def test_a_refusal_is_durable_readable_and_never_in_flight(path: Path) -> None:
    """refuse() writes a RefusalRecord that recent() returns, after a restart too; nothing is in flight."""
    with Journal.open(path) as journal:
        journal.refuse(vmid=101, kind="destroy", reason="APPROVAL_REQUIRED", detail="class destructive",
                       key="101:destroy:ab12")
        journal.refuse(vmid=102, kind="disk_detach", reason="SIGNATURE_THRESHOLD", op_id="op-7")
        assert journal.in_flight() == []
    with Journal.open(path) as journal:
        first, second = journal.recent()
        assert isinstance(first, RefusalRecord) and isinstance(second, RefusalRecord)
        assert (first.vmid, first.kind, first.reason, first.detail, first.op_id, first.key) == (
            101, "destroy", "APPROVAL_REQUIRED", "class destructive", None, "101:destroy:ab12")
        assert (second.vmid, second.op_id, second.key, second.detail) == (102, "op-7", None, "")
        assert journal.in_flight() == []
        assert journal.last_refusal("101:destroy:ab12") == ("APPROVAL_REQUIRED", "class destructive")
        assert journal.last_refusal("nope") is None
        with pytest.raises(ValueError, match="empty"):
            journal.refuse(vmid=1, kind="stop", reason="X", key="")


def test_a_refusal_is_journaled_when_first_seen_and_when_its_reason_changes(path: Path) -> None:
    """refuse_if_new writes on the first sighting and on a new reason, not on every tick, also after a restart."""
    clock = Clock()
    key = "100:stop:9f8e"
    sightings = [("APPROVAL_REQUIRED", "a", True), ("APPROVAL_REQUIRED", "a", False),
                 ("APPROVAL_REQUIRED", "other detail", False), ("TOO_MANY_STOPS", "", True),
                 ("APPROVAL_REQUIRED", "a", True)]
    with Journal.open(path, segment_bytes=4096, retention=3600, clock=clock) as journal:
        for reason, detail, written in sightings:
            assert journal.refuse_if_new(vmid=100, kind="stop", reason=reason, detail=detail, key=key) is written
        assert [r.reason for r in journal.recent() if isinstance(r, RefusalRecord)] == [
            "APPROVAL_REQUIRED", "TOO_MANY_STOPS", "APPROVAL_REQUIRED"]
        _fill(journal, 60)  # compaction carries the last refusal per key
    assert sequences(path)[0] > 1
    with Journal.open(path, retention=3600, clock=clock) as journal:
        assert not journal.refuse_if_new(vmid=100, kind="stop", reason="APPROVAL_REQUIRED", key=key)
        clock.now += 3601  # a refusal standing for the whole retention window is journaled again, once
        assert journal.last_refusal(key) is None
        assert journal.refuse_if_new(vmid=100, kind="stop", reason="APPROVAL_REQUIRED", key=key)


def test_concurrent_identical_refusals_are_journaled_once(path: Path) -> None:
    """Eight threads meeting the same new refusal at once: exactly one record."""
    with Journal.open(path) as journal:
        barrier = threading.Barrier(8)
        written: list[bool] = []

        def sight() -> None:
            barrier.wait()
            written.append(journal.refuse_if_new(vmid=100, kind="stop", reason="OUT_OF_SCOPE", key="100:stop:x"))

        threads = [threading.Thread(target=sight) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(written) == [False] * 7 + [True]
        assert len([r for r in journal.recent() if isinstance(r, RefusalRecord)]) == 1


# --- format compatibility, retention, compaction cost -----------------------------------------------

def v1_frame(kind: bytes, at: float, number: int, fields: list[bytes | None]) -> bytes:
    """A frame laid out by hand as records.py documented it before refusals and burn keys (commit 93a6534)."""
    body = struct.pack("<cdI", kind, at, number) + b"".join(
        struct.pack("<I", 0xFFFFFFFF) if f is None else struct.pack("<I", len(f)) + f for f in fields)
    framed = struct.pack("<I", len(body)) + body
    return b"\xa5\x4a" + struct.pack("<I", zlib.crc32(framed)) + framed


def test_a_journal_written_by_the_previous_format_still_opens(path: Path) -> None:
    """Segments from before burn keys and refusals (no mark, old record types) replay to the same state."""
    t0 = 1_700_000_000.0
    old: list[tuple[Record, bytes]] = [
        (Begun(op_id="a", vmid=100, kind="start", payload={}, key=None, at=t0),
         v1_frame(b"B", t0, 100, [b"a", b"start", None, b"{}"])),
        (TaskStarted(op_id="a", upid=UPID, at=t0 + 1), v1_frame(b"T", t0 + 1, 0, [b"a", UPID.encode()])),
        (Begun(op_id="b", vmid=101, kind="snapshot", payload={"name": "x"}, key="snap", at=t0 + 2),
         v1_frame(b"B", t0 + 2, 101, [b"b", b"snapshot", b"snap", b'{"name":"x"}'])),
        (Ended(op_id="b", outcome=Outcome.OK, error="", at=t0 + 3), v1_frame(b"E", t0 + 3, 1, [b"b", b""])),
        (Applied(key="old", payload_hash=b"\x01" * 32, op_id="c", outcome=Outcome.UNKNOWN, at=t0 + 4),
         v1_frame(b"A", t0 + 4, 3, [b"c", b"old", b"\x01" * 32])),
    ]
    for record, frame in old:
        assert encode(record) == frame, record  # the old types' bytes never change
    path.mkdir()
    (path / name(1)).write_bytes(b"".join(frame for _, frame in old))
    with Journal.open(path, clock=lambda: t0 + 10) as journal:
        assert [(f.op_id, f.upid) for f in journal.in_flight()] == [("a", UPID)]
        assert journal.already_applied("snap")
        with pytest.raises(OutcomeUnknownError):
            journal.check_key("old")
        assert journal.high_water == t0 + 4
        assert journal.recent() == [record for record, _ in old]


def test_retention_is_exposed_for_the_start_up_check(path: Path) -> None:
    """The executor asserts retention > longest op TTL + skew at start: the journal says what it keeps."""
    with Journal.open(path, retention=8 * 86400) as journal:
        assert journal.retention == 8 * 86400
    with Journal.open(path) as journal:
        assert journal.retention > 24 * 3600 + 300


def test_a_live_set_larger_than_a_segment_does_not_compact_on_every_append(path: Path) -> None:
    """Once the keys kept outgrow a segment, compaction waits for the segment to double, not one per append."""
    with Journal.open(path, segment_bytes=4096) as journal:
        for i in range(300):  # about 30 KB of live keys: far more than a segment
            journal.end(journal.begin(vmid=100, kind="destroy", payload={}, key=f"op:{i:04d}"), Outcome.OK)
        _fill(journal, 100)
    assert sequences(path)[0] < 30
    with Journal.open(path) as journal:
        for i in range(300):
            with pytest.raises(NonceSpentError):
                journal.check_key(f"op:{i:04d}")
