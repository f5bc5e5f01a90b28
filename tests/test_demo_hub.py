"""`make demo-hub` (scripts/demo_hub.py) as a user runs it: a subprocess, its output, its exit code, nothing left."""

from __future__ import annotations

import os
import re
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
    the cluster is unchanged by the forgery; then the fleet view: status exits 4 with the approval pending (shown by
    `pending` with its sign command, and on the guest's web page with both values) and pve3's slow-starting guest
    drifted (its run state declared against actual in `status --node` and on its page), the signed op submitted through
    the hub RAN ok, fakepve got the MAC write once, status exits 0, and the killed executor is STALE (exit 4); every
    process it started is gone when it returns."""
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
    assert [row[:4] for row in rows[3:6]] == [[f"pve{n}@fakecluster", "1", "NACK", "v2"] for n in (1, 2, 3)]
    assert all(any(cell.startswith("UNKNOWN_KEY") for cell in row[4:]) for row in rows[3:6]), rows  # its NOTES
    assert "the cluster after the forgery (unchanged)" in done.stdout
    out = done.stdout[done.stdout.index("== fleet view"):]
    waiting, after, killed = out.split("\n$ pve-hub status\n")[1:4]
    assert [row.split()[6] for row in waiting.splitlines() if row.startswith("pve1@")] == ["1"]  # PENDING
    assert [row.split()[5] for row in waiting.splitlines() if row.startswith("pve3@")] == ["1"]  # DRIFTED: 303
    assert "(exit 4)" in waiting.split("$ ")[0]
    # the slow start (fakepve's start task of ~6 s) keeps guest 303 drifted, being converged, while it is shown
    node3 = out[out.index("$ pve-hub status --node pve3@fakecluster"):].split("\n$ ")[0].splitlines()
    assert node3[1].startswith("  guest 303 batch3: DRIFTED"), node3
    assert node3[2:] == ["      run_state: declared 'running', actual 'stopped'", "(exit 3)"], node3
    assert "/nodes/pve3%40fakecluster/guests/303\n  run_state  running  stopped  differs\n" in out
    assert "== guest 303's start task ended: it is running" in out
    assert [row.split()[4:6] for row in after.splitlines() if row.startswith("pve3@")] == [["3", "0"]]  # in sync
    assert "net0: declared 'virtio=BC:24:11:00:01:99,bridge=vmbr0', actual 'virtio=BC:24:11:00:01:02" in out
    assert re.search(r"sign it: pve-hub pending --cluster fakecluster --hub 127\.0\.0\.1:\d+ --descriptor ", out)
    assert "  net0  virtio=BC:24:11:00:01:99,bridge=vmbr0  virtio=BC:24:11:00:01:02,bridge=vmbr0  differs" in out
    assert "on node pve1@fakecluster: RAN ok" in out
    assert "fakepve received 1 config write(s) for guest 102 since v3; its net0 is now virtio=BC:24:11:00:01:99" in out
    assert "(exit 0)" in after.split("$ ")[0] and "guest 102: in_sync, no key differs" in after
    assert "STALE: no report for" in killed and "(exit 4)" in killed and "== pve3 STALE " in killed
    assert "stopped 5 processes (by PID)" in done.stdout and "done in" in done.stdout and "killed" not in done.stdout
    assert left == []
