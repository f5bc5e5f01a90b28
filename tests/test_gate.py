"""The safety gate: whatever the planner returns, only declared, benign steps reach Proxmox."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from executor.api.server import start_api
from executor.loop.desired import Declared
from executor.loop.engine import Engine, TickOutcome
from executor.pve.node import ProxmoxNode
from executor.pve.write import ProxmoxWriter
from executor.v1 import executor_pb2 as epb
from executor.v1 import executor_pb2_grpc as epb_grpc
from journal import RefusalRecord
from planner.v1 import planner_pb2 as pb
from safety.classify import Source
from tests.builders import QEMU, config
from tests.executor_helpers import mutations
from tests.planner_standins import scripted_planner
from tests.pve_memory import MemoryPve

__all__ = ["config", "mutations", "scripted_planner"]  # still importable from here, where they were first written

Make = Callable[..., Engine]
UNKNOWN_FIELD = b"\x78\x01"  # field 15, varint 1: an action kind a newer planner might send


@pytest.fixture(name="make_engine")
def _make_engine(make_memory_engine: Make) -> Make:
    """The gate's tests run over the in-memory Proxmox stand-in; HTTP is fakepve's tests' business."""
    return make_memory_engine


def unknown_kind(vmid: int) -> pb.Action:
    """An action whose kind this executor's contract does not know (an unknown oneof field)."""
    action = pb.Action()
    action.MergeFromString(pb.Action(vmid=vmid, type=QEMU).SerializeToString() + UNKNOWN_FIELD)
    return action


@pytest.fixture(name="hostile")
def _hostile(pve: MemoryPve) -> list[Declared]:
    """Five guests and what is declared for them (104 exists and is not declared)."""
    pve.add_vm(100, "web", status="stopped", config={"memory": 512})
    pve.add_vm(101, "db", status="stopped", config={"scsi0": "local-lvm:vm-101-disk-0,size=32G"})
    pve.add_vm(102, "hooked", status="stopped", config={"memory": 512})
    pve.add_vm(103, "cache", status="running")
    pve.add_vm(104, "undeclared", status="stopped")
    # 101 and 102 declare the very change the planner sends: in scope, and still never benign.
    return [Declared(vmid=100, state="running", config={"memory": "1024"}),
            Declared(vmid=101, config={"scsi0": ""}),
            Declared(vmid=102, config={"hookscript": "local:snippets/evil.sh"}),
            Declared(vmid=103, state="running")]


HOSTILE = [config(100, {"memory": "1024"}), unknown_kind(100), config(100, {"cores": "8"}),
           pb.Action(vmid=100, type=QEMU, start=pb.StartAction()), config(101, delete=("scsi0",)),
           config(102, {"hookscript": "local:snippets/evil.sh"}), pb.Action(vmid=103, type=QEMU, stop=pb.StopAction()),
           pb.Action(vmid=104, type=QEMU, start=pb.StartAction())]
EXPECTED = {(100, "unknown", "UNKNOWN_KIND"), (100, "config", "OUT_OF_SCOPE"),
            (101, "config.disk_detach", "APPROVAL_REQUIRED"), (102, "config.host_code", "APPROVAL_REQUIRED"),
            (103, "stop", "OUT_OF_SCOPE"), (104, "start", "OUT_OF_SCOPE")}


