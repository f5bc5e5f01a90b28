"""What a start reads before its call, and when (issue 13 item 7: converge got slower, win it back).

A start applies PVE's pending section, so it is judged on a read of /pending; a remote source's
start also needs the guest's protection flag. Each read costs a request at PVE's latency, on the
start's path. These tests count what fakepve received and in which order: a start makes one read,
the next starts' reads overlap the running ones, and the checks still see what they must.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from executor.loop.desired import Declared
from executor.loop.engine import Engine
from executor.pve.node import ProxmoxNode
from executor.pve.write import ProxmoxWriter
from safety.classify import Source
from tests.executor_helpers import starts

Make = Callable[..., Engine]


class Meddling:
    """The real writer, but ``before(vmid)`` runs right before each start (a change after the reads)."""

    def __init__(self, writer: ProxmoxWriter, before: Callable[[int], object]) -> None:
        self._writer, self._before = writer, before

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def start(self, guest_type: str, vmid: int) -> str:
        """Run ``before``, then start for real."""
        self._before(vmid)
        return self._writer.start(guest_type, vmid)


def reads(fakepve: Any, vmid: int, suffix: str) -> list[int]:
    """Indexes in fakepve's request log of the GETs of guest ``vmid``'s ``suffix`` (config, pending)."""
    path = f"/nodes/pve1/qemu/{vmid}/{suffix}"
    return [i for i, (m, p, _) in enumerate(fakepve.requests) if m == "GET" and p.endswith(path)]


def first(fakepve: Any, method: str, part: str) -> int:
    """Index of the first request of ``method`` whose path contains ``part``."""
    return next(i for i, (m, p, _) in enumerate(fakepve.requests) if m == method and part in p)


def test_a_remote_start_reads_the_guest_once(fakepve: Any, make_engine: Make) -> None:
    """/pending lists every current value beside the pending ones: a hub's start is judged on that one
    read (protection and what the start applies), not on a /config read and a /pending read."""
    fakepve.add_vm(100, "web", status="stopped")
    summary = make_engine([Declared(vmid=100, state="running")], source=Source.HUB).tick(wait=True)
    assert summary.succeeded == 1
    assert (len(reads(fakepve, 100, "config")), len(reads(fakepve, 100, "pending"))) == (0, 1)


def test_a_remote_start_of_a_protected_guest_still_needs_approval(fakepve: Any, make_engine: Make) -> None:
    """protection=1, in force or pending (the start would apply it), makes a hub's start need approval;
    the local file may start either guest."""
    fakepve.add_vm(100, "guarded", status="stopped", config={"protection": 1})
    fakepve.add_vm(101, "to-be-guarded", status="stopped", pending={"protection": 1})
    declared = [Declared(vmid=100, state="running"), Declared(vmid=101, state="running")]
    hub = make_engine(declared, source=Source.HUB).tick(wait=True)
    assert sorted((r.vmid, r.op_kind, r.reason) for r in hub.refusals) == [
        (100, "start", "APPROVAL_REQUIRED"), (101, "start", "APPROVAL_REQUIRED")]
    assert starts(fakepve) == []
    assert make_engine(declared).tick(wait=True).succeeded == 2


def test_the_next_starts_pending_sections_are_read_while_a_start_runs(fakepve: Any, make_engine: Make) -> None:
    """With one lane, guest 101's /pending is read before guest 100's start has been waited on (not after
    it, on 101's own path), and the read ahead costs no request: one /pending per start."""
    fakepve.slow_network(0.02)
    for vmid in (100, 101, 102):
        fakepve.add_vm(vmid, f"vm{vmid}", status="stopped")
    # A read ahead is used for 0.5 s by default; a start slowed past that by a busy box (0.76 s seen under
    # pytest -n 4) had the next guest's /pending read again. Freshness is not what this test is about: 5 s.
    engine = make_engine([Declared(vmid=v, state="running") for v in (100, 101, 102)], max_parallel=1,
                         read_ahead_fresh=5.0)
    summary = engine.tick(wait=True)
    assert summary.succeeded == 3
    assert reads(fakepve, 101, "pending")[0] < first(fakepve, "GET", "/tasks/")
    assert [len(reads(fakepve, v, "pending")) for v in (100, 101, 102)] == [1, 1, 1]


def test_a_pending_disk_delete_staged_while_a_start_waits_is_seen(fakepve: Any, make_engine: Make,
                                                                  node: ProxmoxNode) -> None:
    """The reads run ahead of the lanes by one guest per lane, no more: a disk delete staged on guest
    105 while guest 100 starts (its read not yet made) still makes 105's start need approval."""
    for vmid in range(100, 106):
        fakepve.add_vm(vmid, f"vm{vmid}", status="stopped", config={"scsi1": f"local-lvm:vm-{vmid}-disk-1,size=8G"})

    def stage(vmid: int) -> None:
        if vmid == 100:
            fakepve.vm(105).pending = {"scsi1": None}

    engine = make_engine([Declared(vmid=v, state="running") for v in range(100, 106)], max_parallel=1,
                         writer=Meddling(ProxmoxWriter(node.session), stage))
    summary = engine.tick(wait=True)
    assert [(r.vmid, r.op_kind, r.reason) for r in summary.refusals] == [(105, "start", "APPROVAL_REQUIRED")]
    assert starts(fakepve, 105) == [] and summary.succeeded == 5


def test_a_read_older_than_its_freshness_is_made_again(fakepve: Any, make_engine: Make, node: ProxmoxNode) -> None:
    """A read ahead is used only while fresh: guest 100's start outlives it, so the disk delete staged on
    guest 101 meanwhile is read again in 101's lane, and that start needs approval. Starts that slow
    turn reading ahead off: no more reads are wasted (102 and 103 are read once, in their lanes)."""
    for vmid in range(100, 104):
        fakepve.add_vm(vmid, f"vm{vmid}", status="stopped", config={"scsi1": f"local-lvm:vm-{vmid}-disk-1,size=8G"})

    def stage_and_linger(vmid: int) -> None:
        if vmid == 100:
            fakepve.vm(101).pending = {"scsi1": None}
        time.sleep(0.3)

    engine = make_engine([Declared(vmid=v, state="running") for v in range(100, 104)], max_parallel=1,
                         writer=Meddling(ProxmoxWriter(node.session), stage_and_linger), read_ahead_fresh=0.2)
    summary = engine.tick(wait=True)
    assert [(r.vmid, r.reason) for r in summary.refusals] == [(101, "APPROVAL_REQUIRED")]
    assert starts(fakepve, 101) == [] and summary.succeeded == 3
    assert [len(reads(fakepve, v, "pending")) for v in range(100, 104)] == [1, 2, 1, 1]


def test_a_start_after_a_config_write_reads_after_the_write(fakepve: Any, make_engine: Make) -> None:
    """A guest whose job writes its config, then starts, is not read ahead: its start is judged on a
    /pending read made after its own write (the one before it is the tick's, beside the config read)."""
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512})
    summary = make_engine([Declared(vmid=100, state="running", config={"memory": "1024"})]).tick(wait=True)
    assert summary.succeeded == 2 and fakepve.vm(100).status == "running"
    write = first(fakepve, "POST", "/qemu/100/config")
    assert [i > write for i in reads(fakepve, 100, "pending")] == [False, True]
    assert reads(fakepve, 100, "config")[-1] < write
