"""A hub drains a node in instalments (issue 13 item 4, docs/SAFETY.md §12 row 52).

A hub stops two guests per window, then stops declaring them (drops their run state, or the
guest), and repeats. The blast rule counts what the node has: a guest a remote source stopped
stays counted, as managed and stopped, across daemon restarts, until it runs again or is gone.
Every test here runs a real hub (a desired file others may write) against fakepve and counts the
guests Proxmox ended up stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from executor.app.dryrun import dry_run
from executor.app.wiring import Parts, build, open_journal
from executor.config import ExecutorSettings
from executor.gate.stopledger import StopLedger
from executor.loop.desired import FileProvider, provider_source
from executor.loop.engine import Engine, TickSummary
from executor.pve.node import Connection, ProxmoxNode
from planner import server
from safety.blast import RemoteStop
from safety.classify import Source
from tests.answer_faults import AnswerFaults
from tests.executor_helpers import HeldReads
from tests.pve_memory import MemoryPve
from tests.tmpfs import tiny_filesystem

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


@pytest.fixture(name="memory_of_ten")
def _memory_of_ten(pve: MemoryPve) -> None:
    """The same ten running guests on the in-memory stand-in (the drain's counting is not about HTTP)."""
    for vmid in NODE:
        pve.add_vm(vmid, f"vm{vmid}", status="running")


@pytest.mark.usefixtures("memory_of_ten")
@pytest.mark.parametrize("drop", ["state", "guest"])
def test_a_hub_cannot_drain_a_node_in_instalments(drop: str, pve: MemoryPve, make_memory_engine: Make,
                                                  tmp_path: Path) -> None:
    """Two stops per window, then un-declare them, five times: the hub never gets past half of the node."""
    desired = tmp_path / "desired.yaml"
    write_hub(desired, instalment(0, drop=drop))
    # every tick is a new window: only the half rule holds the hub
    engine = make_memory_engine([], stop_window=0.0, provider=FileProvider(desired))
    assert provider_source(engine.provider) is Source.HUB
    summaries: list[TickSummary] = []
    for round_ in range(5):
        write_hub(desired, instalment(round_, drop=drop))
        summaries.append(engine.tick(wait=True))
    assert stopped(pve) == [100, 101, 102, 103], "the hub stopped more than half of the node, no approval"
    refused = [(r.vmid, r.reason) for s in summaries[2:] for r in s.refusals]
    assert refused == [(v, "APPROVAL_REQUIRED") for v in range(104, 110)]
    assert all("blast_radius" in r.detail for s in summaries[2:] for r in s.refusals)


def _two_rounds(fakepve: Any, make_engine: Make, tmp_path: Path) -> tuple[Engine, Path]:
    """A hub (every tick a new window) that has stopped 100-103 in two rounds, un-declaring them: its engine, file."""
    desired = tmp_path / "desired.yaml"
    write_hub(desired, instalment(0, drop="guest"))
    engine = make_engine([], stop_window=0.0, provider=FileProvider(desired))
    for round_ in range(2):
        write_hub(desired, instalment(round_, drop="guest"))
        engine.tick(wait=True)
    assert stopped(fakepve) == [100, 101, 102, 103]
    return engine, desired


@pytest.mark.usefixtures("memory_of_ten")
def test_a_guest_the_hub_stopped_counts_until_someone_starts_it(pve: MemoryPve, make_memory_engine: Make,
                                                                tmp_path: Path) -> None:
    """Started again (by anyone), it is no longer the hub's stop: the budget comes back; gone from the node too."""
    engine, desired = _two_rounds(pve, make_memory_engine, tmp_path)
    pve.vm(100).status = "running"  # an operator starts two of them, and removes a third
    pve.vm(101).status = "running"
    pve.vms.remove(pve.vm(102))
    write_hub(desired, instalment(2, drop="guest"))
    summary = engine.tick(wait=True)
    assert summary.refusals == ()
    assert stopped(pve) == [103, 104, 105]


def test_a_stop_that_ends_while_the_node_is_read_stays_counted(fakepve: Any, node: ProxmoxNode, make_engine: Make,
                                                              tmp_path: Path) -> None:
    """The hub's three stops (half the node) run while the next tick reads the guest list, and end before it
    admits: that read still says running, yet nobody started them; the hub's next stop needs approval."""
    for vmid in range(100, 106):
        fakepve.add_vm(vmid, f"vm{vmid}", status="running")
        fakepve.vm(vmid).shutdown_secs = 40
    fakepve.time_scale = 0.01  # a shutdown takes 0.4 s
    desired = tmp_path / "desired.yaml"
    write_hub(desired, {v: "stopped" if v < 103 else "running" for v in range(100, 106)})
    reads = HeldReads(node)
    engine = make_engine([], pve=reads, max_stops_per_tick=10, provider=FileProvider(desired))
    engine.tick()  # the three shutdowns start
    write_hub(desired, {103: "stopped", 104: "running", 105: "running"})

    def stops_end() -> None:
        deadline = time.monotonic() + 10
        while engine.queue.busy() and time.monotonic() < deadline:
            time.sleep(0.02)

    reads.hold_next(stops_end)
    summary = engine.tick(wait=True)
    assert stopped(fakepve) == [100, 101, 102]
    assert [(r.vmid, r.reason) for r in summary.refusals] == [(103, "APPROVAL_REQUIRED")]


# --- across a restart: the record is in the state dir -------------------------------------------

class Daemon:
    """A daemon's parts built afresh for every tick on one state dir: a restart between any two ticks."""

    def __init__(self, fakepve: Any, cafile: str, planner: str, connect: Callable[..., Connection],
                 tmp_path: Path) -> None:
        self.desired, self.state = tmp_path / "desired.yaml", tmp_path / "state"
        self._connect = connect
        self._base: dict[str, Any] = {
            "node": "pve1", "pve_url": f"https://127.0.0.1:{fakepve.port}", "pve_user": "root@pam",
            "pve_password": "secret", "pve_ca_file": cafile, "desired": str(self.desired), "planner": planner}

    def settings(self, **options: Any) -> ExecutorSettings:
        """The daemon's settings with ``options``."""
        return ExecutorSettings(**self._base, state_dir=str(self.state), **options)

    def tick(self, states: Mapping[int, str | None], **options: Any) -> TickSummary:
        """Declare ``states``, start a daemon, run one tick, stop it."""
        write_hub(self.desired, states)
        settings = self.settings(**options)
        parts: Parts = build(settings, self._connect(), FileProvider(self.desired), open_journal(settings.state_dir))
        try:
            return parts.engine.tick(wait=True)
        finally:
            parts.close(5)

    @property
    def ledger(self) -> Path:
        """Where the daemon keeps what remote sources stopped."""
        return self.state / LEDGER


@pytest.fixture(name="daemon")
def _daemon(fakepve: Any, fakepve_cafile: str, planner: server.Running, connect: Callable[..., Connection],
            tmp_path: Path) -> Daemon:
    return Daemon(fakepve, fakepve_cafile, f"127.0.0.1:{planner.port}", connect, tmp_path)


@pytest.mark.usefixtures("node_of_ten")
def test_a_restart_does_not_forget_what_a_hub_stopped(fakepve: Any, daemon: Daemon) -> None:
    """Half the node stopped, the daemon restarted, the five un-declared: the hub's next stop needs approval,
    in ``plan`` as in ``run``, and ``plan`` writes nothing."""
    daemon.tick({v: "stopped" if v < 105 else "running" for v in NODE}, max_stops_per_tick=10)
    assert stopped(fakepve) == [100, 101, 102, 103, 104]
    rest = {v: "stopped" if v == 105 else "running" for v in NODE if v >= 105}
    write_hub(daemon.desired, rest)
    kept = {f.name: f.read_bytes() for f in daemon.state.iterdir()}
    planned = dry_run(daemon.settings(max_stops_per_tick=10)).admission
    assert [(r.vmid, r.reason) for r in planned.refused] == [(105, "APPROVAL_REQUIRED")]
    assert {f.name: f.read_bytes() for f in daemon.state.iterdir()} == kept
    summary = daemon.tick(rest, max_stops_per_tick=10)
    assert stopped(fakepve) == [100, 101, 102, 103, 104]
    assert [(r.vmid, r.reason) for r in summary.refusals] == [(105, "APPROVAL_REQUIRED")]
    assert daemon.ledger.stat().st_mode & 0o777 == 0o600


@pytest.mark.usefixtures("node_of_ten")
def test_a_restart_does_not_reset_a_hubs_stop_rate(fakepve: Any, daemon: Daemon) -> None:
    """Two stops ran in this interval; a daemon restarted within it runs no more until it ends."""
    daemon.tick({v: "stopped" if v < 102 else "running" for v in NODE}, interval=600.0)
    assert stopped(fakepve) == [100, 101]
    summary = daemon.tick({v: "stopped" if v < 104 else "running" for v in NODE}, interval=600.0)
    assert stopped(fakepve) == [100, 101]
    assert summary.stops_deferred == 2


@pytest.mark.usefixtures("node_of_ten")
def test_a_tick_with_nothing_new_does_not_write_the_record(fakepve: Any, daemon: Daemon) -> None:
    """Once the hub's stops are seen stopped, ticks that change nothing leave the file alone (no fsync a tick)."""
    states: dict[int, str | None] = {v: "stopped" if v < 102 else "running" for v in NODE}
    daemon.tick(states)
    daemon.tick(states)  # the read sees them stopped
    before = daemon.ledger.stat()
    daemon.tick(states)
    after = daemon.ledger.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(json.loads(daemon.ledger.read_bytes())["stopped"]) == ["100", "101"]


def test_an_unreadable_record_counts_every_stopped_guest_as_the_hubs(fakepve: Any, daemon: Daemon) -> None:
    """The record is garbage (who stopped what is unknown): every guest stopped on the node counts as a remote
    stop; the hub gets no budget from the loss, and the record is written anew."""
    for vmid in NODE:
        fakepve.add_vm(vmid, f"vm{vmid}", status="stopped" if vmid < 104 else "running")
    daemon.tick({v: "running" for v in NODE if v >= 104})  # a first start: the state dir exists
    daemon.ledger.write_text("{not json")
    summary = daemon.tick({v: "stopped" if v < 106 else "running" for v in NODE if v >= 104}, max_stops_per_tick=10)
    assert stopped(fakepve) == [100, 101, 102, 103]
    assert [(r.vmid, r.reason) for r in summary.refusals] == [(104, "APPROVAL_REQUIRED"), (105, "APPROVAL_REQUIRED")]
    assert sorted(json.loads(daemon.ledger.read_bytes())["stopped"]) == ["100", "101", "102", "103"]


@pytest.mark.usefixtures("node_of_ten")
def test_a_remote_stop_that_cannot_be_recorded_does_not_run(fakepve: Any, daemon: Daemon, tmp_path: Path) -> None:
    """The state dir's disk is full: the hub's stops wait (deferred) until their record can be written."""
    with tiny_filesystem(tmp_path) as disk:
        daemon.state = disk / "state"
        daemon.tick({v: "running" for v in NODE})  # the journal and the gate's secret exist
        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as out:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        stopping = {v: "stopped" if v < 102 else "running" for v in NODE}
        summary = daemon.tick(stopping)
        assert stopped(fakepve) == []
        assert summary.stops_deferred == 2
        filler.unlink()
        daemon.tick(stopping)
        assert stopped(fakepve) == [100, 101]
        assert sorted(json.loads(daemon.ledger.read_bytes())["stopped"]) == ["100", "101"]


@pytest.mark.parametrize("content", [
    b"", b"[]", b'{"version": 2, "window": [], "stopped": {}}',
    b'{"version": 1, "window": [], "stopped": {"100": {"at": true, "seen": true}}}',
    b'{"version": 1, "window": ["now"], "stopped": {}}',
    b'{"version": 1, "window": [], "stopped": {"x": {"at": 1.0, "seen": true}}}',
    b'{"version": 1, "window": [], "stopped": {}, "more": 1}',
])
def test_a_record_that_does_not_parse_is_rebuilt_on_the_safe_side(content: bytes, tmp_path: Path) -> None:
    """Anything but the exact format is unreadable: every guest stopped at the next read counts, now."""
    (tmp_path / LEDGER).write_bytes(content)
    ledger = StopLedger.in_state_dir(tmp_path)
    ledger.settle(status={100: "stopped", 101: "running"}, present={100, 101}, held=set(), now=50.0, grace=1.0)
    assert ledger.stopped() == {100: RemoteStop(at=50.0, seen=True)}
    assert ledger.used(now=50.0, window=30.0) == 1
    assert StopLedger.in_state_dir(tmp_path).stopped() == {100: RemoteStop(at=50.0, seen=True)}  # written anew


def test_a_stop_that_did_not_run_is_forgotten_and_one_that_ran_is_confirmed(tmp_path: Path) -> None:
    """The lane's word moves the record at once (and durably); an unknown outcome leaves the stop counted."""
    ledger = StopLedger.in_state_dir(tmp_path)
    assert ledger.record([100, 101, 102], now=10.0, window=30.0)
    ledger.stop_ended(100, ran=True)
    ledger.stop_ended(101, ran=False)
    ledger.stop_ended(102, ran=None)
    again = StopLedger.in_state_dir(tmp_path)
    assert again.stopped() == {100: RemoteStop(at=10.0, seen=True), 102: RemoteStop(at=10.0)}
    assert again.used(now=39.0, window=30.0) == 3 and again.used(now=40.0, window=30.0) == 0


@pytest.mark.usefixtures("node_of_ten")
def test_a_guest_list_with_holes_never_frees_a_hubs_budget(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """The hub's stopped guests vanish from one guest-list answer (their entries garbled: dropped, naming no
    guest). A list with holes proves no guest gone: the record keeps their stops, and the drain stays held."""
    engine, desired = _two_rounds(fakepve, make_engine, tmp_path)
    garble = {"on": True}

    def holes(data: Any) -> Any:
        if not garble["on"] or not isinstance(data, list):
            return data
        return [e if not isinstance(e, dict) or int(e.get("vmid", 0)) not in range(100, 104) else "garbage"
                for e in data]

    AnswerFaults(fakepve).rewrite("GET", "/nodes/pve1/qemu", holes)
    write_hub(desired, instalment(2, drop="guest"))
    engine.tick(wait=True)
    garble["on"] = False
    for round_ in (3, 4):
        write_hub(desired, instalment(round_, drop="guest"))
        engine.tick(wait=True)
    assert stopped(fakepve) == [100, 101, 102, 103], "a guest list with holes freed the hub's budget"