def test_a_hostile_planner_gets_nothing_but_declared_benign_steps_run(pve: MemoryPve, hostile: list[Declared],
                                                                      make_engine: Make) -> None:
    """A disk delete, hookscript, an unknown kind, an undeclared guest, a stop against the declared state
    and an undeclared key never reach Proxmox; each is refused with its reason; the valid steps converge;
    the daemon keeps ticking and journals each refusal once."""
    later = [pb.PlanResponse(actions=HOSTILE[1:3] + HOSTILE[4:])]  # the valid steps only on the first call
    with scripted_planner([pb.PlanResponse(actions=HOSTILE), *later]) as target:
        engine = make_engine(hostile, planner_target=target)
        first = engine.tick(wait=True)
        sent = mutations(pve)
        # 100's start comes after its refused steps: held (issue 15), never run on a config that may lack them.
        assert sorted((m, p) for m, p, _ in sent) == [("POST", "/api2/json/nodes/pve1/qemu/100/config")]
        assert "cores" not in str(sent[0][2])
        assert (pve.vm(100).status, str(pve.vm(100).config["memory"])) == ("stopped", "1024")
        assert "scsi0" in pve.vm(101).config and "hookscript" not in pve.vm(102).config
        assert {(r.vmid, r.op_kind, r.reason) for r in first.refusals} == EXPECTED
        assert (first.outcome, first.succeeded, first.refused, first.pending, first.held) == (TickOutcome.OK, 1, 6,
                                                                                               2, 1)
        before = len(pve.requests)
        second = engine.tick(wait=True)
        assert mutations(pve, before) == []
        assert {(r.vmid, r.op_kind, r.reason) for r in second.refusals} == EXPECTED
    assert engine.journal is not None
    journaled = [r for r in engine.journal.recent(1000) if isinstance(r, RefusalRecord)]
    assert sorted((r.vmid, r.kind, r.reason) for r in journaled) == sorted(EXPECTED)  # once, not per tick
    labels = {"class": "destructive", "decision": "refused", "reason": "approval_required"}
    decided = engine.metrics.registry.get_sample_value("pve_executor_gate_decisions_total", labels)
    assert decided == 4


def test_pending_approvals_describe_the_exact_action(pve: MemoryPve, hostile: list[Declared],
                                                     make_engine: Make) -> None:
    """ListPending shows each refused non-benign step with its class, reasons and a descriptor that binds
    node, guest, kind, parameters and the digest it was planned from; GetStatus reports the gate."""
    with scripted_planner([pb.PlanResponse(actions=HOSTILE[4:6])]) as target:
        engine = make_engine(hostile, planner_target=target)
        api = start_api(engine, "127.0.0.1:0")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
                stub = epb_grpc.ExecutorServiceStub(channel)
                reconciled = stub.Reconcile(epb.ReconcileRequest(), timeout=30)
                pending = stub.ListPending(epb.ListPendingRequest(), timeout=5).pending
                status = stub.GetStatus(epb.GetStatusRequest(), timeout=5)
                operations = stub.ListOperations(epb.ListOperationsRequest(), timeout=5).operations
        finally:
            api.stop(0)
    assert {(r.vmid, r.reason) for r in reconciled.refusals} == {(101, epb.REFUSAL_REASON_APPROVAL_REQUIRED),
                                                                 (102, epb.REFUSAL_REASON_APPROVAL_REQUIRED)}
    assert [(p.vmid, p.op_kind, p.action_class) for p in pending] == [
        (101, "config.disk_detach", epb.ACTION_CLASS_DESTRUCTIVE),
        (102, "config.host_code", epb.ACTION_CLASS_DESTRUCTIVE)]
    detach = json.loads(pending[0].descriptor)
    _, digest = engine.pve.config("qemu", 101)
    assert detach == {"audience": "pve1@fakecluster", "class": "DESTRUCTIVE", "guest_type": "qemu",
                      "kind": "config.disk_detach", "params": {"delete": ["scsi0"], "force": False, "set": {}},
                      "precondition": {"digest": digest, "run_state": "stopped"}, "vmid": 101}
    assert re.fullmatch(r"\d+\.[0-9a-f]{64}", pending[0].challenge)  # what a DESTRUCTIVE approval must carry
    assert pending[0].reasons and pending[0].source == "local_file" and len(pending[0].descriptor_sha256) == 64
    assert (status.gate.pending, status.gate.refused, status.gate.journal_ok) == (2, 2, True)
    assert [o.refusal.reason for o in operations if o.record == "refused"] == [epb.REFUSAL_REASON_APPROVAL_REQUIRED] * 2


def test_without_a_journal_only_benign_steps_run(pve: MemoryPve, hostile: list[Declared], make_engine: Make) -> None:
    """Journal-less (it could not open, or a write failed): benign steps still run, nothing else."""
    with scripted_planner([pb.PlanResponse(actions=[HOSTILE[0], HOSTILE[4]])]) as target:
        summary = make_engine(hostile, planner_target=target, journal=False).tick(wait=True)
    assert summary.succeeded == 1
    assert [(r.vmid, r.reason) for r in summary.refusals] == [(101, "JOURNAL_UNAVAILABLE")]
    assert "scsi0" in pve.vm(101).config


