"""Crash tests with real processes: SIGKILL at random moments never loses an acknowledged record."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from journal import Journal

ROOT = Path(__file__).resolve().parent.parent
ITERATIONS = 40


def run_and_kill(directory: Path, prefix: str, delay: float) -> list[str]:
    """Start the child, let it append for ``delay`` seconds, SIGKILL it; return what it acknowledged."""
    child = subprocess.Popen([sys.executable, "-m", "tests.journal_child", str(directory), prefix],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    lines = child.stdout.read().splitlines()
    child.wait()
    return lines


def test_every_acknowledged_record_survives_sigkill(tmp_path: Path) -> None:
    """Killed mid-append, mid-sync or mid-compaction, the journal opens with all it acknowledged."""
    directory = tmp_path / "journal"
    rng = random.Random(20261127)
    begun: dict[str, str] = {}
    ended: set[str] = set()
    for iteration in range(ITERATIONS):
        for line in run_and_kill(directory, f"it{iteration}", rng.uniform(0.0, 0.25)):
            parts = line.split()
            if parts[0] == "B":
                begun[parts[1]] = parts[2]
            elif len(parts) == 2:  # a line cut by the kill has no op id after "E"
                ended.add(parts[1])
        with Journal.open(directory) as journal:
            flying = {f.op_id for f in journal.in_flight()}
            for op, key in begun.items():
                applied = journal.already_applied(key)
                assert op in flying or applied, (iteration, op)
                if op in ended:
                    assert applied and op not in flying, (iteration, op)
            assert len(flying) <= iteration + 1  # at most one op per killed child was cut short
    assert len(ended) > ITERATIONS  # the children really got work done between kills
