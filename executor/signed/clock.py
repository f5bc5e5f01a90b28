"""What signed operations keep on the node besides the journal: the gate's clock and its secret.

``GateClock``: the gate's time is never before the journal's high-water mark, so a clock set back
revives no expired op; ``clock_reset`` is the offline remedy for a clock that ran ahead.
``gate_secret``: the key of this executor's challenges (state_dir/gate.secret, 0600).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import structlog

from executor.gate.files import INTACT_MARK, NONCES_MARK, write_private
from executor.gate.journalport import JournalReads
from journal import Journal
from safety import challenge as challenges
from safety.signedop import MAX_SKEW

log = structlog.get_logger("executor.opclock")


class GateClock:
    """The gate's time: never before the journal's high-water mark, so a clock set back revives nothing.

    ``pve-executor clock-reset`` (daemon stopped) writes state_dir/clock.reset after a clock that ran
    ahead: the mark is then read less the offset, and ops signed before the reset are refused.
    """

    def __init__(self, journal: JournalReads, state_dir: str | Path) -> None:
        """``journal``: the wiring's journal port (no journal: its high-water mark is 0)."""
        self._journal = journal
        self.offset, self.floor = 0.0, 0.0
        reset = Path(state_dir) / "clock.reset"
        if reset.is_file():
            data = json.loads(reset.read_text(encoding="utf-8"))
            self.offset, self.floor = float(data["offset"]), float(data["floor"])

    def now(self) -> float:
        """max(wall time, the journal's high-water mark less a reset's offset)."""
        mark = self._journal.high_water - self.offset  # no journal: 0 less the offset, never above the wall
        wall = time.time()
        if mark > wall + MAX_SKEW:
            log.warning("clock_ahead_of_high_water", wall=wall, high_water=mark,
                        remedy="stop the daemon, fix the clock, run pve-executor clock-reset")
        return max(wall, mark)


def clock_reset(state_dir: str | Path, journal: Journal) -> tuple[float, float]:
    """Record a clock reset (daemon stopped): offset = high-water mark - now; floor = now. Returns both."""
    now = time.time()
    offset = max(0.0, journal.high_water - now)
    path = Path(state_dir) / "clock.reset"
    write_private(path, json.dumps({"offset": offset, "floor": now}).encode())
    return offset, now


def gate_secret(state_dir: str | Path, journal: Journal | None = None) -> bytes:
    """state_dir/gate.secret, created (0600) on first use: keys this executor's challenges.

    A new secret means new state: whatever journal remembered the spent nonces before is not this
    one (a wiped or fresh state_dir). So creating it also sets the clock floor to now: an op
    signed before can never run here, even an APPROVAL op, which carries no challenge. The same
    holds when ``journal`` opens empty although this state had accepted signed ops (its segments
    were lost or moved aside): the spent nonces went with them; and when a journal write failed
    while the daemon ran (the gate unlinked ``INTACT_MARK``): that write may have been a spent nonce.
    """
    folder = Path(state_dir)
    path = folder / "gate.secret"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        set_floor(folder)  # even over an old clock.reset left behind by a wipe: the floor only rises
        write_private(path, challenges.new_secret())
    elif journal is not None and journal.high_water == 0 and (folder / NONCES_MARK).exists():
        log.error("journal_lost_floor_set", state_dir=str(folder),
                  consequence="signed ops from before now are refused: their spent nonces were in the lost journal")
        set_floor(folder)
        (folder / NONCES_MARK).unlink()
    elif journal is not None and (folder / NONCES_MARK).exists() and not (folder / INTACT_MARK).exists():
        log.error("journal_write_failed_floor_set", state_dir=str(folder),
                  consequence="signed ops from before now are refused: a nonce spent when the journal failed may "
                              "not have been written")
        set_floor(folder)
    if journal is not None:
        (folder / INTACT_MARK).touch()
    return path.read_bytes()


def set_floor(folder: Path) -> None:
    """Ops whose not_before lies before now are refused from now on; a reset's offset is kept."""
    reset = folder / "clock.reset"
    offset, floor = 0.0, 0.0
    if reset.is_file():
        try:
            old = json.loads(reset.read_text(encoding="utf-8"))
            offset, floor = float(old["offset"]), float(old["floor"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: a fresh floor is the safe side
    write_private(reset, json.dumps({"offset": offset, "floor": max(floor, time.time())}).encode())


def mark_nonces(state_dir: str | Path) -> None:
    """Remember, before the first signed op runs, that this state's journal holds spent nonces."""
    mark = Path(state_dir) / NONCES_MARK
    if not mark.exists():
        write_private(mark, b"this state's journal holds spent nonces of signed operations\n")
