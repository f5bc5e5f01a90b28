"""A hub drains a node in instalments (issue 13 item 4, SAFETY-DESIGN matrix row 52).

A hub stops two guests per window, then stops declaring them (drops their run state, or the
guest), and repeats. The blast rule counts what the node has: a guest a remote source stopped
stays counted, as managed and stopped, across daemon restarts, until it runs again or is gone.
Every test here runs a real hub (a desired file others may write) against fakepve and counts the
guests Proxmox ended up stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from executor.config import ExecutorSettings
from executor.daemon import Parts, build
from executor.desired import FileProvider, provider_source
from executor.engine import Engine, TickSummary
from executor.pve import Connection
from journal import Journal
from planner import server
from safety.classify import Source

Make = Callable[..., Engine]
NODE = range(100, 110)  # ten running guests
LEDGER = "remote-stops.json"


def write_hub(path: Path, states: Mapping[int, str | None]) -> None:
    """The hub's document (a file others may write: a remote source); ``None`` declares no run state."""
    lines = ["guests:"]
    for vmid, state in states.items():
        lines.append(f"  - {{vmid: {vmid}, state: {state}}}" if state else f"  - {{vmid: {vmid}}}")
    fresh = path.with_suffix(".new")
    fresh.write_text("\n".join(lines) + "\n")
    fresh.chmod(0o666)
    os.replace(fresh, path)  # a new inode: the provider sees the change however fast the rounds go


def stopped(fakepve: Any) -> list[int]:
    """vmids of the node's stopped VMs, as Proxmox has them."""
    return sorted(vm.vmid for vm in fakepve.vms if vm.status == "stopped")


def instalment(round_: int, *, drop: str) -> dict[int, str | None]:
    """Round ``round_`` of the drain: two more stopped; those stopped before lose their state or their entry."""
    states: dict[int, str | None] = {}
    for vmid in NODE:
        earlier = vmid < 100 + 2 * round_
        if earlier and drop == "guest":
            continue
        states[vmid] = None if earlier else "stopped" if vmid < 102 + 2 * round_ else "running"
    return states


@pytest.fixture(name="node_of_ten")
def _node_of_ten(fakepve: Any) -> None:
    for vmid in NODE:
        fakepve.add_vm(vmid, f"vm{vmid}", status="running")


@pytest.mark.usefixtures("node_of_ten")
@pytest.mark.parametrize("drop", ["state", "guest"])
def test_a_hub_cannot_drain_a_node_in_instalments(drop: str, fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Two stops per window, then un-declare them, five times: the hub never gets past half of the node."""
    desired = tmp_path / "desired.yaml"
    write_hub(desired, instalment(0, drop=drop))
    engine = make_engine([], stop_window=0.0)  # every tick is a new window: only the half rule holds the hub
    engine.provider = FileProvider(desired)
    assert provider_source(engine.provider) is Source.HUB
    summaries: list[TickSummary] = []
    for round_ in range(5):
        write_hub(desired, instalment(round_, drop=drop))
        summaries.append(engine.tick(wait=True))
    assert stopped(fakepve) == [100, 101, 102, 103], "the hub stopped more than half of the node, no approval"
    refused = [(r.vmid, r.reason) for s in summaries[2:] for r in s.refusals]
    assert refused == [(v, "APPROVAL_REQUIRED") for v in range(104, 110)]
    assert all("blast_radius" in r.detail for s in summaries[2:] for r in s.refusals)


@pytest.mark.usefixtures("node_of_ten")
def test_a_guest_the_hub_stopped_counts_until_someone_starts_it(fakepve: Any, make_engine: Make,
                                                                tmp_path: Path) -> None:
    """Started again (by anyone), it is no longer the hub's stop: the budget comes back; gone from the node too."""
    desired = tmp_path / "desired.yaml"
    write_hub(desired, instalment(0, drop="guest"))
    engine = make_engine([], stop_window=0.0)
    engine.provider = FileProvider(desired)
    for round_ in range(2):
        write_hub(desired, instalment(round_, drop="guest"))
        engine.tick(wait=True)
    assert stopped(fakepve) == [100, 101, 102, 103]
    fakepve.vm(100).status = "running"  # an operator starts two of them, and removes a third
    fakepve.vm(101).status = "running"
    fakepve.vms.remove(fakepve.vm(102))
    write_hub(desired, instalment(2, drop="guest"))
    summary = engine.tick(wait=True)
    assert summary.refusals == ()
    assert stopped(fakepve) == [103, 104, 105]


# --- across a restart: the record is in the state dir -------------------------------------------

@pytest.fixture(name="daemon")
def _daemon(fakepve: Any, fakepve_cafile: str, planner: server.Running, connect: Callable[..., Connection],
            tmp_path: Path) -> Iterator[Callable[..., TickSummary]]:
    """One tick of a freshly built daemon on the same state dir each call (a restart between calls)."""
    desired = tmp_path / "desired.yaml"

    def tick(states: Mapping[int, str | None], **options: Any) -> TickSummary:
        write_hub(desired, states)
        settings = ExecutorSettings(node="pve1", pve_url=f"https://127.0.0.1:{fakepve.port}", pve_user="root@pam",
                                    pve_password="secret", pve_ca_file=fakepve_cafile, desired=str(desired),
                                    planner=f"127.0.0.1:{planner.port}", state_dir=str(tmp_path / "state"),
                                    **options)
        parts: Parts = build(settings, connect(), FileProvider(desired), Journal.open(settings.state_dir))
        try:
            return parts.engine.tick(wait=True)
        finally:
            parts.close(5)

    yield tick


@pytest.mark.usefixtures("node_of_ten")
def test_a_restart_does_not_forget_what_a_hub_stopped(fakepve: Any, daemon: Callable[..., TickSummary]) -> None:
    """Half the node stopped, the daemon restarted, the five un-declared: the hub's next stop needs approval."""
    daemon({v: "stopped" if v < 105 else "running" for v in NODE}, max_stops_per_tick=10)
    assert stopped(fakepve) == [100, 101, 102, 103, 104]
    summary = daemon({v: "stopped" if v == 105 else "running" for v in NODE if v >= 105}, max_stops_per_tick=10)
    assert stopped(fakepve) == [100, 101, 102, 103, 104]
    assert [(r.vmid, r.reason) for r in summary.refusals] == [(105, "APPROVAL_REQUIRED")]


@pytest.mark.usefixtures("node_of_ten")
def test_a_restart_does_not_reset_a_hubs_stop_rate(fakepve: Any, daemon: Callable[..., TickSummary]) -> None:
    """Two stops ran in this interval; a daemon restarted within it runs no more until it ends."""
    daemon({v: "stopped" if v < 102 else "running" for v in NODE}, interval=600.0)
    assert stopped(fakepve) == [100, 101]
    summary = daemon({v: "stopped" if v < 104 else "running" for v in NODE}, interval=600.0)
    assert stopped(fakepve) == [100, 101]
    assert summary.stops_deferred == 2
