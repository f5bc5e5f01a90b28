"""What a tick reads can disagree with itself; the disagreement is never an alarm nor a write (issue 15).

A tick reads the node's guest list, then configs, then (only for a declared guest missing from the list)
``/cluster/resources``. A migration that ends between the list and the cluster read puts the guest on
this node in the second read and nowhere in the first: that guest exists, it is not NOT_FOUND, in the
daemon or in ``plan``. A backup that begins between the list and the config read shows only in the
config (PVE writes ``lock: backup`` there): that lock counts, as the list's would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from executor.app.dryrun import as_json, dry_run, render
from executor.config import ExecutorSettings
from executor.gate.decisions import LOCKED
from executor.loop.desired import Declared
from executor.loop.engine import Engine
from planner import server
from tests.answer_faults import AnswerFaults
from tests.executor_helpers import requests_to
from tests.signed_helpers import mutations, open_desk, spent

Make = Callable[..., Engine]
RESOURCES = "/cluster/resources"


def _migrating(fakepve: Any) -> Iterator[None]:
    """201 lives on pve2; its migration to pve1 ends right after pve1's QEMU guest list is answered (once)."""
    fakepve.add_node("pve2")
    fakepve.add_vm(100, "web", status="running")
    fakepve.add_vm(201, "db", node="pve2", status="stopped")
    faults = AnswerFaults(fakepve)
    landed: list[int] = []

    def land(data: Any) -> Any:
        if not landed:  # the answer is made; the migration's last step (201's config moves to pve1) comes now
            fakepve.vm(201).node = "pve1"
            landed.append(201)
        return data

    faults.rewrite("GET", "/nodes/pve1/qemu", land)
    yield


@pytest.fixture(name="migrating")
def _migrating_fixture(fakepve: Any) -> Iterator[None]:
    yield from _migrating(fakepve)


DESIRED = [Declared(vmid=100, state="running"), Declared(vmid=201, state="running")]


def test_a_guest_that_lands_between_the_two_reads_is_not_reported_missing(fakepve: Any, make_engine: Make,
                                                                           migrating: None) -> None:
    """The daemon's tick: 201 in /cluster/resources on pve1 but not in the list read before it: not skipped as
    NOT_FOUND, nothing sent for it; the next tick finds it on the list and starts it."""
    engine = make_engine(DESIRED)
    before = len(fakepve.requests)
    first = engine.tick(wait=True)
    assert len(requests_to(fakepve, "GET", RESOURCES, before)) == 1  # the window was hit: the cluster was read
    assert fakepve.vm(201).node == "pve1"
    assert (first.skipped, first.elsewhere, first.queued) == (0, 1, 0), "201 reported NOT_FOUND"
    assert mutations(fakepve, before) == []
    second = engine.tick(wait=True)
    assert (second.skipped, second.elsewhere, second.succeeded) == (0, 0, 1)
    assert mutations(fakepve, before) == [("POST", "/api2/json/nodes/pve1/qemu/201/status/start")]


def test_plan_does_not_call_a_landing_guest_not_found(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                                     migrating: None, tmp_path: Path) -> None:
    """``pve-executor plan`` reads the same way: no NOT_FOUND skip for 201 in its text or its JSON."""
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - {vmid: 100, state: running}\n  - {vmid: 201, state: running}\n")
    settings = ExecutorSettings(node="pve1", pve_url=f"https://127.0.0.1:{fakepve.port}", pve_user="root@pam",
                                pve_password="secret", pve_ca_file=fakepve_cafile, desired=str(desired),
                                planner=f"127.0.0.1:{planner.port}", state_dir=str(tmp_path / "state"))
    shown = dry_run(settings)
    assert fakepve.vm(201).node == "pve1"
    assert "not_found" not in render(shown, color=False)
    assert as_json(shown).get("skipped", []) == []
    assert as_json(shown)["elsewhere"] == [201]


def test_a_lock_in_the_config_read_counts_as_a_lock(fakepve: Any, make_engine: Make) -> None:
    """A backup begun after the list was read: ``lock: backup`` only in the config; no write, no start, LOCKED."""
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512})
    fakepve.vm(100).config["lock"] = "backup"  # as PVE writes it; the list entry says nothing of it
    engine = make_engine([Declared(vmid=100, state="running", config={"memory": "1024"})])
    before = len(fakepve.requests)
    summary = engine.tick(wait=True)
    assert mutations(fakepve, before) == []
    assert (summary.skipped, summary.queued) == (1, 0)
    fakepve.vm(100).config.pop("lock")  # the backup ended
    assert engine.tick(wait=True).succeeded == 2
    assert mutations(fakepve, before) == [("POST", "/api2/json/nodes/pve1/qemu/100/config"),
                                          ("POST", "/api2/json/nodes/pve1/qemu/100/status/start")]


def test_a_start_whose_config_read_shows_a_lock_is_not_sent(fakepve: Any, make_engine: Make) -> None:
    """Declared for its run state only (no config read to plan from): the start's own read, right before the
    call, shows ``lock: backup``; no start is sent, refused LOCKED, and started once the backup ended."""
    fakepve.add_vm(100, "web", status="stopped")
    fakepve.vm(100).config["lock"] = "backup"
    engine = make_engine([Declared(vmid=100, state="running")])
    before = len(fakepve.requests)
    summary = engine.tick(wait=True)
    assert mutations(fakepve, before) == []
    assert [(r.vmid, r.reason) for r in summary.refusals] == [(100, LOCKED)]
    fakepve.vm(100).config.pop("lock")
    assert engine.tick(wait=True).succeeded == 1
    assert mutations(fakepve, before) == [("POST", "/api2/json/nodes/pve1/qemu/100/status/start")]


def test_plan_names_the_config_lock(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                    tmp_path: Path) -> None:
    """``plan`` shows the guest skipped as locked, naming the lock the config carries."""
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512})
    fakepve.vm(100).config["lock"] = "backup"
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - {vmid: 100, state: running, config: {memory: 1024}}\n")
    settings = ExecutorSettings(node="pve1", pve_url=f"https://127.0.0.1:{fakepve.port}", pve_user="root@pam",
                                pve_password="secret", pve_ca_file=fakepve_cafile, desired=str(desired),
                                planner=f"127.0.0.1:{planner.port}", state_dir=str(tmp_path / "state"))
    text = render(dry_run(settings), color=False)
    assert text.splitlines()[:2] == ["guest 100: SKIPPED LOCKED", "    guest is locked (backup)"]


def test_a_signed_op_on_a_guest_locked_only_in_its_config_is_refused_locked(fakepve: Any, make_engine: Make,
                                                                           tmp_path: Path) -> None:
    """The lane's fresh read for a signed op: the config's lock refuses it LOCKED (not spent, retried later)."""
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512})
    desk = open_desk(make_engine, tmp_path)
    proposal = desk.propose(100, "snapshot.create", snapname="s1")
    fakepve.vm(100).config["lock"] = "backup"  # after the proposal: the signed digest would not match otherwise
    before = len(fakepve.requests)
    op_id, refusal = desk.run(desk.sign(proposal, "alice", role="operator"))
    assert mutations(fakepve, before) == []
    assert refusal is None or refusal.reason == LOCKED
    assert not spent(desk, op_id)
