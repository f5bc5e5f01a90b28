"""A Proxmox answer that is lost: the action stays in flight until a definite answer, never sent again.

PVE took the request and its answer never came back (a hang longer than the client's timeout), or
PVE got the request and acts on it only later: in both cases a lookup that fails, or that looks too
early, is no proof that nothing happened. The guest stays held until its task is found and settled,
or a task-list read that succeeded, made after PVE had time to register the task, shows none (then
the op ends "not applied" and the next tick plans it again). Each test widens the window on purpose
(a 0.5 s client timeout, a hold of seconds) and counts the shutdown requests fakepve received.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from proxmoxer import ProxmoxAPI

from executor.loop.desired import Declared
from executor.loop.engine import Engine
from executor.loop.recovery import recover
from executor.pve.node import Connection, Credentials, ProxmoxNode, PveNotSentError
from executor.pve.write import ProxmoxWriter
from journal import Ended, Journal, Outcome
from planner import server
from tests.answer_faults import AnswerFaults
from tests.executor_helpers import cli, requests_to, run_daemon_until, unused_port

Make = Callable[..., Engine]
SHUTDOWN = "/qemu/100/status/shutdown"


def _converge(engine: Engine, fakepve: Any, *, within: float = 20.0) -> None:
    """Tick until guest 100 is stopped and nothing is in flight, then once more."""
    journal = engine.journal
    assert journal is not None
    deadline = time.monotonic() + within
    while fakepve.vm(100).status != "stopped" or journal.in_flight():
        assert time.monotonic() < deadline, "did not converge"
        engine.tick(wait=True)
        time.sleep(0.05)
    engine.tick(wait=True)


def _ended(journal: Journal) -> list[tuple[Outcome, str]]:
    return [(r.outcome, r.error) for r in journal.recent() if isinstance(r, Ended)]


def test_a_shutdown_whose_answer_is_lost_while_pve_hangs_is_sent_once(fakepve: Any, connect: Callable[..., Connection],
                                                                        make_engine: Make) -> None:
    """PVE takes the shutdown, then hangs (every request waits): the lookup fails, the guest stays held,
    and once PVE answers again the task is found and waited on; no second shutdown."""
    fakepve.time_scale = 0.01
    fakepve.add_vm(100, "web", status="running").shutdown_secs = 500  # 5 s: still running after the hang
    AnswerFaults(fakepve).lose("POST", SHUTDOWN, 2.5, freeze=True)
    engine = make_engine([Declared(vmid=100, state="stopped")], pve=ProxmoxNode(connect(timeout=0.5)),
                         shutdown_timeout=600)
    _converge(engine, fakepve)
    assert len(requests_to(fakepve, "POST", SHUTDOWN)) == 1, "the shutdown was sent again"
    assert engine.journal is not None
    assert _ended(engine.journal) == [(Outcome.OK, "")]


def test_a_shutdown_pve_acts_on_late_is_not_sent_again(fakepve: Any, connect: Callable[..., Connection],
                                                       make_engine: Make) -> None:
    """The shutdown reached PVE but is handled only after the client gave up: the task list read at once
    shows nothing, which proves nothing yet; the guest stays held until the task appears."""
    fakepve.time_scale = 0.01
    fakepve.add_vm(100, "web", status="running").shutdown_secs = 300
    AnswerFaults(fakepve).late("POST", SHUTDOWN, 2.0)
    engine = make_engine([Declared(vmid=100, state="stopped")], pve=ProxmoxNode(connect(timeout=0.5)),
                         shutdown_timeout=600, lost_grace=5.0)
    _converge(engine, fakepve)
    assert len(requests_to(fakepve, "POST", SHUTDOWN)) == 1, "the shutdown was sent again"
    assert engine.journal is not None
    assert _ended(engine.journal) == [(Outcome.OK, "")]


def test_a_lost_call_proven_absent_ends_not_applied_and_is_planned_again(
        fakepve: Any, connect: Callable[..., Connection], make_engine: Make) -> None:
    """PVE never acted on the shutdown: after the grace a task list that reads fine and holds no task ends
    the op as not applied (failed), and the next tick sends the shutdown again, which runs."""
    fakepve.time_scale = 0.01
    fakepve.add_vm(100, "web", status="running").shutdown_secs = 100
    AnswerFaults(fakepve).swallow("POST", SHUTDOWN, 1.0)
    engine = make_engine([Declared(vmid=100, state="stopped")], pve=ProxmoxNode(connect(timeout=0.5)),
                         shutdown_timeout=600, lost_grace=1.0)
    _converge(engine, fakepve)
    assert len(requests_to(fakepve, "POST", SHUTDOWN)) == 2
    assert engine.journal is not None
    ended = _ended(engine.journal)
    assert [outcome for outcome, _ in ended] == [Outcome.FAILED, Outcome.OK]
    assert "not applied" in ended[0][1]


def test_a_held_guest_is_in_flight_in_the_journal_until_settled(fakepve: Any, connect: Callable[..., Connection],
                                                                 make_engine: Make) -> None:
    """While the answer is lost the op is in flight in the journal (a restart's recovery resolves it)."""
    fakepve.time_scale = 0.01
    fakepve.add_vm(100, "web", status="running").shutdown_secs = 500
    AnswerFaults(fakepve).lose("POST", SHUTDOWN, 2.0, freeze=True)
    engine = make_engine([Declared(vmid=100, state="stopped")], pve=ProxmoxNode(connect(timeout=0.5)),
                         shutdown_timeout=600)
    engine.tick(wait=True)
    assert engine.journal is not None
    assert [(op.vmid, op.kind) for op in engine.journal.in_flight()] == [(100, "stop")]
    assert 100 in engine.gate.lane.unsettled()


def test_a_task_list_that_does_not_parse_proves_nothing(fakepve: Any, connect: Callable[..., Connection],
                                                        make_engine: Make) -> None:
    """Past the grace, a task list with an entry that does not parse (it could be the lost task) keeps the
    guest held; once the list reads clean and holds no task, the op ends not applied and is sent again."""
    fakepve.time_scale = 0.01
    fakepve.add_vm(100, "web", status="running").shutdown_secs = 100
    faults = AnswerFaults(fakepve)
    faults.swallow("POST", SHUTDOWN, 1.0)
    faults.rewrite("GET", "/nodes/pve1/tasks", lambda data: [*data, "garbage"])
    engine = make_engine([Declared(vmid=100, state="stopped")], pve=ProxmoxNode(connect(timeout=0.5)),
                         shutdown_timeout=600, lost_grace=0.2)
    for _ in range(4):
        engine.tick(wait=True)
        time.sleep(0.1)
    assert len(requests_to(fakepve, "POST", SHUTDOWN)) == 1
    assert engine.journal is not None and [op.vmid for op in engine.journal.in_flight()] == [100]
    faults.stop_rewriting()
    _converge(engine, fakepve)
    assert len(requests_to(fakepve, "POST", SHUTDOWN)) == 2
    assert [outcome for outcome, _ in _ended(engine.journal)] == [Outcome.FAILED, Outcome.OK]


def test_recovery_waits_out_the_grace_for_a_task_pve_registers_late(fakepve: Any, fakepve_cafile: str,
                                                                     node: ProxmoxNode, tmp_path: Path) -> None:
    """A restart right after a lost call: the task is not listed yet, the guest does not show the stop;
    recovery looks again until the grace has passed instead of ending it unknown (and re-planning it)."""
    fakepve.time_scale = 0.01
    vm = fakepve.add_vm(100, "web", status="running")
    with Journal.open(tmp_path / "journal") as journal:
        op_id = journal.begin(vmid=100, kind="stop", payload={"type": "qemu"})
        api = ProxmoxAPI("127.0.0.1", port=fakepve.port, user="root@pam", password="secret",
                         verify_ssl=fakepve_cafile, service="PVE")
        late = threading.Timer(1.0, api.nodes("pve1").qemu(100).status.shutdown.post)
        late.start()  # PVE acts on the shutdown a second after recovery first looks
        try:
            decided = recover(journal, node, register_grace=5.0)
        finally:
            late.join()
    assert [(op.op_id, outcome) for op, outcome in decided] == [(op_id, Outcome.OK)]
    assert vm.status == "stopped"


def test_a_call_that_never_connected_is_not_held(fakepve: Any, connect: Callable[..., Connection],
                                                 node: ProxmoxNode, make_engine: Make) -> None:
    """Connection refused: the request never left, so there is nothing to wait for; the op fails "not
    applied" at once, the guest is not held, and the next tick tries again."""
    fakepve.add_vm(100, "web", status="running")
    fakepve.apitokens["reconcile@pve!executor"] = "secret-token"
    dead = ProxmoxNode(connect(port=unused_port(), credentials=Credentials(user="reconcile@pve!executor",
                                                                            token_secret="secret-token")))
    with pytest.raises(PveNotSentError):
        dead.guests()
    engine = make_engine([Declared(vmid=100, state="stopped")], writer=ProxmoxWriter(dead.session))
    engine.tick(wait=True)
    assert engine.journal is not None and not engine.journal.in_flight()
    assert not engine.gate.lane.unsettled()
    assert [(outcome, error.split(":")[0]) for outcome, error in _ended(engine.journal)] == [
        (Outcome.FAILED, "not applied")]
    engine.tick(wait=True)
    assert len(_ended(engine.journal)) == 2


def test_a_running_daemon_sends_a_lost_shutdown_once(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                                     tmp_path: Path) -> None:
    """The fault run's case against a running daemon: PVE takes the shutdown and hangs (here 4 s, with a
    1 s client timeout); the daemon ticks on, sends no second shutdown, and journals the op ok."""
    fakepve.time_scale = 0.01
    vm = fakepve.add_vm(100, "web", status="running")
    vm.shutdown_secs = 600  # 6 s: still running well after the hang
    AnswerFaults(fakepve).lose("POST", SHUTDOWN, 4.0, freeze=True)
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: stopped\n")
    state = tmp_path / "state"
    command = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path,
                  "run", "--desired", str(desired), "--state-dir", str(state))
    log = run_daemon_until(
        [*command, "--interval", "0.2", "--listen", "127.0.0.1:0", "--pve-timeout", "1", "--shutdown-timeout", "900"],
        lambda lines: any('"action"' in line and '"outcome": "ok"' in line for line in lines),
        timeout=40, what="the shutdown never settled")
    assert len(requests_to(fakepve, "POST", SHUTDOWN)) == 1, "the shutdown was sent again"
    assert vm.status == "stopped"
    events = log.events()
    assert [e["event"] for e in events if e["event"] in ("action_in_flight", "answer_lost_task_found")][:1] == [
        "action_in_flight"]
    assert any(e["event"] == "answer_lost_task_found" for e in events)
    with Journal.open(state) as journal:
        assert not journal.in_flight()
        assert [outcome for outcome, _ in _ended(journal)] == [Outcome.OK]
