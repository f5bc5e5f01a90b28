"""A refused step holds the guest's later steps of the same plan (issue 15): never started with its old config.

The planner emits a guest's config write before its run-state change (``planner.plan``: config first).
When the gate refuses that write (approval, out of scope, a stale digest...), a start, a stop or another
write planned after it for the same guest waits too, named "held", so a guest whose memory change waits
for approval is not started with its old memory. Other guests go on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from executor.app.dryrun import as_json, dry_run, render
from executor.app.wiring import build
from executor.config import ExecutorSettings
from executor.gate.actions import step_from_proto
from executor.gate.decisions import DEFERRED, declaration_of
from executor.gate.gate import Gate
from executor.loop.desired import Declared, FileProvider, StaticProvider
from executor.loop.engine import Engine
from executor.loop.observe import observe
from executor.pve.node import Connection
from journal import Journal
from opctl.doc import Proposal
from planner import server
from planner.v1 import planner_pb2 as pb
from safety.classify import Source
from tests.builders import QEMU, config
from tests.pve_memory import MemoryPve
from tests.signed_helpers import mutations, open_desk, spent

Make = Callable[..., Engine]
# Memory grows and protection goes off in one write: config.protection_off, APPROVAL (an operator's key).
GUARDED = {"memory": "4096", "protection": "0"}


def _start_path(node: str, vmid: int) -> str:
    return f"/api2/json/nodes/{node}/qemu/{vmid}/status/start"


def test_a_refused_config_write_holds_the_start_of_its_guest_only(pve: MemoryPve, make_memory_engine: Make) -> None:
    """100's write needs approval: 100 is not started, with a reason naming the write; 101 is started."""
    pve.add_vm(100, "web", status="stopped", config={"memory": 512, "protection": 1})
    pve.add_vm(101, "db", status="stopped", config={"memory": 512})
    engine = make_memory_engine([Declared(vmid=100, state="running", config=GUARDED),
                                 Declared(vmid=101, state="running", config={"memory": "1024"})])
    summary = engine.tick(wait=True)
    sent = [(m, p) for m, p, _ in pve.requests if m in ("POST", "PUT")]
    assert sent == [("POST", "/api2/json/nodes/pve1/qemu/101/config"), ("POST", _start_path("pve1", 101))]
    assert (pve.vm(100).status, pve.vm(100).config["memory"]) == ("stopped", 512)
    assert (pve.vm(101).status, pve.vm(101).config["memory"]) == ("running", "1024")
    assert (summary.succeeded, summary.refused, summary.held) == (2, 1, 1)
    assert [(r.vmid, r.op_kind, r.reason) for r in summary.refusals] == [(100, "config.protection_off",
                                                                          "APPROVAL_REQUIRED")]
    assert [(p.vmid, p.op_kind) for p in engine.gate.pending()] == [(100, "config.protection_off")]


def _plan(*actions: pb.Action) -> pb.PlanResponse:
    return pb.PlanResponse(actions=list(actions))


def test_every_later_step_of_the_guest_is_held_each_naming_the_refused_one(pve: MemoryPve) -> None:
    """Out of scope, then a stop and a second write of the same guest: both held (a later step refused on its
    own is refused); the other guest's stop runs."""
    pve.add_vm(100, "web", status="running", config={"memory": 512})
    pve.add_vm(101, "db", status="running")
    declared = {100: Declared(vmid=100, state="stopped", config={"memory": "1024", "cores": "2"}),
                101: Declared(vmid=101, state="stopped")}
    stop = pb.StopAction()
    hook, cores = config(100, {"hookscript": "local:snippets/x.sh"}), config(100, {"cores": "2"})
    undeclared = config(100, {"onboot": "1"})  # refused on its own: it says so, and is no more held than refused
    steps = {100: [step_from_proto(a) for a in (hook, pb.Action(vmid=100, type=QEMU, stop=stop), cores, undeclared)],
             101: [step_from_proto(pb.Action(vmid=101, type=QEMU, stop=stop))]}
    gate = Gate(reader=pve, writer=pve)
    observed = observe(pve, list(declared.values()))
    admission = gate.admit(steps, observed=observed, source=Source.LOCAL_FILE, declared={
        v: declaration_of(v, d.state, d.config, d.description) for v, d in declared.items()})
    assert list(admission.admitted) == [101]
    decided = [(j.step.vmid, j.step.kind, j.reason) for j in admission.judged]
    assert decided == [(100, "set_config", "OUT_OF_SCOPE"), (100, "stop", DEFERRED), (100, "set_config", DEFERRED),
                       (100, "set_config", "OUT_OF_SCOPE"), (101, "stop", None)]
    held = [j for j in admission.judged if j.reason == DEFERRED]
    assert all(j.detail.startswith("held: waits for config step") and "OUT_OF_SCOPE" in j.detail for j in held)
    assert all(j.decision == "deferred" for j in held)
    assert [(j.step.vmid, j.step.kind) for j in admission.held] == [(100, "stop"), (100, "set_config")]
    assert [r.vmid for r in admission.refused] == [100, 100]  # a held step is no refusal of its own, lists nothing
    assert [p.vmid for p in admission.pending] == []


