"""The in-memory Proxmox stand-in keeps the PVE semantics the executor relies on (as fakepve does over HTTPS)."""

from __future__ import annotations

import re
import time

import pytest

from executor.pve.node import PveError, PveReader, PveWriter
from executor.pve.tasks import TaskResult, find_task, wait_task
from tests.pve_memory import CHECKSUM_MISMATCH, MemoryPve


def _deadline() -> float:
    return time.monotonic() + 5


def test_it_is_a_reader_and_a_writer() -> None:
    """Both protocols, structurally (mypy checks the signatures: these assignments are typed)."""
    pve = MemoryPve()
    reader: PveReader = pve
    writer: PveWriter = pve
    assert reader.node == "pve1" and writer is pve


def test_the_digest_changes_on_every_write_and_a_stale_one_fails_with_pves_message() -> None:
    """A write with the digest read before another write fails "checksum mismatch"; nothing changes."""
    pve = MemoryPve()
    pve.add_ct(200, "ct", config={"memory": 512})
    _, first = pve.config("lxc", 200)
    assert pve.set_config("lxc", 200, {"memory": "512"}, (), first) is None  # LXC: PUT, no task
    values, second = pve.config("lxc", 200)
    assert second != first and values["memory"] == "512"
    with pytest.raises(PveError, match="checksum mismatch") as raised:
        pve.set_config("lxc", 200, {"memory": "1024"}, (), first)
    assert (str(raised.value), raised.value.status) == (CHECKSUM_MISMATCH, 500)
    assert pve.vm(200).config["memory"] == "512"
    assert [(m, p) for m, p, _ in pve.requests if m != "GET"] == [("PUT", "/api2/json/nodes/pve1/lxc/200/config")] * 2


def test_a_qemu_config_write_is_a_task_and_a_running_guest_defers_it_to_pending() -> None:
    """QEMU's POST answers a UPID that ends OK; on a running guest the write waits in pending for the start."""
    pve = MemoryPve()
    pve.add_vm(100, "web", status="running", config={"memory": 512, "cores": 2})
    upid = pve.set_config("qemu", 100, {"memory": "1024", "description": "x"}, ("cores",), "")
    assert upid is not None and wait_task(pve, upid, deadline=_deadline()).result is TaskResult.OK
    pending = pve.pending("qemu", 100)
    assert (pending.set, pending.delete, pending.current["memory"]) == ({"memory": "1024"}, frozenset({"cores"}), "512")
    assert pve.config("qemu", 100)[0]["description"] == "x"  # hot-plugged at once
    applied = pve.config("qemu", 100)[0]  # PVE's config read (vm_config): the pending section applied
    assert (applied["memory"], "cores" in applied, pve.vm(100).config["memory"]) == ("1024", False, 512)
    pve.shutdown("qemu", 100, 30, False)
    pve.start("qemu", 100)
    assert pve.config("qemu", 100)[0]["memory"] == "1024" and not pve.pending("qemu", 100)


def test_a_nic_written_without_a_mac_gets_one_and_a_no_op_pending_entry_is_dropped() -> None:
    """PVE draws a MAC for a NIC written without one (QEMU model=MAC, LXC hwaddr=) and keeps one written;
    writing the running value back clears its pending entry (cleanup_pending)."""
    pve = MemoryPve()
    pve.add_vm(100, "web", status="running", config={"memory": 512})
    pve.add_ct(200, "ct", config={})
    pve.set_config("qemu", 100, {"net1": "virtio,bridge=vmbr1", "net2": "e1000=BC:24:11:00:00:07"}, (), "")
    pve.set_config("lxc", 200, {"net0": "name=eth0,bridge=vmbr0"}, (), "")
    nics = pve.config("qemu", 100)[0]
    assert re.fullmatch(r"virtio=BC:24:11(:[0-9A-F]{2}){3},bridge=vmbr1", nics["net1"])
    assert nics["net2"] == "e1000=BC:24:11:00:00:07"
    assert re.fullmatch(r"name=eth0,bridge=vmbr0,hwaddr=BC:24:11(:[0-9A-F]{2}){3}", pve.config("lxc", 200)[0]["net0"])
    pve.set_config("qemu", 100, {"memory": "1024"}, (), "")
    pve.set_config("qemu", 100, {"memory": "512"}, (), "")
    assert pve.pending("qemu", 100).set.keys() == {"net1", "net2"}