def test_a_mac_changing_net_write_needs_approval(pve: MemoryPve, make_engine: Make) -> None:
    """A netN write that would give the guest a new MAC is refused: out of scope when the declaration did not ask
    for it (a planner dropping the MAC), needing approval when it did (a declared new MAC); one that keeps it runs."""
    pve.add_vm(100, "web", status="stopped", config={"net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"})
    declared = [Declared(vmid=100, config={"net0": "virtio,bridge=vmbr1"})]
    new_mac = config(100, {"net0": "virtio,bridge=vmbr1"})
    with scripted_planner([pb.PlanResponse(actions=[new_mac])]) as target:
        refused = make_engine(declared, planner_target=target).tick(wait=True)
    assert [(r.op_kind, r.reason) for r in refused.refusals] == [("config.nic_identity", "OUT_OF_SCOPE")]
    assert pve.vm(100).config["net0"].endswith("bridge=vmbr0")
    pinned = make_engine([Declared(vmid=100, config={"net0": "virtio=BC:24:11:00:00:99,bridge=vmbr1"})])
    asked = pinned.tick(wait=True)
    assert [(r.op_kind, r.reason) for r in asked.refusals] == [("config.nic_identity", "APPROVAL_REQUIRED")]
    assert pve.vm(100).config["net0"].endswith("bridge=vmbr0")
    kept = make_engine(declared).tick(wait=True)  # the real planner keeps the MAC
    assert (kept.succeeded, kept.refused) == (1, 0)
    assert pve.vm(100).config["net0"].upper().startswith("VIRTIO=BC:24:11:00:00:01")


def test_a_remote_source_stops_a_few_guests_per_tick_and_never_drains_the_node(pve: MemoryPve,
                                                                               make_engine: Make) -> None:
    """A hub stopping 12 of 50 guests runs max(2, 10%) = 5 stops a tick, the rest deferred; a hub stopping
    40 of 50 gets every stop refused as needing approval; the node's own file has no limit."""
    for vmid in range(100, 150):
        pve.add_vm(vmid, f"vm{vmid}", status="running")
    few = [Declared(vmid=v, state="stopped" if v < 112 else "running") for v in range(100, 150)]
    hub = make_engine(few, source=Source.HUB, stop_window=0.0)  # the limit per tick (the window is its own test)
    first = hub.tick(wait=True)
    assert (first.succeeded, first.stops_deferred) == (5, 7)
    assert sorted(v.vmid for v in pve.vms if v.status == "stopped") == list(range(100, 105))
    while hub.tick(wait=True).stops_deferred:
        pass
    assert sum(v.status == "stopped" for v in pve.vms) == 12
    many = [Declared(vmid=v, state="stopped" if v < 140 else "running") for v in range(100, 150)]
    before = len(pve.requests)
    drained = make_engine(many, source=Source.HUB).tick(wait=True)
    assert mutations(pve, before) == []
    assert {r.reason for r in drained.refusals} == {"APPROVAL_REQUIRED"} and drained.refused == 28
    local = make_engine(many, source=Source.LOCAL_FILE).tick(wait=True)
    assert (local.succeeded, local.refused, local.stops_deferred) == (28, 0, 0)


def test_only_the_gate_holds_the_proxmox_writer(fakepve: Any, fakepve_cafile: str, planner: Any,
                                                tmp_path: Any) -> None:
    """The reader has no mutating call, and of all the parts the daemon builds only the gate holds a writer."""
    from executor.app.wiring import build  # noqa: PLC0415
    from executor.config import ExecutorSettings  # noqa: PLC0415
    from executor.loop.desired import EmptyProvider  # noqa: PLC0415
    from executor.pve.node import Connection, Credentials  # noqa: PLC0415

    assert not {"start", "shutdown", "set_config"} & set(dir(ProxmoxNode))
    conn = Connection(host="127.0.0.1", port=fakepve.port, node="pve1", ca_file=fakepve_cafile,
                      credentials=Credentials(user="root@pam", password="secret"))
    parts = build(ExecutorSettings(planner=f"127.0.0.1:{planner.port}"), conn, EmptyProvider(), None)
    try:
        holders = [path for path, value in _walk(parts, "parts") if isinstance(value, ProxmoxWriter)]
        assert holders == ["parts.engine.gate.lane._writer"]
    finally:
        parts.close(1)


