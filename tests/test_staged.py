"""A change PVE stages for the next restart (issue 15): written once, then shown as staged, never re-planned.

Against fakepve answering like PVE (``tests.pve_like``): a running QEMU guest's ``memory`` is not
hotplugged, so PVE keeps it in the config's [PENDING] section, and ``GET .../config`` answers with it
applied. The executor writes it once, and ``plan``, the tick's summary and its log say it is
"staged, applies at the next restart" until a restart applies it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from executor.api.server import start_api
from executor.app.dryrun import as_json, dry_run, render
from executor.config import ExecutorSettings
from executor.loop.desired import Declared
from executor.loop.engine import Engine
from executor.v1 import executor_pb2 as pb
from executor.v1 import executor_pb2_grpc as pb_grpc
from opctl.doc import Proposal
from planner import server
from tests import pve_like
from tests.executor_helpers import ROOT, cli
from tests.signed_helpers import open_desk

Make = Callable[..., Engine]
CONFIG_WRITES = ("POST", "PUT")


@pytest.fixture(name="fakepve")
def _fakepve(_fakepve_pki: tuple[str, str]) -> Iterator[pve_like.PveLike]:
    """This module's fakepve answers like PVE."""
    with pve_like.serving(_fakepve_pki) as pve:
        yield pve


def config_writes(fakepve: Any, vmid: int) -> list[tuple[str, str]]:
    """The config writes Proxmox received for ``vmid``."""
    return [(m, p) for m, p, _ in fakepve.requests if m in CONFIG_WRITES and p.endswith(f"/qemu/{vmid}/config")]


def pending_reads(fakepve: Any, vmid: int) -> int:
    """The GETs of guest ``vmid``'s /pending Proxmox received."""
    return sum(1 for m, p, _ in fakepve.requests if m == "GET" and p.endswith(f"/qemu/{vmid}/pending"))


def test_a_staged_change_is_written_once_and_reported_staged(fakepve: Any, make_engine: Make) -> None:
    """Four ticks: one config write, then three that plan nothing for the guest and count it staged (logged
    once, with the words plan uses). /pending is read again only when the digest moved: after the write."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024})
    engine = make_engine([Declared(vmid=100, config={"memory": "2048"})])
    first = engine.tick(wait=True)
    assert (first.queued, first.succeeded, first.staged, fakepve.vm(100).pending) == (1, 1, 0, {"memory": "2048"})
    with capture_logs() as logs:
        later = [engine.tick(wait=True) for _ in range(3)]
    assert [(s.queued, s.staged) for s in later] == [(0, 1)] * 3
    assert config_writes(fakepve, 100) == [("POST", "/api2/json/nodes/pve1/qemu/100/config")]
    assert [(e["vmid"], e["keys"], e["note"]) for e in logs if e["event"] == "config_staged"] == [
        (100, ["memory"], "staged, applies at the next restart")]
    assert [e["staged"] for e in logs if e["event"] == "tick"] == [1, 1, 1]
    assert pending_reads(fakepve, 100) == 2  # the first tick's, and the one after the write moved the digest


def test_a_restart_applies_it_and_it_is_no_longer_staged(fakepve: Any, make_engine: Make) -> None:
    """Once a restart applies the pending section, nothing is staged and nothing is written."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024})
    engine = make_engine([Declared(vmid=100, config={"memory": "2048"})])
    engine.tick(wait=True)
    assert engine.tick(wait=True).staged == 1
    fakepve.vm(100).apply_pending()  # what PVE's start does (a restart outside the executor)
    after = engine.tick(wait=True)
    assert (after.queued, after.staged, len(config_writes(fakepve, 100))) == (0, 0, 1)


