"""The journal's read side when there is no journal: ``NO_JOURNAL`` holds nothing, and the gate's clock over it
is the wall clock (a reset's offset cannot pull it back)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from executor.gate.journalport import NO_JOURNAL
from executor.signed.clock import GateClock


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
