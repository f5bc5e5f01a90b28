"""`pve-executor plan` shows exactly what `run` would do (the same read path, plan and gate), readably."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.app.dryrun import DryRun, dry_run, render
from executor.app.wiring import build
from executor.config import CONNECTION, EXTRAS, RUN, ExecutorSettings, settings_fields
from executor.gate.actions import SET_CONFIG, Step
from executor.gate.decisions import Admission, Judged
from executor.loop.desired import FileProvider
from executor.loop.engine import TickOutcome
from executor.loop.observe import Observed
from executor.pve.node import Connection
from journal import Journal
from planner import server
from planner.v1 import planner_pb2 as pb
from safety.classify import Class, Verdict

MUTATION = re.compile(r"/nodes/pve1/(qemu|lxc)/(\d+)/(status/start|status/shutdown|config)$")
KINDS = {"status/start": "start", "status/shutdown": "stop", "config": "set_config"}


def _converge(fakepve: Any) -> str:
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512})
    fakepve.add_ct(101, "cache", status="running", config={"memory": 512})
    fakepve.add_vm(102, "idle", status="running")
    return ("  - {vmid: 100, state: running, config: {memory: 1024}, description: web tier}\n"
            "  - {vmid: 101, state: stopped, config: {memory: 256}}\n  - {vmid: 102, state: running}\n")


def _locked_and_missing(fakepve: Any) -> str:
    fakepve.add_node("pve2")
    fakepve.add_vm(100, "backup", status="stopped", lock="backup")
    fakepve.add_vm(201, "there", node="pve2", status="stopped")
    return "  - {vmid: 100, state: running}\n  - {vmid: 201, state: running}\n  - {vmid: 300, state: running}\n"


def _disk_and_nic(fakepve: Any) -> str:
    fakepve.add_vm(100, "db", status="stopped", config={"scsi0": "local-lvm:vm-100-disk-0,size=32G",
                                                        "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"})
    fakepve.add_vm(101, "guarded", status="stopped", config={"protection": 1})
    return ("  - vmid: 100\n    config: {scsi0: 'local-lvm:vm-100-disk-0,size=64G', net0: 'virtio,bridge=vmbr1',"
            " onboot: 1}\n  - {vmid: 101, config: {protection: 0}}\n")


def _unreadable_config(fakepve: Any) -> str:
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512})
    fakepve.add_vm(101, "db", status="stopped", config={"memory": 512})
    fakepve.fail("GET", "/nodes/pve1/qemu/101/config", 500, "unable to read config")
    return ("  - {vmid: 100, state: running, config: {memory: 1024}}\n"
            "  - {vmid: 101, state: running, config: {memory: 1024}}\n")


def _hub_stops_too_many(fakepve: Any) -> str:
    for vmid in range(100, 104):
        fakepve.add_vm(vmid, f"vm{vmid}", status="running")
    return "".join(f"  - {{vmid: {v}, state: stopped}}\n" for v in range(100, 104))


@pytest.mark.parametrize("scenario", [_converge, _locked_and_missing, _disk_and_nic, _unreadable_config,
                                      _hub_stops_too_many])
def test_plan_and_run_agree(scenario: Callable[[Any], str], fakepve: Any, fakepve_cafile: str,
                            planner: server.Running, connect: Callable[..., Connection], tmp_path: Path) -> None:
    """What the dry run admits is exactly what one tick sends; it refuses what the tick refuses."""
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n" + scenario(fakepve))
    if scenario is _hub_stops_too_many:
        desired.chmod(0o666)  # writable by others: not trusted as the node's own file, a remote source
    settings = ExecutorSettings(node="pve1", pve_url=f"https://127.0.0.1:{fakepve.port}", pve_user="root@pam",
                                pve_password="secret", pve_ca_file=fakepve_cafile, desired=str(desired),
                                planner=f"127.0.0.1:{planner.port}", state_dir=str(tmp_path / "state"))
    shown = dry_run(settings)
    promised = sorted((s.step.vmid, s.step.kind) for steps in shown.admission.admitted.values() for s in steps)
    before = len(fakepve.requests)
    parts = build(settings, connect(), FileProvider(desired), Journal.open(tmp_path / "state"))
    try:
        summary = parts.engine.tick(wait=True)
    finally:
        parts.close(5)
    sent = sorted((int(m.group(2)), KINDS[m.group(3)]) for method, path, _ in fakepve.requests[before:]
                  if method in ("POST", "PUT") and (m := MUTATION.search(path)))
    assert sent == promised
    assert {(r.vmid, r.op_kind, r.reason) for r in summary.refusals} == {
        (r.vmid, r.op_kind, r.reason) for r in shown.admission.refused}
    assert summary.outcome in (TickOutcome.OK, TickOutcome.ACTIONS_FAILED)


def test_every_setting_is_a_typed_field() -> None:
    """The typed settings and the declared options are the same list, so mypy checks every setting's use."""
    assert settings_fields() == {o.key for o in (*CONNECTION, *RUN)} | set(EXTRAS)


def test_plan_output_is_coloured_only_on_a_tty() -> None:
    """The dry run reads at a glance: key, current, desired; colour codes only when asked for."""
    plan = pb.PlanResponse(actions=[pb.Action(vmid=100, type=pb.GUEST_TYPE_QEMU,
                                              set_config=pb.SetConfigAction(set={"memory": "4096"}))])
    step = Step(vmid=100, guest_type="qemu", kind=SET_CONFIG, set=(("memory", "4096"),))
    verdict = Verdict(cls=Class.BENIGN, op_kind="config", rule="benign_key", reasons=())
    result = DryRun(plan, Admission(admitted={}, judged=(Judged(step=step, verdict=verdict),)),
                    Observed(guests={}, configs={100: ({"memory": "2048"}, "")}, elsewhere=frozenset()))
    plain = render(result, color=False)
    assert plain == ("guest 100: set config [BENIGN]\n    memory: '2048' -> '4096'\n\n"
                     "Plan: 1 to change, 0 needing APPROVAL, 0 refused for other reasons, 0 skipped, "
                     "0 elsewhere.")
    assert "\033[32m'4096'\033[0m" in render(result, color=True)