def test_a_locked_guest_refuses_writes_and_its_start_fails_in_the_task() -> None:
    """Config writes and shutdowns are refused at once (PVE's "is locked"); a start's task fails with it."""
    pve = MemoryPve()
    pve.add_vm(100, "web", status="stopped", lock="backup")
    with pytest.raises(PveError, match=r"VM is locked \(backup\)"):
        pve.set_config("qemu", 100, {"memory": "1024"}, (), "")
    outcome = wait_task(pve, pve.start("qemu", 100), deadline=_deadline())
    assert (outcome.result, outcome.exitstatus) == (TaskResult.FAILED, "VM is locked (backup)")
    assert pve.vm(100).status == "stopped"
    assert pve.guests().find(100).lock == "backup"  # type: ignore[union-attr]


def test_stopping_a_stopped_guest_fails_as_pve_does() -> None:
    """LXC: "CT n not running" (the executor reads it as already there); QEMU: "VM n not running"."""
    pve = MemoryPve()
    pve.add_ct(200, "ct", status="stopped")
    pve.add_vm(100, "web", status="stopped")
    with pytest.raises(PveError, match=r"^CT 200 not running$"):
        pve.shutdown("lxc", 200, 30, True)
    with pytest.raises(PveError, match=r"^VM 100 not running$"):
        pve.shutdown("qemu", 100, 30, True)
    assert [b for m, _, b in pve.requests if m == "POST"] == [{"timeout": 30, "forceStop": 1}] * 2


def test_tasks_fail_or_stay_running_as_asked_and_are_listed() -> None:
    """``fail_tasks`` ends them with an exit status, ``hold_tasks`` keeps them running until ``finish``;
    the task list finds each by guest and type, running ones too."""
    pve = MemoryPve()
    pve.add_vm(100, "web", status="stopped")
    pve.fail_tasks("qmstart", "start failed: no disk")
    failed = wait_task(pve, pve.start("qemu", 100), deadline=_deadline())
    assert (failed.result, failed.exitstatus, pve.vm(100).status) == (TaskResult.FAILED, "start failed: no disk",
                                                                      "stopped")
    pve.failing.clear()
    pve.hold_tasks("qmstart")
    upid = pve.start("qemu", 100)
    assert pve.task_status(upid) == {"status": "running"}
    assert find_task(pve, 100, ("qmstart",), since=0) == upid
    pve.finish(upid)
    assert pve.task_status(upid) == {"status": "stopped", "exitstatus": "OK"}
    with pytest.raises(PveError, match="no such task"):
        pve.task_status(upid.replace("qmstart", "qmstop"))


def test_snapshots_the_cluster_and_an_unknown_guest() -> None:
    """Snapshots are taken, rolled back to and deleted; the cluster lists every node's guests; a guest that
    is not on the node answers PVE's missing config file."""
    pve = MemoryPve()
    pve.add_vm(100, "web", config={"memory": 512})
    pve.add_vm(300, "away", node="pve2")
    pve.snapshot("qemu", 100, "before", vmstate=False)
    pve.set_config("qemu", 100, {"memory": "2048"}, (), "")
    pve.rollback("qemu", 100, "before")
    assert (pve.snapshots("qemu", 100), pve.config("qemu", 100)[0]["memory"]) == (["before"], "512")
    pve.delete_snapshot("qemu", 100, "before", force=False)
    assert pve.snapshots("qemu", 100) == []
    assert (pve.cluster_guests(), pve.cluster_name()) == ({100: "pve1", 300: "pve2"}, "fakecluster")
    assert [g.vmid for g in pve.guests()] == [100]
    with pytest.raises(PveError, match=r"qemu-server/300\.conf' does not exist"):
        pve.config("qemu", 300)
    pve.destroy("qemu", 100, purge=True, destroy_unreferenced_disks=True)
    assert pve.find(100) is None and pve.requests[-1] == ("DELETE", "/api2/json/nodes/pve1/qemu/100",
                                                        {"purge": 1, "destroy-unreferenced-disks": 1})
