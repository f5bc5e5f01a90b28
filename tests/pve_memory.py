"""An in-memory Proxmox stand-in: a ``PveReader`` and a ``PveWriter`` over one model, no HTTP.

For the unit tests of the gate, the lane and the funnel (python-tuf's ``RepositorySimulator`` is the
model): the same protocols the real adapter implements, PVE's semantics the executor relies on, and
every call counted in ``requests`` as fakepve counts them (``(method, path, params)``, the same paths),
so a test asserts what Proxmox received in the same words. fakepve over HTTPS stays for the tests that
are about HTTP, TLS, tasks over the wire and crashes.

What it keeps of PVE: a config digest that changes on every write (a write with a stale one fails with
PVE's "checksum mismatch"), a locked guest refuses writes, a running QEMU guest's config writes go to its
pending section (a start applies it; a pending entry that changes nothing is dropped, as PVE's
cleanup_pending does) and the config read answers with that section applied (PVE's ``vm_config``
without ``current``), a NIC written without a MAC gets one drawn (PVE's ``parse_net``), a stop of a
stopped guest fails "VM/CT n not running", a start of a running one fails in its task, QEMU's config
POST answers a UPID and LXC's PUT answers None. Tasks end OK at once unless a test makes them fail
(``fail_tasks``) or stay running (``hold_tasks``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from executor.pve.node import LXC, QEMU, GuestList, GuestState, PendingSection, PveError, upid_node

CHECKSUM_MISMATCH = "checksum mismatch (file change by other user?)"
# Keys PVE applies to a running QEMU guest at once (fakepve's list); any other write waits for the next start.
HOTPLUG = frozenset({"name", "description", "onboot", "tags", "protection", "startup", "agent", "hookscript"})
_PREFIX = {QEMU: "VM", LXC: "CT"}
_NIC = re.compile(r"net\d+")
_QEMU_MODELS = frozenset({"e1000", "e1000e", "virtio", "rtl8139", "vmxnet3", "ne2k_pci", "ne2k_isa", "i82551",
                          "i82557b", "i82559er", "pcnet"})
_TASK_NAMES = {(QEMU, "start"): "qmstart", (LXC, "start"): "vzstart", (QEMU, "shutdown"): "qmshutdown",
               (LXC, "shutdown"): "vzshutdown", (QEMU, "config"): "qmconfig", (QEMU, "destroy"): "qmdestroy",
               (LXC, "destroy"): "vzdestroy", (QEMU, "resize"): "resize", (LXC, "resize"): "resize",
               (QEMU, "snapshot"): "qmsnapshot", (LXC, "snapshot"): "vzsnapshot",
               (QEMU, "rollback"): "qmrollback", (LXC, "rollback"): "vzrollback",
               (QEMU, "delsnapshot"): "qmdelsnapshot", (LXC, "delsnapshot"): "vzdelsnapshot"}


@dataclass(slots=True)
class MemGuest:
    """One guest as the stand-in holds it (fakepve's ``FakeVm`` fields the executor reads)."""

    vmid: int
    name: str
    type: str = QEMU
    node: str = "pve1"
    status: str = "stopped"
    config: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, Any] = field(default_factory=dict)  # key -> new value, None: a pending delete
    lock: str | None = None
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    start_error: str | None = None  # a start's task ends with it (fakepve's: e.g. a storage that is down)
    writes: int = 0  # every config write bumps it: the digest changes on every write, as the file's mtime does

    def digest(self) -> str:
        """The config digest a write must pass back."""
        blob = json.dumps([self.config, self.pending, sorted(self.snapshots), self.writes], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()

    def apply_pending(self) -> None:
        """A start applies the pending section."""
        for key, value in self.pending.items():
            if value is None:
                self.config.pop(key, None)
            else:
                self.config[key] = value
        self.pending.clear()


@dataclass(slots=True)
class MemTask:
    """A task as /nodes/{node}/tasks lists it."""

    upid: str
    type: str
    vmid: int
    starttime: int
    exitstatus: str | None = None  # None: still running

    def record(self) -> dict[str, Any]:
        """The task-list entry."""
        return {"upid": self.upid, "type": self.type, "id": str(self.vmid), "starttime": self.starttime}


class MemoryPve:
    """The in-memory node and cluster: ``PveReader`` and ``PveWriter`` both (hand it as ``pve`` and ``writer``)."""

    def __init__(self, node: str = "pve1", cluster: str = "fakecluster") -> None:
        self.node, self.cluster = node, cluster
        self.vms: list[MemGuest] = []
        self.others: dict[int, str] = {}  # guests of other nodes: vmid -> node (/cluster/resources)
        self.requests: list[tuple[str, str, Any]] = []
        self.issued: dict[str, MemTask] = {}  # UPID -> task, oldest first
        self.failing: dict[str, str] = {}  # task type -> the exit status its tasks end with
        self.held: set[str] = set()  # task types whose tasks stay running until ``finish``
        self._pids = itertools.count(1000)
        self._lock = threading.RLock()  # the lanes call from their threads

    # ----------------------------------------------------------------- the model, for the tests

    def add_vm(self, vmid: int, name: str, **fields: Any) -> MemGuest:
        """A QEMU guest (fakepve's ``add_vm`` arguments: status, config, pending, lock, node)."""
        return self._add(MemGuest(vmid, name, QEMU, **fields))

    def add_ct(self, vmid: int, name: str, **fields: Any) -> MemGuest:
        """An LXC guest."""
        return self._add(MemGuest(vmid, name, LXC, **fields))

    def _add(self, guest: MemGuest) -> MemGuest:
        guest.config.setdefault("hostname" if guest.type == LXC else "name", guest.name)
        self.vms.append(guest)
        return guest

    def vm(self, vmid: int) -> MemGuest:
        """The guest ``vmid`` (of any node); KeyError when there is none (``find`` for a maybe)."""
        found = self.find(vmid)
        if found is None:
            raise KeyError(vmid)
        return found

    def find(self, vmid: int) -> MemGuest | None:
        """The guest ``vmid`` (of any node), or None."""
        return next((g for g in self.vms if g.vmid == vmid), None)

    def snapshot_lock(self, vmid: int, lock: str = "snapshot") -> None:
        """Leave the guest locked (fakepve's name: an interrupted snapshot, a backup running)."""
        self.vm(vmid).lock = lock

    def fail_tasks(self, task_type: str, exitstatus: str) -> None:
        """Tasks of ``task_type`` (qmstart, vzshutdown, ...) end with ``exitstatus`` and change nothing."""
        self.failing[task_type] = exitstatus

    def hold_tasks(self, task_type: str) -> None:
        """Tasks of ``task_type`` stay running (their effect not applied) until ``finish``."""
        self.held.add(task_type)

    def finish(self, upid: str, exitstatus: str = "OK") -> None:
        """End a held task."""
        with self._lock:
            self.issued[upid].exitstatus = exitstatus

    # ----------------------------------------------------------------- PveReader

    def guests(self) -> GuestList:
        """This node's guests (one listing per guest type, counted as fakepve counts them)."""
        with self._lock:
            for kind in (QEMU, LXC):
                self._count("GET", f"/nodes/{self.node}/{kind}", {"full": 1} if kind == QEMU else {})
            return GuestList([GuestState(vmid=g.vmid, type=g.type, status=g.status, lock=g.lock or "", name=g.name)
                              for g in self.vms if g.node == self.node])

    def cluster_guests(self) -> dict[int, str]:
        """vmid -> node for every guest of the cluster."""
        with self._lock:
            self._count("GET", "/cluster/resources", {"type": "vm"})
            return {**self.others, **{g.vmid: g.node for g in self.vms}}

    def cluster_name(self) -> str:
        """The cluster's name."""
        with self._lock:
            self._count("GET", "/cluster/status", {})
            return self.cluster

    def config(self, guest_type: str, vmid: int) -> tuple[dict[str, str], str]:
        """The config with the pending section applied (PVE's default view; values as text) and its digest."""
        with self._lock:
            guest = self._guest("GET", guest_type, vmid, "config", {})
            applied = {**guest.config, **{k: v for k, v in guest.pending.items() if v is not None}}
            return {k: _text(v) for k, v in applied.items() if guest.pending.get(k, "") is not None}, guest.digest()

    def pending(self, guest_type: str, vmid: int) -> PendingSection:
        """The pending section beside the current values."""
        with self._lock:
            guest = self._guest("GET", guest_type, vmid, "pending", {})
            return PendingSection(current={k: _text(v) for k, v in guest.config.items()},
                           set={k: _text(v) for k, v in guest.pending.items() if v is not None},
                           delete=frozenset(k for k, v in guest.pending.items() if v is None))

    def task_status(self, upid: str) -> dict[str, Any]:
        """``running``, or ``stopped`` with the exit status; PVE's error for a UPID it does not know."""
        with self._lock:
            self._count("GET", f"/nodes/{upid_node(upid)}/tasks/{upid}/status", {})
            task = self.issued.get(upid)
            if task is None:
                raise PveError(f"no such task '{upid}'", 500)
            if task.exitstatus is None:
                return {"status": "running"}
            return {"status": "stopped", "exitstatus": task.exitstatus}

    def tasks_of(self, vmid: int) -> list[MemTask]:
        """Every task of guest ``vmid``, oldest first (for assertions)."""
        return [t for t in self.issued.values() if t.vmid == vmid]

    def tasks(self, vmid: int, since: float) -> list[dict[str, Any]]:
        """The node's tasks for ``vmid`` started at or after ``since``, running ones included."""
        with self._lock:
            self._count("GET", f"/nodes/{self.node}/tasks", {"vmid": vmid, "since": int(since), "source": "all"})
            return [t.record() for t in self.issued.values() if t.vmid == vmid and t.starttime >= int(since)]

    def snapshots(self, guest_type: str, vmid: int) -> list[str]:
        """The snapshots' names (``current`` left out)."""
        with self._lock:
            return list(self._guest("GET", guest_type, vmid, "snapshot", {}).snapshots)

    # ----------------------------------------------------------------- PveWriter

    def start(self, guest_type: str, vmid: int) -> str:
        """A start task: fails in the task when the guest is locked or already running."""
        with self._lock:
            guest = self._guest("POST", guest_type, vmid, "status/start", {})
            failure = (f"{_PREFIX[guest_type]} is locked ({guest.lock})" if guest.lock else
                       f"{_PREFIX[guest_type]} {vmid} already running" if guest.status == "running" else
                       guest.start_error)
            return self._task(guest, "start", failure, lambda: _started(guest))

    def shutdown(self, guest_type: str, vmid: int, timeout: int, force: bool) -> str:
        """A shutdown task; PVE refuses at once a guest not running, or locked."""
        with self._lock:
            guest = self._guest("POST", guest_type, vmid, "status/shutdown",
                                {"timeout": timeout, "forceStop": 1 if force else 0})
            if guest.status != "running":
                raise PveError(f"{_PREFIX[guest_type]} {vmid} not running", 500)
            self._unlocked(guest)
            return self._task(guest, "shutdown", None, lambda: setattr(guest, "status", "stopped"))

    def set_config(self, guest_type: str, vmid: int, values: Mapping[str, str], delete: Sequence[str],
                   digest: str, *, force: bool = False) -> str | None:
        """QEMU: POST, a qmconfig task's UPID; LXC: PUT, None. A stale digest or a lock refuses it."""
        params: dict[str, Any] = dict(values)
        if delete:
            params["delete"] = ",".join(delete)
        if digest:
            params["digest"] = digest
        if force:
            params["force"] = 1
        with self._lock:
            guest = self._guest("POST" if guest_type == QEMU else "PUT", guest_type, vmid, "config", params)
            if digest and digest != guest.digest():
                raise PveError(CHECKSUM_MISMATCH, 500)
            self._unlocked(guest)
            _write(guest, values, delete)
            if guest_type == LXC:
                return None
            return self._task(guest, "config", None, lambda: None)

    def destroy(self, guest_type: str, vmid: int, *, purge: bool, destroy_unreferenced_disks: bool) -> str:
        """A destroy task; PVE refuses a running or locked guest."""
        params = {name: 1 for name, on in (("purge", purge), ("destroy-unreferenced-disks",
                                                              destroy_unreferenced_disks)) if on}
        with self._lock:
            guest = self._guest("DELETE", guest_type, vmid, "", params)
            self._unlocked(guest)
            if guest.status == "running":
                raise PveError(f"{_PREFIX[guest_type]} {vmid} is running - destroy failed", 500)
            return self._task(guest, "destroy", None, lambda: self.vms.remove(guest))

    def resize(self, guest_type: str, vmid: int, disk: str, size: str, digest: str) -> str | None:
        """A resize task: the disk's size= set to ``size``."""
        params: dict[str, Any] = {"disk": disk, "size": size, **({"digest": digest} if digest else {})}
        with self._lock:
            guest = self._guest("PUT", guest_type, vmid, "resize", params)
            if digest and digest != guest.digest():
                raise PveError(CHECKSUM_MISMATCH, 500)
            self._unlocked(guest)
            if disk not in guest.config:
                raise PveError(f"disk '{disk}' does not exist", 500)
            return self._task(guest, "resize", None, lambda: _resized(guest, disk, size))

    def snapshot(self, guest_type: str, vmid: int, snapname: str, *, vmstate: bool) -> str:
        """A snapshot task."""
        with self._lock:
            guest = self._guest("POST", guest_type, vmid, "snapshot",
                                {"snapname": snapname, **({"vmstate": 1} if vmstate else {})})
            self._unlocked(guest)
            if snapname in guest.snapshots:
                raise PveError(f"snapshot name '{snapname}' already used", 500)
            return self._task(guest, "snapshot", None,
                              lambda: guest.snapshots.__setitem__(snapname, dict(guest.config)))

    def rollback(self, guest_type: str, vmid: int, snapname: str) -> str:
        """A rollback task: the config as the snapshot kept it, the guest stopped."""
        with self._lock:
            guest = self._guest("POST", guest_type, vmid, f"snapshot/{snapname}/rollback", {})
            self._unlocked(guest)
            if snapname not in guest.snapshots:
                raise PveError(f"snapshot '{snapname}' does not exist", 500)
            return self._task(guest, "rollback", None, lambda: _rolled_back(guest, snapname))

    def delete_snapshot(self, guest_type: str, vmid: int, snapname: str, *, force: bool) -> str:
        """A snapshot delete task."""
        with self._lock:
            guest = self._guest("DELETE", guest_type, vmid, f"snapshot/{snapname}", {"force": 1} if force else {})
            self._unlocked(guest)
            if snapname not in guest.snapshots:
                raise PveError(f"snapshot '{snapname}' does not exist", 500)
            return self._task(guest, "delsnapshot", None, lambda: guest.snapshots.pop(snapname))

    # ----------------------------------------------------------------- inside

    def _count(self, method: str, path: str, params: Any) -> None:
        self.requests.append((method, f"/api2/json{path}", params))

    def _guest(self, method: str, guest_type: str, vmid: int, tail: str, params: Any) -> MemGuest:
        """The guest of this node, the request counted; PVE's 500 when its config file is not there."""
        self._count(method, f"/nodes/{self.node}/{guest_type}/{vmid}" + (f"/{tail}" if tail else ""), params)
        guest = self.find(vmid)
        if guest is None or guest.node != self.node or guest.type != guest_type:
            where = "qemu-server" if guest_type == QEMU else "lxc"
            raise PveError(f"Configuration file 'nodes/{self.node}/{where}/{vmid}.conf' does not exist", 500)
        return guest

    @staticmethod
    def _unlocked(guest: MemGuest) -> None:
        if guest.lock:
            raise PveError(f"{_PREFIX[guest.type]} is locked ({guest.lock})", 500)

    def _task(self, guest: MemGuest, action: str, failure: str | None, effect: Any) -> str:
        """A UPID; the task ends at once (``effect`` applied), fails, or stays running as the test asked."""
        kind = _TASK_NAMES[(guest.type, action)]
        pid, now = next(self._pids), int(time.time())
        upid = f"UPID:{self.node}:{pid:08X}:{pid * 7:08X}:{now:08X}:{kind}:{guest.vmid}:root@pam:"
        task = MemTask(upid, kind, guest.vmid, now)
        self.issued[upid] = task
        failure = failure or self.failing.get(kind)
        if failure is not None:
            task.exitstatus = failure
        elif kind not in self.held:
            effect()
            task.exitstatus = "OK"
        return upid


def _text(value: Any) -> str:
    """A config value as PVE's JSON answer carries it, as the adapter hands it on (text)."""
    return str(int(value)) if isinstance(value, bool) else str(value)


def _started(guest: MemGuest) -> None:
    guest.apply_pending()
    guest.status = "running"


def _with_mac(key: str, value: str) -> str:
    """A NIC as PVE writes it: a MAC drawn when none is given (QEMU ``model=MAC``, LXC ``hwaddr=``)."""
    fields = value.split(",")
    if not _NIC.fullmatch(key) or any(f.startswith(("macaddr=", "hwaddr=")) for f in fields):
        return value
    mac = "BC:24:11:" + ":".join(f"{b:02X}" for b in secrets.token_bytes(3))
    head = next((i for i, f in enumerate(fields) if f.partition("=")[0] in _QEMU_MODELS), None)
    if head is None:
        return value if "name=" not in value else f"{value},hwaddr={mac}"  # an LXC NIC names its interface
    if "=" in fields[head] and fields[head].partition("=")[2]:
        return value  # model=MAC already
    fields[head] = f"{fields[head].partition('=')[0]}={mac}"
    return ",".join(fields)


def _write(guest: MemGuest, values: Mapping[str, str], delete: Sequence[str]) -> None:
    """A config write: a running QEMU guest's non-hotplug keys go to pending; the digest changes."""
    values = {key: _with_mac(key, value) for key, value in values.items()}
    deferred = guest.type == QEMU and guest.status == "running"
    for key in delete:
        if deferred and key not in HOTPLUG:
            guest.pending[key] = None
        else:
            guest.config.pop(key, None)
    for key, value in values.items():
        if deferred and key not in HOTPLUG:
            guest.pending[key] = value
        else:
            guest.config[key] = value
            guest.pending.pop(key, None)
    for key, value in list(guest.pending.items()):  # PVE's cleanup_pending: entries that change nothing go
        now = _text(guest.config[key]) if key in guest.config else None
        if now == (None if value is None else _text(value)):
            del guest.pending[key]
    guest.writes += 1


def _resized(guest: MemGuest, disk: str, size: str) -> None:
    parts = [p for p in str(guest.config[disk]).split(",") if not p.startswith("size=")]
    guest.config[disk] = ",".join([*parts, f"size={size}"])
    guest.writes += 1


def _rolled_back(guest: MemGuest, snapname: str) -> None:
    guest.config = dict(guest.snapshots[snapname])
    guest.pending.clear()
    guest.status = "stopped"
    guest.writes += 1
