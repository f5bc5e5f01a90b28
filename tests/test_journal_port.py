"""The journal port: ``NO_JOURNAL`` holds nothing, writes nothing and refuses what a signed op needs; the gate's
clock over it is the wall clock (a reset's offset cannot pull it back); the wiring's port switches to it in place
when a write fails."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from executor.gate.files import INTACT_MARK
from executor.gate.journalport import NO_JOURNAL, NoJournalError, journal_port
from executor.signed.clock import GateClock
from journal import Journal


def test_no_journal_holds_nothing() -> None:
    """Nothing in flight, no records, no refusal under any key, a high-water mark of 0."""
    assert NO_JOURNAL.in_flight() == []
    assert NO_JOURNAL.recent(1000) == []
    assert NO_JOURNAL.last_refusal("op:anything") is None
    assert NO_JOURNAL.high_water == 0.0


def test_the_clock_without_a_journal_is_the_wall_clock(tmp_path: Path) -> None:
    """A clock reset's offset applies to the journal's mark; with no journal the gate's time is the wall's."""
    (tmp_path / "clock.reset").write_text(json.dumps({"offset": 3600.0, "floor": 0.0}), encoding="utf-8")
    clock = GateClock(NO_JOURNAL, tmp_path)
    before = time.time()
    assert before <= clock.now() <= time.time()


def test_no_journal_runs_benign_steps_only() -> None:
    """A benign intent gets an id, unjournaled; a keyed one (a signed op) and a nonce check raise; a write is False."""
    assert NO_JOURNAL.begin(vmid=100, kind="start", payload={}, key=None)
    with pytest.raises(NoJournalError):
        NO_JOURNAL.begin(vmid=100, kind="start", payload={}, key="op:x")
    with pytest.raises(NoJournalError):
        NO_JOURNAL.check_key("op:x")
    assert NO_JOURNAL.write(lambda j: j.close()) is False and not NO_JOURNAL.working


def test_a_lost_port_is_no_journal_for_every_holder(tmp_path: Path) -> None:
    """``lost`` switches the one port in place (everyone holding it sees it) and unlinks the intact mark."""
    journal = Journal.open(tmp_path)
    (tmp_path / INTACT_MARK).touch()
    port = journal_port(journal)
    assert port.working and port.journal is journal and port.write(lambda j: j.begin(vmid=1, kind="k", payload={}))
    assert [op.vmid for op in port.in_flight()] == [1]
    port.lost()
    assert not port.working and port.journal is None and port.in_flight() == [] and port.high_water == 0.0
    assert not (tmp_path / INTACT_MARK).exists()
    port.close()  # a lost journal is left as it is
    journal.close()