def _walk(value: Any, path: str, seen: set[int] | None = None) -> Iterator[tuple[str, Any]]:
    """Every attribute reachable from ``value`` through our own objects (not into libraries)."""
    seen = seen if seen is not None else set()
    if id(value) in seen:
        return
    seen.add(id(value))
    yield path, value
    if not type(value).__module__.startswith(("executor", "journal", "safety")):
        return
    names = list(getattr(value, "__dict__", {})) + [s for c in type(value).__mro__ for s in getattr(c, "__slots__", ())]
    for name in names:
        if hasattr(value, name):
            yield from _walk(getattr(value, name), f"{path}.{name}", seen)


def test_a_start_that_would_apply_a_pending_disk_change_needs_approval(pve: MemoryPve, make_engine: Make) -> None:
    """PVE's start applies the pending section: with a disk delete pending, the start is as destructive as
    that delete, refused in the guest's lane (one read of /pending, no start) and listed for approval; a
    pending memory change is benign, and that start runs."""
    pve.add_vm(100, "web", status="stopped", config={"scsi1": "local-lvm:vm-100-disk-1,size=8G"},
                   pending={"scsi1": None})
    pve.add_vm(101, "db", status="stopped", pending={"memory": 2048})
    engine = make_engine([Declared(vmid=100, state="running"), Declared(vmid=101, state="running")])
    summary = engine.tick(wait=True)
    assert [p for m, p, _ in mutations(pve)] == ["/api2/json/nodes/pve1/qemu/101/status/start"]
    assert [(r.vmid, r.op_kind, r.reason) for r in summary.refusals] == [(100, "start", "APPROVAL_REQUIRED")]
    listed = [(p.vmid, p.cls.name, p.rule) for p in engine.gate.pending()]
    assert listed == [(100, "DESTRUCTIVE", "pending_disk_detach")]
    assert pve.vm(100).status == "stopped" and pve.vm(101).status == "running"


def test_a_remote_source_cannot_stop_a_protected_guest(pve: MemoryPve, make_engine: Make) -> None:
    """PVE's protection flag makes a hub's stop need approval (read in the lane); the local file may stop it."""
    pve.add_vm(100, "guarded", status="running", config={"protection": 1})
    pve.add_vm(101, "plain", status="running")
    for vmid in range(102, 106):  # declared running: two stops of six stay under the blast-radius rule
        pve.add_vm(vmid, f"vm{vmid}", status="running")
    declared = [Declared(vmid=100, state="stopped"), Declared(vmid=101, state="stopped"),
                *(Declared(vmid=v, state="running") for v in range(102, 106))]
    hub = make_engine(declared, source=Source.HUB).tick(wait=True)
    assert [(r.vmid, r.op_kind, r.reason) for r in hub.refusals] == [(100, "stop", "APPROVAL_REQUIRED")]
    assert (pve.vm(100).status, pve.vm(101).status) == ("running", "stopped")
    assert make_engine(declared[:1]).tick(wait=True).succeeded == 1
    assert pve.vm(100).status == "stopped"


def test_a_held_guest_still_counts_for_the_blast_radius(pve: MemoryPve, make_engine: Make) -> None:
    """A guest held out of a tick (busy, or a signed op queued for it) is still managed, and still stopped:
    a hub that asks to stop 2 more of 5 guests while 1 is already stopped (and held) reaches more than half,
    and those stops need approval."""
    for vmid in range(110, 115):
        pve.add_vm(vmid, f"vm{vmid}", status="stopped" if vmid == 111 else "running")
    declared = [Declared(vmid=v, state="stopped" if v < 113 else "running") for v in range(110, 115)]
    # 111 held, e.g. its approved stop just ran in its lane
    engine = make_engine(declared, source=Source.HUB, max_stops_per_tick=10, holders=(lambda: {111},))
    summary = engine.tick(wait=True)
    assert mutations(pve) == []
    assert sorted((r.vmid, r.reason) for r in summary.refusals) == [(110, "APPROVAL_REQUIRED"),
                                                                     (112, "APPROVAL_REQUIRED")]
