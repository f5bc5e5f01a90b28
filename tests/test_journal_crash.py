"""Crash tests with real processes: SIGKILL at random moments never loses an acknowledged record."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from journal import Journal, NonceSpentError, Outcome, is_burn_key
from tests.journal_child import DIE_POINTS

ROOT = Path(__file__).resolve().parent.parent
RANDOM_KILLS = 24
KILLS_PER_DIE_POINT = 3


@dataclass
class Acknowledged:
    """What the children acknowledged, across every kill."""

    begun: dict[str, str] = field(default_factory=dict)  # op -> key ("-": none)
    ended: set[str] = field(default_factory=set)
    refusals: dict[str, str] = field(default_factory=dict)  # key -> last acknowledged reason
    pending_refusal: dict[str, str] = field(default_factory=dict)  # key -> reason being written at the kill
    latest_at: float = 0.0
    died_at: list[str] = field(default_factory=list)

    def read(self, lines: list[str]) -> None:
        """Fold a child's output; a line cut by the kill is incomplete and ignored."""
        self.pending_refusal.clear()
        for line in lines:
            parts = line.split()
            match parts:
                case ["B", op, key, at]:
                    self.begun[op] = key
                    self.latest_at = max(self.latest_at, float(at))
                case ["E", op]:
                    self.ended.add(op)
                case ["R?", key, reason]:
                    self.pending_refusal = {key: reason}
                case ["R", key, reason]:
                    self.refusals[key] = reason
                    self.pending_refusal.clear()
                case ["DIE", point]:
                    self.died_at.append(point)


def run_and_kill(directory: Path, prefix: str, delay: float, die_at: str | None = None) -> list[str]:
    """Start the child, SIGKILL it after ``delay`` seconds (or let it kill itself at ``die_at``); its output."""
    child = subprocess.Popen([sys.executable, "-m", "tests.journal_child", str(directory), prefix,
                              *([die_at] if die_at else [])], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    try:
        child.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
    lines = child.stdout.read().splitlines()
    child.wait()
    return lines


def check(directory: Path, acked: Acknowledged, high_water: float) -> float:
    """Reopen as the restarted executor would: every acknowledged record is there; return high_water."""
    with Journal.open(directory) as journal:
        assert journal.high_water >= max(acked.latest_at, high_water)  # the clock set back does not lower it
        flying = {f.op_id for f in journal.in_flight()}
        assert len(flying) <= 1  # at most the op the kill cut short
        for op, key in list(acked.begun.items()):
            if key == "-" or is_burn_key(key):
                continue
            applied = journal.already_applied(key)
            assert op in flying or applied, op
            if op in acked.ended:
                assert applied and op not in flying, op
        for op in flying:  # what recovery writes for an op it finds not applied
            journal.end(op, Outcome.FAILED, "not applied")
            if not is_burn_key(acked.begun.get(op, "op:")):
                acked.begun.pop(op, None)  # a failed ordinary key is released
        for key in acked.begun.values():
            if is_burn_key(key):
                with pytest.raises(NonceSpentError):
                    journal.begin(vmid=100, kind="snapshot", payload={}, key=key)
                with pytest.raises(NonceSpentError):
                    journal.check_key(key)
        for key, reason in acked.refusals.items():
            last = journal.last_refusal(key)
            assert last is not None and last[0] in {reason, acked.pending_refusal.get(key)}, key
            acked.refusals[key] = last[0]  # the one being written at the kill may have landed
        return journal.high_water


def test_every_acknowledged_record_survives_sigkill(tmp_path: Path) -> None:
    """Killed mid-append, mid-sync or in any phase of a compaction, the journal opens with all it acknowledged.

    Spent ``op:`` nonces (ended failed, ok or unknown, or cut short and ended by recovery) stay
    spent, the last refusal per key is the last acknowledged one (or the one being written), and
    high_water never goes back although the children's clock is set back now and then.
    """
    directory = tmp_path / "journal"
    rng = random.Random(20261127)
    runs = [None] * RANDOM_KILLS + [point for point in DIE_POINTS for _ in range(KILLS_PER_DIE_POINT)]
    rng.shuffle(runs)
    acked, high_water = Acknowledged(), 0.0
    for iteration, die_at in enumerate(runs):
        delay = 5.0 if die_at else rng.uniform(0.0, 0.2)
        acked.read(run_and_kill(directory, f"it{iteration}", delay, die_at))
        high_water = check(directory, acked, high_water)
    assert sorted(acked.died_at) == sorted(point for point in runs if point)  # each compaction kill happened
    assert len(acked.ended) > len(runs)  # the children really got work done between kills
    spent = [key for key in acked.begun.values() if is_burn_key(key)]
    assert len(spent) > len(runs) and acked.refusals