def test_an_approved_write_runs_then_the_start_in_that_order(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Over HTTPS: no start while the write waits; approved by alice, the write runs, then the next tick's start."""
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512, "protection": 1})
    desk = open_desk(make_engine, tmp_path, [Declared(vmid=100, state="running", config=GUARDED)])
    before = len(fakepve.requests)
    summaries = [desk.engine.tick(wait=True) for _ in range(2)]  # every tick: the write refused, the start held
    assert mutations(fakepve, before) == []
    assert [(s.refused, s.held, s.queued) for s in summaries] == [(1, 1, 0)] * 2
    assert (fakepve.vm(100).status, fakepve.vm(100).config["memory"]) == ("stopped", 512)
    (entry,) = desk.engine.gate.pending()
    proposal = Proposal(action=json.loads(entry.descriptor), challenge=entry.challenge or None)
    op_id, refusal = desk.run(desk.sign(proposal, "alice", role="operator"))
    assert refusal is None and spent(desk, op_id)
    after_op = desk.engine.tick(wait=True)
    assert (after_op.refused, after_op.held, after_op.succeeded) == (0, 0, 1)
    assert mutations(fakepve, before) == [("POST", "/api2/json/nodes/pve1/qemu/100/config"),
                                          ("POST", _start_path("pve1", 100))]
    vm = fakepve.vm(100)
    assert (vm.status, str(vm.config["memory"]), str(vm.config["protection"])) == ("running", "4096", "0")


def test_a_standing_refusal_is_logged_once_and_counted(pve: MemoryPve, make_memory_engine: Make) -> None:
    """The same refusal, tick after tick: one gate_refused event, a gauge of standing refusals; logged again on
    a change, and cleared once the guest no longer asks for it."""
    pve.add_vm(100, "web", status="stopped", config={"memory": 512, "protection": 1})
    pve.add_vm(101, "db", status="stopped")
    desired = [Declared(vmid=100, state="stopped", config=GUARDED)]
    provider = StaticProvider(desired)
    engine = make_memory_engine(desired, provider=provider)
    with capture_logs() as logs:
        for _ in range(3):
            assert engine.tick(wait=True).refused == 1
    refused = [e for e in logs if e["event"] == "gate_refused"]
    assert [(e["vmid"], e["reason"]) for e in refused] == [(100, "APPROVAL_REQUIRED")]
    standing = engine.metrics.registry.get_sample_value("pve_executor_gate_refusals_standing")
    assert standing == 1.0
    labels = {"class": "approval", "decision": "refused", "reason": "approval_required"}
    decided = engine.metrics.registry.get_sample_value("pve_executor_gate_decisions_total", labels)
    assert decided == 3.0  # the decisions are still counted per tick
    provider.guests = [Declared(vmid=100, state="stopped", config={"memory": "8192", "protection": "0"})]
    with capture_logs() as logs:
        engine.tick(wait=True)
        engine.tick(wait=True)
    assert [e["vmid"] for e in logs if e["event"] == "gate_refused"] == [100]  # another value: logged again, once
    provider.guests = [Declared(vmid=100, state="stopped")]  # nothing left to ask
    with capture_logs() as logs:
        engine.tick(wait=True)
    assert [e["vmid"] for e in logs if e["event"] == "gate_refusal_cleared"] == [100]
    assert engine.metrics.registry.get_sample_value("pve_executor_gate_refusals_standing") == 0.0
    provider.guests = [Declared(vmid=100, state="stopped", config=GUARDED)]
    engine.tick(wait=True)
    provider.guests = [Declared(vmid=101, state="stopped")]  # 100 no longer declared at all
    with capture_logs() as logs:
        engine.tick(wait=True)
    assert [e["vmid"] for e in logs if e["event"] == "gate_refusal_cleared"] == [100]
    assert engine.metrics.registry.get_sample_value("pve_executor_gate_refusals_standing") == 0.0


def test_the_action_event_carries_the_tasks_upid(pve: MemoryPve, make_memory_engine: Make) -> None:
    """The action event of a step that ran a task names its UPID (bound once the task started)."""
    pve.add_vm(100, "web", status="stopped")
    engine = make_memory_engine([Declared(vmid=100, state="running")])
    with capture_logs() as logs:
        assert engine.tick(wait=True).succeeded == 1
    (action,) = [e for e in logs if e["event"] == "action"]
    (task,) = pve.tasks_of(100)
    assert (action["upid"], action["vmid"], action["outcome"]) == (task.upid, 100, "ok")


def test_plan_shows_the_held_start_and_run_sends_what_plan_promised(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, connect: Callable[..., Connection],
        tmp_path: Path) -> None:
    """``pve-executor plan`` names the held start and the step it waits for; ``run`` then sends nothing for 100."""
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512, "protection": 1})
    fakepve.add_vm(101, "db", status="stopped")
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - {vmid: 100, state: running, config: {memory: 4096, protection: 0}}\n"
                       "  - {vmid: 101, state: running}\n")
    settings = ExecutorSettings(node="pve1", pve_url=f"https://127.0.0.1:{fakepve.port}", pve_user="root@pam",
                                pve_password="secret", pve_ca_file=fakepve_cafile, desired=str(desired),
                                planner=f"127.0.0.1:{planner.port}", state_dir=str(tmp_path / "state"))
    shown = dry_run(settings)
    lines = render(shown, color=False).splitlines()
    assert "guest 100: start [BENIGN] DEFERRED: held: waits for config step (config.protection_off), refused " \
           "APPROVAL_REQUIRED" in lines
    held = [v for v in as_json(shown)["steps"] if v["decision"] == "DEFERRED"]
    assert [(v["vmid"], v["action"], v["detail"].split(",")[0]) for v in held] == [
        (100, "start", "held: waits for config step (config.protection_off)")]
    before = len(fakepve.requests)
    parts = build(settings, connect(), FileProvider(desired), Journal.open(tmp_path / "state"))
    try:
        parts.engine.tick(wait=True)
    finally:
        parts.close(5)
    assert mutations(fakepve, before) == [("POST", _start_path("pve1", 101))]
