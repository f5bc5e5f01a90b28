"""One desired file for the whole cluster, and errors that say what went wrong.

Every node's executor reads the same desired file: a declared guest living on another node is
that node's business (counted as elsewhere, never reported not found), a guest that exists nowhere
is not found, and a migration hands a guest from one node's executor to the other's.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from executor.loop.desired import Declared
from executor.loop.engine import Engine, TickOutcome
from executor.loop.planner_client import PlannerClient
from executor.pve.node import Connection, ProxmoxNode
from planner import server
from tests.executor_helpers import ROOT, cli, requests_to, starts, unused_port
from tests.planner_standins import refusing_planner

Make = Callable[..., Engine]
RESOURCES = "/cluster/resources"
DESIRED = [Declared(vmid=100, state="running"), Declared(vmid=201, state="running"),
           Declared(vmid=300, state="running")]  # 100 on pve1, 201 on pve2, 300 nowhere


def _two_nodes(fakepve: Any) -> None:
    fakepve.add_node("pve2")
    fakepve.add_vm(100, "web", status="stopped")
    fakepve.add_vm(201, "db", node="pve2", status="stopped")


def test_guests_on_other_nodes_are_elsewhere_not_missing(fakepve: Any, make_engine: Make,
                                                         connect: Callable[..., Connection]) -> None:
    """Each node acts on its own guests, counts the other node's as elsewhere, and skips only the missing one."""
    _two_nodes(fakepve)
    pve1 = make_engine(DESIRED)
    pve2 = make_engine(DESIRED, pve=ProxmoxNode(connect(node="pve2")))
    before = len(fakepve.requests)
    first = pve1.tick(wait=True)
    assert (first.outcome, first.succeeded, first.skipped) == (TickOutcome.OK, 1, 1), "201 reported not found"
    assert first.elsewhere == 1
    assert len(requests_to(fakepve, "GET", RESOURCES, before)) == 1
    assert starts(fakepve, since=before) == ["/api2/json/nodes/pve1/qemu/100/status/start"]
    before = len(fakepve.requests)
    second = pve2.tick(wait=True)
    assert (second.outcome, second.succeeded, second.skipped, second.elsewhere) == (TickOutcome.OK, 1, 1, 1)
    assert len(requests_to(fakepve, "GET", RESOURCES, before)) == 1
    assert starts(fakepve, since=before) == ["/api2/json/nodes/pve2/qemu/201/status/start"]
    before = len(fakepve.requests)
    assert make_engine([]).tick(wait=True).outcome is TickOutcome.OK
    assert requests_to(fakepve, "GET", RESOURCES, before) == []  # nothing declared: no cluster read either


def test_a_migrated_guest_moves_to_the_new_nodes_executor(fakepve: Any, make_engine: Make,
                                                           connect: Callable[..., Connection]) -> None:
    """After 201 migrates pve2 -> pve1, pve1's next tick starts it and pve2's sends nothing for it."""
    _two_nodes(fakepve)
    pve1 = make_engine(DESIRED)
    pve2 = make_engine(DESIRED, pve=ProxmoxNode(connect(node="pve2")))
    first = pve1.tick(wait=True)
    assert (first.succeeded, first.skipped) == (1, 1), "201 reported not found"
    assert first.elsewhere == 1
    asyncio.run(fakepve.migrate(201, "pve1"))  # time_scale 0: done before it returns
    assert fakepve.vm(201).node == "pve1"
    before = len(fakepve.requests)
    old = pve2.tick(wait=True)
    assert [p for _, p, _ in fakepve.requests[before:] if "/201/" in p + "/"] == []
    assert (old.queued, old.skipped, old.elsewhere) == (0, 1, 2)
    before = len(fakepve.requests)
    new = pve1.tick(wait=True)
    assert (new.succeeded, new.skipped, new.elsewhere) == (1, 1, 0)
    assert starts(fakepve, since=before) == ["/api2/json/nodes/pve1/qemu/201/status/start"]
    assert fakepve.vm(201).status == "running"
    assert len(starts(fakepve, 201)) == 1


def test_plan_says_how_many_guests_live_on_other_nodes(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                                       tmp_path: Path) -> None:
    """`pve-executor plan` counts the guests on other nodes instead of listing them as not found."""
    _two_nodes(fakepve)
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n  - vmid: 201\n    state: running\n"
                       "  - vmid: 300\n    state: running\n")
    command = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path,
                  "plan", "--desired", str(desired))
    text = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False).stdout
    assert "guest 100: start" in text and "guest 300: SKIPPED NOT_FOUND" in text
    assert "guest 201" not in text, "the guest on pve2 is listed"
    assert text.endswith(", 1 skipped, 1 elsewhere.\n")
    as_json = json.loads(subprocess.run([*command, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                        check=False).stdout)
    assert as_json["elsewhere"] == [201]
    assert [s["vmid"] for s in as_json["skipped"]] == [300]


def test_a_refusing_planner_is_refused_not_unavailable(fakepve: Any, make_engine: Make) -> None:
    """INVALID_ARGUMENT from the planner is PLANNER_REFUSED: asked once, counted under its own label, no writes."""
    fakepve.add_vm(100, "web", status="stopped")
    with refusing_planner() as (standin, port):
        engine = make_engine([Declared(vmid=100, state="running")],
                             planner_client=PlannerClient(f"127.0.0.1:{port}", deadline=5))
        try:
            summary = engine.tick(wait=True)
        finally:
            engine.planner.close()
    assert standin.calls == 1
    registry = engine.metrics.registry
    assert registry.get_sample_value("pve_executor_ticks_total", {"outcome": "planner_unavailable"}) is None
    assert registry.get_sample_value("pve_executor_ticks_total", {"outcome": "planner_refused"}) == 1
    assert summary.outcome is TickOutcome.PLANNER_REFUSED
    assert "INVALID_ARGUMENT" in summary.error
    assert starts(fakepve) == []


def test_plan_reports_a_typo_in_the_desired_file_before_reaching_proxmox(fakepve_cafile: str, tmp_path: Path) -> None:
    """A bad desired file is named with its line, exit 2, even when Proxmox and the planner are unreachable."""
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: runing\n")
    closed = f"127.0.0.1:{unused_port()}"
    result = subprocess.run(cli(f"https://{closed}", fakepve_cafile, closed, tmp_path, "plan", "--desired",
                                str(desired)), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert f"{desired}:3: state: must be running or stopped, got 'runing'" in result.stderr
    assert "cannot reach" not in result.stderr
