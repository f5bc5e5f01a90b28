"""`make demo` (scripts/demo.py), the README's first command, as a user runs it: its output, exit code, nothing left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.executor_helpers import ROOT
from tests.test_demo_hub import running_with

PREFIX = "pve-reconcile-demo-"  # the demo's temporary dir: in the command line of everything it starts


def section(out: str, title: str) -> list[str]:
    """The lines under ``== title`` up to the next ``==`` heading."""
    start = out.index(f"== {title}\n") + len(title) + 4
    return out[start:].split("\n== ", maxsplit=1)[0].strip("\n").splitlines()


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo's trust store must be owned by root")
def test_the_demo_converges_the_node_then_plans_nothing_and_runs_a_signed_detach_once() -> None:
    """Exit 0; the converge runs the four planned actions and leaves the node as declared (the locked guest and the
    data-bearing disk untouched); the plan again has nothing to change; the detach is refused with one signature,
    runs with two (scsi1 gone), and its replay is NONCE_SPENT; every process it started is gone when it returns."""
    tmpdir = Path(tempfile.mkdtemp(prefix="pvr-d-", dir="/tmp"))  # short: the demo's unix sockets live in it
    try:
        done = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir)},
                              check=False)
        left = running_with(f"{tmpdir}/{PREFIX}")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert '"succeeded": 4, "failed": 0' in done.stderr, done.stderr[-3000:]  # the converge tick's log line
    after = section(out, "the node after")
    assert after[0].split()[:2] == ["100", "running"] and "'memory': '4096'" in after[0], after
    assert after[1].split()[:2] == ["101", "stopped"] and "'memory': 1024" in after[1], after
    assert "'scsi0': 'local-lvm:vm-103-disk-0,size=32G'" in after[3], after  # data-bearing: never written
    assert section(out, "pve-executor plan (again)")[-1].startswith("Plan: 0 to change"), out
    assert "THRESHOLD_NOT_MET" in "\n".join(section(out, "pve-executor op submit (one signature)"))
    assert "accepted:" in "\n".join(section(out, "pve-executor op cosign --key bob.key, then op submit"))
    detached = section(out, "the node after the approved detach")
    assert detached[4].startswith("  104 stopped") and "scsi1" not in detached[4], detached
    assert "NONCE_SPENT" in "\n".join(section(out, "pve-executor op submit (the same envelope again)"))
    assert "stopped the planner and the fake Proxmox" in out
    assert left == []