def test_an_unreadable_pending_section_costs_only_the_staged_count(fakepve: Any, make_engine: Make) -> None:
    """A /pending read that fails is logged; the tick plans from the config read as before (nothing is
    written again) and shows nothing staged for that guest; the next tick reads it again."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024})
    engine = make_engine([Declared(vmid=100, config={"memory": "2048"})])
    engine.tick(wait=True)
    fakepve.fail("GET", "/nodes/pve1/qemu/100/pending", 500, "unable to read config", times=1)
    with capture_logs() as logs:
        failed = engine.tick(wait=True)
    assert (failed.outcome.name, failed.queued, failed.staged) == ("OK", 0, 0)
    assert [e["vmid"] for e in logs if e["event"] == "pending_unreadable"] == [100]
    assert engine.tick(wait=True).staged == 1 and len(config_writes(fakepve, 100)) == 1


def test_status_counts_the_staged_guests(fakepve: Any, make_engine: Make) -> None:
    """GetStatus's last tick carries guests_staged."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024})
    engine = make_engine([Declared(vmid=100, config={"memory": "2048"})])
    engine.tick(wait=True)
    engine.tick(wait=True)
    api = start_api(engine, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            status = pb_grpc.ExecutorServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
    finally:
        api.stop(0)
    assert (status.last_tick.guests_staged, status.last_tick.actions_queued) == (1, 0)


def plan_settings(fakepve: Any, cafile: str, planner: server.Running, tmp_path: Path, guests: str) -> ExecutorSettings:
    """``pve-executor plan``'s settings for a desired file listing ``guests`` (YAML flow lines)."""
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n" + guests)
    return ExecutorSettings(node="pve1", pve_url=f"https://127.0.0.1:{fakepve.port}", pve_user="root@pam",
                            pve_password="secret", pve_ca_file=cafile, desired=str(desired),
                            planner=f"127.0.0.1:{planner.port}", state_dir=str(tmp_path / "state"))


def test_plan_marks_the_staged_change_and_counts_it(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                                    make_engine: Make, tmp_path: Path) -> None:
    """After the write, ``plan`` has nothing to write for the guest: it shows the change marked staged, with
    its value now and at the restart, and a count of staged guests apart; a real change beside it is planned."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024, "cores": 1})
    fakepve.add_vm(101, "db", status="stopped", config={"memory": 512})
    make_engine([Declared(vmid=100, config={"memory": "2048"})]).tick(wait=True)
    settings = plan_settings(fakepve, fakepve_cafile, planner, tmp_path,
                             "  - {vmid: 100, config: {memory: 2048}}\n  - {vmid: 101, config: {memory: 1024}}\n")
    shown = dry_run(settings)
    assert sorted(shown.admission.admitted) == [101]
    text = render(shown, color=False).splitlines()
    assert text[text.index("guest 100: staged, applies at the next restart") + 1] == "    memory: '1024' -> '2048'"
    assert text[-1] == ("Plan: 1 to change, 0 needing APPROVAL, 0 refused for other reasons, 0 skipped, "
                        "0 elsewhere, 1 staged.")
    assert not [line for line in text if line.startswith("guest 100: set config")]
    assert as_json(shown)["staged"] == [{"vmid": 100, "changes": [{"key": "memory", "from": "1024", "to": "2048"}]}]


def test_a_guest_with_nothing_staged_shows_no_marker(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                                      tmp_path: Path) -> None:
    """A pending change the desired file does not declare is not ours to show; the node matches."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024, "cores": 1}, pending={"cores": "2"})
    shown = dry_run(plan_settings(fakepve, fakepve_cafile, planner, tmp_path,
                                  "  - {vmid: 100, config: {memory: 1024}}\n"))
    assert (shown.staged, render(shown, color=False)) == (
        {}, "Plan: 0 to change, 0 needing APPROVAL, 0 refused for other reasons, 0 skipped, 0 elsewhere. "
            "The node matches the desired state.")


def test_an_approved_change_that_pve_stages_is_not_listed_again(fakepve: Any, make_engine: Make,
                                                                 tmp_path: Path) -> None:
    """A MAC change (config.nic_identity, APPROVAL) of a running guest is listed for approval, signed and run;
    fakepve stages it (no NIC hotplug there). The next ticks plan nothing for it: it is not listed for
    approval again (ListPending stays empty), it is counted staged, and Proxmox received one config write."""
    fakepve.add_vm(100, "web", status="running", config={"net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"})
    desk = open_desk(make_engine, tmp_path, [Declared(vmid=100, config={"net0": "virtio=BC:24:11:00:00:02"})])
    assert [r.reason for r in desk.engine.tick(wait=True).refusals] == ["APPROVAL_REQUIRED"]
    (entry,) = desk.engine.gate.pending()
    envelope = desk.sign(Proposal(action=json.loads(entry.descriptor), challenge=None), "alice", role="operator")
    assert desk.run(envelope)[1] is None
    assert fakepve.vm(100).pending == {"net0": "virtio=BC:24:11:00:00:02,bridge=vmbr0"}
    later = [desk.engine.tick(wait=True) for _ in range(2)]
    assert [(s.queued, s.refused, s.pending, s.staged) for s in later] == [(0, 0, 0, 1)] * 2
    assert desk.engine.gate.pending() == []
    assert config_writes(fakepve, 100) == [("POST", "/api2/json/nodes/pve1/qemu/100/config")]


def test_the_plan_command_shows_a_change_staged_outside_the_executor(fakepve: Any, fakepve_cafile: str,
                                                                     planner: server.Running, tmp_path: Path) -> None:
    """`pve-executor plan` as a process: a change someone else staged (the web UI on a running guest) is
    shown staged, exit 0, and nothing is written."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024}, pending={"memory": "2048"})
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - {vmid: 100, config: {memory: 2048}}\n")
    result = subprocess.run(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}",
                                tmp_path, "plan", "--desired", str(desired)),
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["guest 100: staged, applies at the next restart",
                                          "    memory: '1024' -> '2048'",
                                          "",
                                          "Plan: 0 to change, 0 needing APPROVAL, 0 refused for other reasons, "
                                          "0 skipped, 0 elsewhere, "
                                          "1 staged."]
    assert config_writes(fakepve, 100) == []
