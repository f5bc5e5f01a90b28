"""The destructive Proxmox operations as action-table rows: each call, its checks, and recovery after a crash.

Every call goes through ``ACTION_KINDS[kind].call(writer, step, CallSettings())`` with the real writer over HTTPS
against fakepve, and is judged by what the guest looks like afterwards. Where fakepve does not model an
effect, the test says so and either asserts the request PVE would read or, for QEMU's resize (which fakepve
only synthesizes), uses an in-process stand-in for that one call.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from fakepve.lxc import format_size
from hypothesis import given
from hypothesis import strategies as st

from executor.gate.actions import SET_CONFIG, Step
from executor.gate.kinds import (
    ACTION_KINDS,
    DELETE_SNAPSHOT,
    DESTROY,
    RESIZE,
    ROLLBACK,
    SNAPSHOT,
    CallSettings,
    StepError,
    size_bytes,
    size_text,
)
from executor.loop.recovery import recover
from executor.pve.node import LXC, QEMU, ProxmoxNode, PveError
from executor.pve.tasks import NOT_APPLIED, TaskResult, wait_task
from executor.pve.write import ProxmoxWriter
from journal import Ended, Journal, Outcome

GiB = 1 << 30
PVE_SIZE = re.compile(r"\+?\d+(\.\d+)?[KMGT]?")  # the size pattern of PVE's resize API


# --- setup ---------------------------------------------------------------------------------------

def add_vm(fakepve: Any, vmid: int = 100, *, disks: dict[str, int] | None = None, stray: int = 0,
           **options: Any) -> Any:
    """A VM whose disks (key -> bytes) are volumes on local-lvm, plus ``stray`` volumes of its vmid in no config."""
    volumes = fakepve.storages["local-lvm"].setdefault("volumes", {})
    config = dict(options.pop("config", {}))
    names = [f"vm-{vmid}-disk-{n}" for n in range(len(disks or {}) + stray)]
    for n, name in enumerate(names):
        size = list((disks or {}).values())[n] if n < len(disks or {}) else GiB
        volumes[name] = {"content": "images", "format": "raw", "size": size, "vmid": vmid, "ctime": 0}
        if n < len(disks or {}):
            config[list(disks or {})[n]] = f"local-lvm:{name},size={format_size(size)}"
    return fakepve.add_vm(vmid, "web", config={"cores": 2, **config}, **options)


def add_ct(fakepve: Any, vmid: int = 101, **options: Any) -> Any:
    """A container with an 8G rootfs on local-lvm (fakepve's default)."""
    config = {"cores": 1, **options.pop("config", {})}
    return fakepve.add_ct(vmid, "box", config=config, **options)


def add_guest(fakepve: Any, guest_type: str, **options: Any) -> int:
    """A stopped guest of ``guest_type`` with a disk; its vmid."""
    if guest_type == QEMU:
        return int(add_vm(fakepve, disks={"scsi0": 4 * GiB}, **options).vmid)
    return int(add_ct(fakepve, **options).vmid)


def step(kind: str, vmid: int, guest_type: str, digest: str = "", **params: Any) -> Step:
    """A step as the gate builds one from a signed op: params sorted by name."""
    return Step(vmid=vmid, guest_type=guest_type, kind=kind, digest=digest, params=tuple(sorted(params.items())))


def run(writer: Any, node: ProxmoxNode, made: Step) -> tuple[TaskResult, str, str]:
    """Make the row's call, wait for its task: (result, exit status, task type)."""
    upid = ACTION_KINDS[made.kind].call(writer, made, CallSettings())
    assert upid, f"{made.kind} answered without a task"
    outcome = wait_task(node, upid, deadline=time.monotonic() + 30)
    return outcome.result, outcome.exitstatus, upid.split(":")[5]


def guest_config(fakepve: Any, vmid: int) -> dict[str, Any]:
    """The guest's config as fakepve holds it."""
    return dict(fakepve.guest(vmid).config)


def sent(fakepve: Any, method: str, suffix: str) -> list[dict[str, str]]:
    """The form bodies of the requests fakepve received for ``method`` and a path ending in ``suffix``."""
    return [dict(urllib.parse.parse_qsl(body.decode())) for m, path, body in fakepve.requests
            if m == method and path.endswith(suffix)]


class QemuResizeAsPve:
    """The real writer, but QEMU's resize also does what PVE does (fakepve only synthesizes that endpoint).

    fakepve checks a QEMU ``PUT .../resize`` against PVE's schema and answers with a ``resize`` task, but
    changes nothing. This stand-in, for that one call only, applies qemu-server's ``resize_vm`` rule to the
    request fakepve actually received: ``+`` adds, otherwise absolute; K/M/G/T are powers of 1024; a shrink
    dies with "shrinking disks is not supported"; the new size is written back as ``size=``.
    """

    def __init__(self, writer: ProxmoxWriter, fakepve: Any) -> None:
        self._writer, self._fakepve = writer, fakepve

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def resize(self, guest_type: str, vmid: int, disk: str, size: str, digest: str) -> str | None:
        """The real request, then PVE's effect of what was sent."""
        assert guest_type == QEMU
        upid = self._writer.resize(guest_type, vmid, disk, size, digest)
        text = sent(self._fakepve, "PUT", f"/qemu/{vmid}/resize")[-1]["size"]
        found = re.fullmatch(r"(\+)?(\d+(?:\.\d+)?)([KMGT])?", text)
        assert found is not None, text
        vm = self._fakepve.vm(vmid)
        current = int(re.search(r"size=(\d+)G", vm.config[disk]).group(1)) * GiB  # type: ignore[union-attr]
        new = int(Fraction(found.group(2)) * 1024 ** " KMGT".index(found.group(3) or " "))
        new += current if found.group(1) else 0
        if new < current:
            raise PveError("shrinking disks is not supported", 500)
        vm.config[disk] = re.sub(r"size=[^,]+", f"size={format_size(new)}", vm.config[disk])
        return upid


# --- guest.destroy -------------------------------------------------------------------------------

@pytest.mark.parametrize("unreferenced", [False, True])
def test_destroy_removes_the_vm_and_its_volumes(fakepve: Any, node: ProxmoxNode, unreferenced: bool) -> None:
    """A destroy removes the VM and its disks; destroy_unreferenced_disks also frees its volumes in no config."""
    add_vm(fakepve, disks={"scsi0": 4 * GiB}, stray=1)
    volumes = fakepve.storages["local-lvm"]["volumes"]
    result, _, task = run(ProxmoxWriter(node.session), node,
                          step(DESTROY, 100, QEMU, purge=False, destroy_unreferenced_disks=unreferenced))
    assert (result, task) == (TaskResult.OK, "qmdestroy")
    assert fakepve.vm(100) is None and 100 not in {g.vmid for g in node.guests()}
    assert "vm-100-disk-0" not in volumes
    assert ("vm-100-disk-1" in volumes) is not unreferenced


def test_destroy_removes_a_container(fakepve: Any, node: ProxmoxNode) -> None:
    """A container's destroy is a vzdestroy task, and the container is gone."""
    add_ct(fakepve)
    result, _, task = run(ProxmoxWriter(node.session), node,
                          step(DESTROY, 101, LXC, purge=False, destroy_unreferenced_disks=False))
    assert (result, task) == (TaskResult.OK, "vzdestroy")
    assert fakepve.ct(101) is None


def test_purge_is_what_lets_a_destroy_remove_an_ha_guest(fakepve: Any, node: ProxmoxNode) -> None:
    """PVE refuses to destroy an HA-managed guest without purge; with it the guest and its HA entry go."""
    add_vm(fakepve, disks={"scsi0": GiB}).ha_state = "stopped"
    writer = ProxmoxWriter(node.session)
    with pytest.raises(PveError, match="used in HA resources and purge parameter not set"):
        run(writer, node, step(DESTROY, 100, QEMU, purge=False, destroy_unreferenced_disks=False))
    assert fakepve.vm(100) is not None
    result, _, _ = run(writer, node, step(DESTROY, 100, QEMU, purge=True, destroy_unreferenced_disks=False))
    assert result is TaskResult.OK and fakepve.vm(100) is None
    assert any("purging VM 100" in line for task in fakepve.tasklog if task["type"] == "qmdestroy"
               for line in task["log"])


@pytest.mark.parametrize(("guest_type", "message"), [(QEMU, "can't remove VM 100 - protection mode enabled"),
                                                     (LXC, "can't remove CT 101 - protection mode enabled")])
def test_pves_protection_refuses_a_destroy(fakepve: Any, node: ProxmoxNode, guest_type: str, message: str) -> None:
    """A guest with protection=1 is not destroyed: PVE answers with its own error, and the guest stays."""
    vmid = add_guest(fakepve, guest_type, config={"protection": 1})
    with pytest.raises(PveError, match=re.escape(message)):
        run(ProxmoxWriter(node.session), node,
            step(DESTROY, vmid, guest_type, purge=True, destroy_unreferenced_disks=True))
    assert fakepve.guest(vmid) is not None


# --- disk.resize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("grow_to", [12 * GiB, 8 * GiB + 512 * (1 << 20)])
def test_resize_grows_a_container_mount_point_to_the_exact_size(fakepve: Any, node: ProxmoxNode,
                                                                grow_to: int) -> None:
    """An LXC resize is a ``resize`` task; the rootfs ends at exactly the signed size, sent absolute."""
    add_ct(fakepve)
    _, digest = node.config(LXC, 101)
    result, status, task = run(ProxmoxWriter(node.session), node,
                               step(RESIZE, 101, LXC, digest, disk="rootfs", size=grow_to))
    assert (result, task) == (TaskResult.OK, "resize"), status
    assert f"size={format_size(grow_to)}" in guest_config(fakepve, 101)["rootfs"]
    body = sent(fakepve, "PUT", "/lxc/101/resize")[-1]
    assert body["disk"] == "rootfs" and body["digest"] == digest and not body["size"].startswith("+")


def test_resize_grows_a_vm_disk(fakepve: Any, node: ProxmoxNode) -> None:
    """A QEMU resize is a ``resize`` task carrying the digest; the disk ends at exactly the signed size.

    fakepve only synthesizes QEMU's resize (schema-checked, nothing stored): ``QemuResizeAsPve`` applies
    PVE's rule to the request as sent.
    """
    add_vm(fakepve, disks={"scsi0": 4 * GiB, "scsi1": 2 * GiB})
    _, digest = node.config(QEMU, 100)
    writer = QemuResizeAsPve(ProxmoxWriter(node.session), fakepve)
    result, _, task = run(writer, node, step(RESIZE, 100, QEMU, digest, disk="scsi1", size=34359738368))
    assert (result, task) == (TaskResult.OK, "resize")
    assert "size=32G" in guest_config(fakepve, 100)["scsi1"] and "size=4G" in guest_config(fakepve, 100)["scsi0"]
    assert sent(fakepve, "PUT", "/qemu/100/resize")[-1] == {"disk": "scsi1", "size": "32G", "digest": digest}


@pytest.mark.parametrize(("guest_type", "disk", "value"), [
    (QEMU, "scsi1", "local-lvm:vm-100-disk-1,iothread=1,size=32G"),
    (LXC, "rootfs", "local-lvm:subvol-101-disk-0,size=32G"),
])
def test_the_resize_check_refuses_a_shrink_before_any_call(guest_type: str, disk: str, value: str) -> None:
    """The gate's check on the config as read: a shrink is invalid input; a grow or the same size may run."""
    check = ACTION_KINDS[RESIZE].check
    config = {disk: value}
    shrink = check(step(RESIZE, 100, guest_type, disk=disk, size=31 * GiB), config)
    assert shrink is not None and "shrink" in shrink and disk in shrink
    assert check(step(RESIZE, 100, guest_type, disk=disk, size=32 * GiB), config) is None
    assert check(step(RESIZE, 100, guest_type, disk=disk, size=33 * GiB), config) is None


@pytest.mark.parametrize(("config", "needle"), [
    ({}, "not in the config"),
    ({"scsi1": "local-lvm:vm-100-disk-1"}, "no size="),
    ({"scsi1": "local:iso/x.iso,media=cdrom,size=1G"}, "CD-ROM"),
])
def test_the_resize_check_refuses_what_it_cannot_tell_is_a_grow(config: dict[str, str], needle: str) -> None:
    """A disk that is missing, has no size= or is a CD-ROM is refused: a grow cannot be told from a shrink."""
    problem = ACTION_KINDS[RESIZE].check(step(RESIZE, 100, QEMU, disk="scsi1", size=40 * GiB), config)
    assert problem is not None and needle in problem


@given(current=st.integers(1, 1 << 50), delta=st.integers(-2, 2) | st.integers(-(1 << 50), 1 << 50))
def test_the_resize_check_refuses_exactly_the_shrinks(current: int, delta: int) -> None:
    """For any sizes, the check refuses a resize if and only if it would make the disk smaller (by even a byte)."""
    size = max(1, current + delta)
    config = {"scsi0": f"local-lvm:vm-100-disk-0,size={size_text(current)}"}
    problem = ACTION_KINDS[RESIZE].check(step(RESIZE, 100, QEMU, disk="scsi0", size=size), config)
    assert (problem is not None) == (size < current)


@given(st.integers(1, 1 << 53))
def test_sizes_are_sent_exactly_in_pves_syntax(size: int) -> None:
    """Any byte count is sent as a string PVE's pattern takes and reads back as exactly those bytes."""
    text = size_text(size)
    assert PVE_SIZE.fullmatch(text) and not text.startswith("+")
    assert size_bytes(text) == size


# --- snapshots -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("guest_type", "task"), [(QEMU, "qmsnapshot"), (LXC, "vzsnapshot")])
def test_snapshot_create_takes_the_snapshot(fakepve: Any, node: ProxmoxNode, guest_type: str, task: str) -> None:
    """A snapshot op leaves a snapshot of that name, through a qmsnapshot or vzsnapshot task."""
    vmid = add_guest(fakepve, guest_type)
    result, status, made = run(ProxmoxWriter(node.session), node, step(SNAPSHOT, vmid, guest_type, snapname="before"))
    assert (result, made) == (TaskResult.OK, task), status
    assert node.snapshots(guest_type, vmid) == ["before"]


def test_snapshot_with_vmstate_saves_a_running_vms_ram(fakepve: Any, node: ProxmoxNode) -> None:
    """vmstate=true on a running VM makes a snapshot that carries its RAM state."""
    add_vm(fakepve, disks={"scsi0": GiB}, status="running")
    result, _, _ = run(ProxmoxWriter(node.session), node, step(SNAPSHOT, 100, QEMU, snapname="live", vmstate=True))
    assert result is TaskResult.OK and fakepve.vm(100).snapshots["live"].get("vmstate")


def test_a_container_snapshot_with_vmstate_is_refused_before_any_request(fakepve: Any, node: ProxmoxNode) -> None:
    """LXC has no RAM state: the check refuses it, and the call itself sends nothing."""
    add_ct(fakepve)
    made = step(SNAPSHOT, 101, LXC, snapname="live", vmstate=True)
    problem = ACTION_KINDS[SNAPSHOT].check(made, {})
    assert problem is not None and "vmstate" in problem
    before = len(fakepve.requests)
    with pytest.raises(PveError, match="vmstate"):
        ACTION_KINDS[SNAPSHOT].call(ProxmoxWriter(node.session), made, CallSettings())
    assert len(fakepve.requests) == before and not fakepve.ct(101).snapshots


@pytest.mark.parametrize(("guest_type", "task"), [(QEMU, "qmrollback"), (LXC, "vzrollback")])
def test_rollback_brings_back_the_snapshots_config(fakepve: Any, node: ProxmoxNode, guest_type: str,
                                                   task: str) -> None:
    """After a rollback the guest's config is the snapshot's again (a later edit is gone)."""
    vmid = add_guest(fakepve, guest_type)
    writer = ProxmoxWriter(node.session)
    run(writer, node, step(SNAPSHOT, vmid, guest_type, snapname="before"))
    cores = guest_config(fakepve, vmid)["cores"]
    fakepve.guest(vmid).config["cores"] = 16
    result, status, made = run(writer, node, step(ROLLBACK, vmid, guest_type, snapname="before"))
    assert (result, made) == (TaskResult.OK, task), status
    assert guest_config(fakepve, vmid)["cores"] == cores and guest_config(fakepve, vmid)["parent"] == "before"


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize(("guest_type", "task"), [(QEMU, "qmdelsnapshot"), (LXC, "vzdelsnapshot")])
def test_snapshot_delete_removes_it(fakepve: Any, node: ProxmoxNode, guest_type: str, task: str,
                                    force: bool) -> None:
    """A snapshot delete (with or without force, which PVE's schema takes for both types) removes it."""
    vmid = add_guest(fakepve, guest_type)
    writer = ProxmoxWriter(node.session)
    run(writer, node, step(SNAPSHOT, vmid, guest_type, snapname="old"))
    run(writer, node, step(SNAPSHOT, vmid, guest_type, snapname="keep"))
    result, status, made = run(writer, node, step(DELETE_SNAPSHOT, vmid, guest_type, snapname="old", force=force))
    assert (result, made) == (TaskResult.OK, task), status
    assert node.snapshots(guest_type, vmid) == ["keep"]


# --- config ops: set_config with force -----------------------------------------------------------

def test_a_forced_detach_sends_force_with_the_delete_and_digest(fakepve: Any, node: ProxmoxNode) -> None:
    """A detach signed with force sends PVE's force=1 (free the volume) beside the delete and the digest.

    fakepve drops a deleted disk key outright (it models neither unusedN nor the volume being freed), so
    what is asserted is the request PVE reads, and that the disk left the config.
    """
    add_vm(fakepve, disks={"scsi0": 4 * GiB, "scsi1": GiB})
    _, digest = node.config(QEMU, 100)
    made = Step(vmid=100, guest_type=QEMU, kind=SET_CONFIG, delete=("scsi1",), digest=digest,
                params=(("force", True),))
    assert ACTION_KINDS[SET_CONFIG].check(made, node.config(QEMU, 100)[0]) is None
    result, _, task = run(ProxmoxWriter(node.session), node, made)
    assert (result, task) == (TaskResult.OK, "qmconfig")
    assert sent(fakepve, "POST", "/qemu/100/config")[-1] == {"delete": "scsi1", "digest": digest, "force": "1"}
    assert "scsi1" not in guest_config(fakepve, 100) and "scsi0" in guest_config(fakepve, 100)


def test_a_planned_config_write_sends_no_force(fakepve: Any, node: ProxmoxNode) -> None:
    """A set_config without force params is the request it always was (no force, the digest kept)."""
    add_vm(fakepve, disks={"scsi0": GiB})
    _, digest = node.config(QEMU, 100)
    made = Step(vmid=100, guest_type=QEMU, kind=SET_CONFIG, set=(("cores", "4"),), digest=digest)
    assert ACTION_KINDS[SET_CONFIG].check(made, {}) is None
    run(ProxmoxWriter(node.session), node, made)
    assert sent(fakepve, "POST", "/qemu/100/config")[-1] == {"cores": "4", "digest": digest}


def test_force_on_a_container_is_refused_before_any_request(fakepve: Any, node: ProxmoxNode) -> None:
    """LXC's config API has no force: the check says to delete the unusedN instead; the writer sends nothing."""
    add_ct(fakepve, config={"mp0": "local-lvm:vm-101-disk-1,mp=/data,size=1G"})
    made = Step(vmid=101, guest_type=LXC, kind=SET_CONFIG, delete=("mp0",), params=(("force", True),))
    problem = ACTION_KINDS[SET_CONFIG].check(made, {})
    assert problem is not None and "unusedN" in problem
    before = len(fakepve.requests)
    with pytest.raises(PveError, match="force"):
        ACTION_KINDS[SET_CONFIG].call(ProxmoxWriter(node.session), made, CallSettings())
    assert len(fakepve.requests) == before and "mp0" in guest_config(fakepve, 101)


@pytest.mark.parametrize(("params", "needle"), [
    ({"purge": True}, "params.destroy_unreferenced_disks is required"),
    ({"purge": 1, "destroy_unreferenced_disks": False}, "params.purge must be a bool"),
    ({"purge": True, "destroy_unreferenced_disks": False, "skiplock": True}, "params.skiplock is not a parameter"),
])
def test_a_step_with_bad_params_is_refused_and_never_sent(fakepve: Any, node: ProxmoxNode, params: dict[str, Any],
                                                         needle: str) -> None:
    """Params a row does not take, lacks or gets mistyped: the check names the field; the call sends nothing."""
    add_vm(fakepve, disks={"scsi0": GiB})
    made = step(DESTROY, 100, QEMU, **params)
    problem = ACTION_KINDS[DESTROY].check(made, {})
    assert problem is not None and needle in problem
    if "skiplock" not in params:
        before = len(fakepve.requests)
        with pytest.raises(StepError):
            ACTION_KINDS[DESTROY].call(ProxmoxWriter(node.session), made, CallSettings())
        assert len(fakepve.requests) == before and fakepve.vm(100) is not None


# --- recovery --------------------------------------------------------------------------------------

def setup_case(fakepve: Any, node: ProxmoxNode, case: str) -> tuple[Step, Any]:
    """A guest ready for ``case`` and the step (with the digest as read now), plus the writer to call it with."""
    kind, guest_type = case.split("/")
    vmid = add_guest(fakepve, guest_type)
    writer: Any = ProxmoxWriter(node.session)
    if kind in (ROLLBACK, DELETE_SNAPSHOT):
        run(writer, node, step(SNAPSHOT, vmid, guest_type, snapname="snap"))
    if guest_type == QEMU:
        writer = QemuResizeAsPve(writer, fakepve)
    digest = node.config(guest_type, vmid)[1]
    params: dict[str, dict[str, Any]] = {
        DESTROY: {"purge": True, "destroy_unreferenced_disks": False},
        RESIZE: {"disk": "scsi0" if guest_type == QEMU else "rootfs", "size": 16 * GiB},
        SNAPSHOT: {"snapname": "snap"}, ROLLBACK: {"snapname": "snap"}, DELETE_SNAPSHOT: {"snapname": "snap"},
        "detach": {}}
    if kind == "detach":
        made = Step(vmid=vmid, guest_type=QEMU, kind=SET_CONFIG, delete=("scsi0",), digest=digest,
                    params=(("force", True),))
    else:
        made = step(kind, vmid, guest_type, digest, **params[kind])
    return made, writer


def begin_signed(journal: Journal, made: Step, op_id: str = "0123456789abcdef0123456789abcdef") -> str:
    """The gate's begin for a signed op: the nonce's burn key, the digest it was planned from."""
    payload = {**made.payload(), "class": "destructive", "source": "operator_op", "digest": made.digest,
               "op": {"id": op_id, "kind": made.kind}}
    return journal.begin(vmid=made.vmid, kind=made.kind, payload=payload, key=f"op:{op_id}")


def ended(journal: Journal, op_id: str) -> Ended:
    """The end record recovery wrote for ``op_id``."""
    return next(r for r in journal.recent() if isinstance(r, Ended) and r.op_id == op_id)


CASES = [f"{kind}/{guest_type}" for kind in (DESTROY, RESIZE, SNAPSHOT, ROLLBACK, DELETE_SNAPSHOT)
         for guest_type in (QEMU, LXC)] + ["detach/qemu"]


@pytest.mark.parametrize("case", CASES)
def test_recovery_finds_the_task_of_a_call_made_just_before_a_crash(fakepve: Any, node: ProxmoxNode,
                                                                    tmp_path: Path, case: str) -> None:
    """Killed after the call, before its UPID was journaled: recovery finds the task by type and ends it ok."""
    made, writer = setup_case(fakepve, node, case)
    with Journal.open(tmp_path / "j") as journal:
        op_id = begin_signed(journal, made)
        ACTION_KINDS[made.kind].call(writer, made, CallSettings())  # the crash comes before journal.task()
        task = fakepve.tasklog[-1]
        assert task["type"] in ACTION_KINDS[made.kind].task_types
        seen = len(fakepve.requests)
        decided = recover(journal, node)
        assert [(op.op_id, outcome) for op, outcome in decided] == [(op_id, Outcome.OK)]
        assert any(path.endswith(f"/tasks/{task['upid']}/status") for _, path, _ in fakepve.requests[seen:])
        assert journal.in_flight() == []


@pytest.mark.parametrize("case", CASES)
def test_recovery_ends_an_op_whose_call_was_never_made_as_not_applied(fakepve: Any, node: ProxmoxNode,
                                                                      tmp_path: Path, case: str) -> None:
    """Killed between begin and the call: no task and the digest as planned, so FAILED "not applied" (nonce spent)."""
    made, _ = setup_case(fakepve, node, case)
    config = guest_config(fakepve, made.vmid)
    with Journal.open(tmp_path / "j") as journal:
        op_id = begin_signed(journal, made)
        decided = recover(journal, node)
        assert [(op.op_id, outcome) for op, outcome in decided] == [(op_id, Outcome.FAILED)]
        assert ended(journal, op_id).error == NOT_APPLIED
    assert guest_config(fakepve, made.vmid) == config


def test_recovery_of_a_destroy_whose_guest_is_gone_is_ok(fakepve: Any, node: ProxmoxNode, tmp_path: Path) -> None:
    """No task found but the guest is absent from the node: the destroy shows, so it ended ok."""
    made, _ = setup_case(fakepve, node, f"{DESTROY}/{QEMU}")
    with Journal.open(tmp_path / "j") as journal:
        op_id = begin_signed(journal, made)
        fakepve.vms.remove(fakepve.vm(made.vmid))  # gone, and no qmdestroy task in the list
        assert [(op.op_id, outcome) for op, outcome in recover(journal, node)] == [(op_id, Outcome.OK)]


@pytest.mark.parametrize("kind", [DESTROY, ROLLBACK, SNAPSHOT])
def test_recovery_with_no_task_and_a_changed_config_is_unknown(fakepve: Any, node: ProxmoxNode, tmp_path: Path,
                                                               kind: str) -> None:
    """No task, and the config changed since the op was planned (not by it): that cannot be told, so unknown."""
    made, _ = setup_case(fakepve, node, f"{kind}/{QEMU}")
    with Journal.open(tmp_path / "j") as journal:
        op_id = begin_signed(journal, made)
        fakepve.vm(made.vmid).config["cores"] = 8  # an administrator's edit
        assert [(op.op_id, outcome) for op, outcome in recover(journal, node)] == [(op_id, Outcome.UNKNOWN)]


@pytest.mark.parametrize(("signed", "outcome"), [(False, Outcome.UNKNOWN), (True, Outcome.FAILED)])
def test_recovery_of_a_config_write_not_applied(fakepve: Any, node: ProxmoxNode, tmp_path: Path, signed: bool,
                                                outcome: Outcome) -> None:
    """A planned config write with no task stays unknown as before; the same write as a signed op is "not applied"."""
    add_vm(fakepve, disks={"scsi0": GiB})
    made = Step(vmid=100, guest_type=QEMU, kind=SET_CONFIG, set=(("cores", "6"),), digest=node.config(QEMU, 100)[1])
    with Journal.open(tmp_path / "j") as journal:
        op_id = (begin_signed(journal, made) if signed
                 else journal.begin(vmid=100, kind=SET_CONFIG, payload=made.payload()))
        assert [(op.op_id, result) for op, result in recover(journal, node)] == [(op_id, outcome)]
