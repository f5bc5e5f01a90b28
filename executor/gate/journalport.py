"""What the executor reads of its journal, and the stand-in when there is none.

The gate's journal is None once it could not open or a write failed (from then on only benign
steps run: that policy stays explicit, ``Gate.journal is None``). What is only *read* of it (the
operations in flight, recent records, a key's last refusal, the high-water mark) goes through
``Gate.records``: the journal, or ``NO_JOURNAL``, which holds nothing, so a reader needs no check.
"""

from __future__ import annotations

from typing import Protocol

from journal import InFlight, Record


class JournalReads(Protocol):
    """The journal's read side, as the loop, the lane, the op desk, the gate's clock and the API use it."""

    @property
    def high_water(self) -> float:
        """The largest record time seen."""

    def in_flight(self) -> list[InFlight]:
        """Operations begun and not ended."""

    def recent(self, limit: int = 100) -> list[Record]:
        """The last ``limit`` records, oldest first."""

    def last_refusal(self, key: str) -> tuple[str, str] | None:
        """The last refusal recorded under ``key`` (reason, detail), if any."""


class NoJournal:
    """No journal: nothing in flight, nothing recorded, a high-water mark of 0."""

    high_water = 0.0

    def in_flight(self) -> list[InFlight]:
        """Nothing is in flight where nothing was begun."""
        return []

    def recent(self, limit: int = 100) -> list[Record]:
        """No records."""
        return []

    def last_refusal(self, key: str) -> tuple[str, str] | None:
        """No refusal was recorded."""
        return None


NO_JOURNAL: JournalReads = NoJournal()
