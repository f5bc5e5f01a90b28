"""After a crash: an operation left in flight is resolved, never run twice.

Its journaled UPID decides; without one, the guest's task list, else its state; else it ends
unknown. A journal that cannot open at all is no crash: benign steps only.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from executor.loop.recovery import recover
from executor.pve.write import ProxmoxWriter
from journal import Ended, Journal, Outcome
from planner import server
from tests.executor_helpers import ROOT, cli


def test_sigkill_during_a_slow_task_is_resolved_from_its_upid(fakepve: Any, fakepve_cafile: str,
                                                              planner: server.Running, tmp_path: Path) -> None:
    """Killed while a start task runs, the restarted executor waits on that UPID; nothing runs twice."""
    fakepve.time_scale = 0.02
    vm = fakepve.add_vm(100, "web", status="stopped")
    vm.start_secs = 150  # 3 s of wall time
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n")
    command = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path,
                  "run", "--once", "--desired", str(desired), "--state-dir", str(tmp_path / "state"))
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not any(m == "GET" and "/tasks/UPID" in p for m, p, _ in fakepve.requests):
        assert time.monotonic() < deadline and child.poll() is None, "the executor never polled its task"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert vm.status == "stopped"  # killed mid-task
    with Journal.open(tmp_path / "state") as journal:
        (flight,) = journal.in_flight()
        assert flight.kind == "start" and flight.upid
    restarted = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert restarted.returncode == 0, restarted.stderr
    events = [json.loads(line) for line in restarted.stderr.splitlines()]
    recovered = [e for e in events if e["event"] == "recovered"]
    assert [(e["outcome"], e["upid"]) for e in recovered] == [("ok", flight.upid)]
    assert vm.status == "running"
    assert len([t for t in fakepve.tasklog if t["type"] == "qmstart"]) == 1
    with Journal.open(tmp_path / "state") as journal:
        assert journal.in_flight() == []
        assert [r.outcome for r in journal.recent() if isinstance(r, Ended)] == [Outcome.OK]


def test_recovery_without_upid_uses_the_task_list_or_the_guest_state(fakepve: Any, node: Any,
                                                                     tmp_path: Path) -> None:
    """A crash before the UPID was journalled: the guest's tasks, else its state, decide; else unknown."""
    fakepve.add_vm(100, "web", status="stopped")
    fakepve.add_vm(101, "db", status="running")
    fakepve.add_vm(102, "mail", status="stopped")
    with Journal.open(tmp_path / "j") as journal:
        started = journal.begin(vmid=100, kind="start", payload={"type": "qemu"})
        ProxmoxWriter(node.session).start("qemu", 100)  # the call went out, the crash came before journal.task()
        journal.begin(vmid=101, kind="start", payload={"type": "qemu"})   # no task, but running: ok
        journal.begin(vmid=102, kind="start", payload={"type": "qemu"})   # no task, still stopped: unknown
        decided = {op.vmid: outcome for op, outcome in recover(journal, node)}
        assert decided == {100: Outcome.OK, 101: Outcome.OK, 102: Outcome.UNKNOWN}
        assert journal.in_flight() == [] and started


def test_a_journal_that_cannot_open_means_journal_less_operation(fakepve: Any, fakepve_cafile: str,
                                                                 planner: server.Running, tmp_path: Path) -> None:
    """An unusable state directory is a loud warning, not a crash: the node still converges (benign steps only)."""
    vm = fakepve.add_vm(100, "web", status="stopped")
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = subprocess.run(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}",
                                tmp_path, "run", "--once", "--desired", str(desired), "--state-dir",
                                str(blocker / "state")),
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    warning = next(e for e in events if e["event"] == "journal_unavailable_benign_only")
    assert warning["level"] == "error" and str(blocker) in warning["error"]
    assert vm.status == "running"
