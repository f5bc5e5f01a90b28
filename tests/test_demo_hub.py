"""`make demo-hub` (scripts/demo_hub.py) as a user runs it: a subprocess, its output, its exit code, nothing left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.executor_helpers import ROOT

PREFIX = "pve-reconcile-demo-hub-"  # the demo's temporary dir: in the command line of everything it starts


def running_with(marker: str) -> list[int]:
    """PIDs of processes whose command line holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo's trust store must be owned by root")
def test_the_hub_demo_converges_three_nodes_refuses_the_forgery_and_stops_everything() -> None:
    """Exit 0; `pve-hub status` shows ACK v1 for each of the three nodes, then NACK v2 UNKNOWN_KEY holding v1;
    the cluster is unchanged by the forgery; every process it started is gone when it returns."""
    # The demo makes its dir under TMPDIR: one of this test's own, so that "nothing left" looks only at what this
    # run started (another run of the demo on this machine, e.g. another pytest-xdist session, is not ours).
    # Short, under /tmp: the demo's unix sockets live in it.
    tmpdir = Path(tempfile.mkdtemp(prefix="pvr-dh-", dir="/tmp"))
    try:
        done = subprocess.run([sys.executable, "scripts/demo_hub.py"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir)},
                              check=False)
        left = running_with(f"{tmpdir}/{PREFIX}")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("pve") and "@fakecluster" in line]
    assert [row[:4] for row in rows[:3]] == [[f"pve{n}@fakecluster", "1", "ACK", "v1"] for n in (1, 2, 3)]
    assert [row[:4] for row in rows[3:]] == [[f"pve{n}@fakecluster", "1", "NACK", "v2"] for n in (1, 2, 3)]
    assert all(any(cell.startswith("UNKNOWN_KEY") for cell in row[4:]) for row in rows[3:]), rows  # its NOTES
    assert "the cluster after the forgery (unchanged)" in done.stdout
    assert "stopped 5 processes (by PID)" in done.stdout and "killed" not in done.stdout
    assert left == []
