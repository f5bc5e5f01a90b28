"""The classifier: every row of docs/SAFETY.md §1.3 and §2.1 gets its class and op kind; sources only raise."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from safety.classify import Action, Class, GuestFacts, Source, Verdict, classify

A, B, D = Class.APPROVAL, Class.BENIGN, Class.DESTRUCTIVE
VOL = "local-lvm:vm-100-disk-0"
QEMU_MAC, LXC_MAC = "BC:24:11:00:00:01", "BC:24:11:00:00:02"
QEMU_CONFIG = {
    "scsi0": f"{VOL},iothread=1,size=32G", "efidisk0": "local-lvm:vm-100-disk-1,efitype=4m,size=4M",
    "tpmstate0": "local-lvm:vm-100-disk-2,size=4M,version=v2.0", "unused0": "local-lvm:vm-100-disk-9",
    "vmstate": "local-lvm:vm-100-state-hib", "net0": f"virtio={QEMU_MAC},bridge=vmbr0,firewall=1",
    "protection": "0", "memory": "2048",
}
LXC_CONFIG = {
    "rootfs": "local-lvm:vm-200-disk-0,size=8G", "mp0": "local-lvm:vm-200-disk-1,mp=/data,backup=1",
    "unused0": "local-lvm:vm-200-disk-9", "net0": f"name=eth0,bridge=vmbr0,hwaddr={LXC_MAC},ip=dhcp",
    "protection": "0", "hostname": "web",
}
CONFIGS = {"qemu": QEMU_CONFIG, "lxc": LXC_CONFIG}


def run(guest_type: str, kind: str, *, set_: Mapping[str, str] | None = None, delete: tuple[str, ...] = (),
        params: Mapping[str, object] | None = None, config: Mapping[str, str] | None = None,
        read: bool = True, pending: frozenset[str] = frozenset(), source: Source = Source.HUB) -> Verdict:
    """Classify one action against the guest type's sample config (or ``config``, or none read)."""
    vmid = 200 if guest_type == "lxc" else 100  # the sample configs' volumes are these guests' own
    action = Action(kind=kind, vmid=vmid, guest_type=guest_type, set=set_ or {}, delete=delete, params=params or {})
    facts = GuestFacts(config=(config or CONFIGS[guest_type]) if read else None, pending_drive_keys=pending)
    return classify(action, facts, source)


def protected(guest_type: str) -> dict[str, str]:
    return {**CONFIGS[guest_type], "protection": "1"}


# (id, guest type, kind, set, delete, params, expected class, expected op kind)
SET_DELETE_ROWS = [
    ("protection 0->1", "qemu", {"protection": "1"}, (), B, "config"),
    ("protection 0->1 lxc", "lxc", {"protection": "1"}, (), B, "config"),
    ("protection delete", "qemu", {}, ("protection",), A, "config.protection_off"),
    ("nic keeps MAC, model=MAC", "qemu", {"net0": f"e1000={QEMU_MAC},bridge=vmbr1,firewall=1"}, (), B, "config"),
    ("nic keeps MAC, macaddr=", "qemu", {"net0": f"model=virtio,macaddr={QEMU_MAC.lower()},bridge=vmbr1,firewall=on"},
     (), B, "config"),
    ("nic firewall 1->0, MAC kept", "qemu", {"net0": f"virtio={QEMU_MAC},bridge=vmbr0"}, (), A,
     "config.nic_firewall_off"),
    ("nic firewall=0 written", "qemu", {"net0": f"virtio={QEMU_MAC},bridge=vmbr0,firewall=0"}, (), A,
     "config.nic_firewall_off"),
    ("nic keeps hwaddr", "lxc", {"net0": f"name=eth0,bridge=vmbr1,hwaddr={LXC_MAC.lower()}"}, (), B, "config"),
    ("nic new where none", "qemu", {"net1": "virtio,bridge=vmbr1,firewall=1"}, (), B, "config"),
    ("nic new, unfiltered beside a firewalled one", "qemu", {"net1": "virtio,bridge=vmbr1"}, (), A,
     "config.nic_firewall_off"),
    ("nic new where none lxc", "lxc", {"net1": "name=eth1,bridge=vmbr1"}, (), B, "config"),
    ("nic drops MAC", "qemu", {"net0": "e1000,bridge=vmbr1"}, (), A, "config.nic_identity"),
    ("nic changes MAC", "qemu", {"net0": "virtio=BC:24:11:00:00:99,bridge=vmbr0"}, (), A, "config.nic_identity"),
    ("nic drops hwaddr", "lxc", {"net0": "name=eth0,bridge=vmbr1,ip=dhcp"}, (), A, "config.nic_identity"),
    ("nic changes hwaddr", "lxc", {"net0": "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:99"}, (), A,
     "config.nic_identity"),
    ("nic delete", "qemu", {}, ("net0",), A, "config.nic_identity"),
    ("nic delete lxc", "lxc", {}, ("net0",), A, "config.nic_identity"),
    ("hostpci", "qemu", {"hostpci0": "0000:01:00.0,pcie=1"}, (), A, "config.host_device"),
    ("hostpci delete", "qemu", {}, ("hostpci0",), A, "config.host_device"),
    ("usb host", "qemu", {"usb0": "host=1234:5678"}, (), A, "config.host_device"),
    ("serial device", "qemu", {"serial0": "/dev/ttyS0"}, (), A, "config.host_device"),
    ("parallel", "qemu", {"parallel0": "/dev/parport0"}, (), A, "config.host_device"),
    ("lxc dev", "lxc", {"dev0": "/dev/ttyUSB0,mode=0660"}, (), A, "config.host_device"),
    ("serial socket is no device", "qemu", {"serial0": "socket"}, (), B, "config"),
    ("usb spice is no device", "qemu", {"usb0": "spice"}, (), B, "config"),
    ("hookscript", "qemu", {"hookscript": "local:snippets/hook.pl"}, (), D, "config.host_code"),
    ("hookscript lxc", "lxc", {"hookscript": "local:snippets/hook.pl"}, (), D, "config.host_code"),
    ("args", "qemu", {"args": "-device foo"}, (), D, "config.host_code"),
    ("raw lxc key", "lxc", {"lxc.mount.entry": "/ mnt none bind 0 0"}, (), D, "config.host_code"),
    ("attach scsi", "qemu", {"scsi1": "local-lvm:32"}, (), A, "config.disk_attach"),
    ("attach virtio", "qemu", {"virtio0": "local-lvm:32"}, (), A, "config.disk_attach"),
    ("attach sata", "qemu", {"sata0": "local-lvm:32"}, (), A, "config.disk_attach"),
    ("attach ide", "qemu", {"ide0": "local-lvm:32"}, (), A, "config.disk_attach"),
    ("attach mp", "lxc", {"mp1": "local-lvm:8,mp=/srv"}, (), A, "config.disk_attach"),
    ("options: same volume", "qemu", {"scsi0": f"{VOL},cache=unsafe,size=32G"}, (), A, "config.disk_options"),
    ("options: file= spelling", "qemu", {"scsi0": f"file={VOL},backup=0"}, (), A, "config.disk_options"),
    ("options: lxc mp", "lxc", {"mp0": "local-lvm:vm-200-disk-1,mp=/data,backup=0"}, (), A, "config.disk_options"),
    ("swap: other volume", "qemu", {"scsi0": "local-lvm:vm-100-disk-7,size=32G"}, (), D, "config.disk_swap"),
    ("swap: new allocation", "qemu", {"scsi0": "local-lvm:32"}, (), D, "config.disk_swap"),
    ("swap: efidisk", "qemu", {"efidisk0": "other:vm-100-disk-5"}, (), D, "config.disk_swap"),
    ("swap: rootfs", "lxc", {"rootfs": "local-lvm:vm-200-disk-5,size=8G"}, (), D, "config.disk_swap"),
    ("foreign: another guest's volume", "qemu", {"scsi5": "local-lvm:vm-500-disk-0,size=4G"}, (), D,
     "config.disk_swap"),
    ("foreign: a base image of another guest", "lxc", {"mp3": "local:base-900-disk-0,mp=/x"}, (), D,
     "config.disk_swap"),
    ("foreign: a host path", "qemu", {"scsi5": "/dev/sdb"}, (), D, "config.disk_swap"),
    ("foreign: an import", "qemu", {"scsi5": "local-lvm:0,import-from=local:iso/disk.qcow2"}, (), D,
     "config.disk_swap"),
    ("detach scsi", "qemu", {}, ("scsi0",), D, "config.disk_detach"),
    ("detach efidisk", "qemu", {}, ("efidisk0",), D, "config.disk_detach"),
    ("detach tpmstate", "qemu", {}, ("tpmstate0",), D, "config.disk_detach"),
    ("detach mp", "lxc", {}, ("mp0",), D, "config.disk_detach"),
    ("detach rootfs", "lxc", {}, ("rootfs",), D, "config.disk_detach"),
    ("unused delete", "qemu", {}, ("unused0",), D, "config.unused_delete"),
    ("unused delete lxc", "lxc", {}, ("unused0",), D, "config.unused_delete"),
    ("vmstate delete", "qemu", {}, ("vmstate",), D, "config.unused_delete"),
    ("template", "qemu", {"template": "1"}, (), D, "config.template"),
    ("template lxc", "lxc", {"template": "1"}, (), D, "config.template"),
    ("unknown key", "qemu", {"frobnicate": "1"}, (), A, "config.unknown_key"),
    ("cloud-init user", "qemu", {"ciuser": "root"}, (), A, "config.guest_credentials"),
    ("cloud-init keys", "qemu", {"sshkeys": "ssh-ed25519%20AAAA"}, (), A, "config.guest_credentials"),
    ("cloud-init password", "qemu", {"cipassword": "hunter2"}, (), A, "config.guest_credentials"),
    ("cloud-init custom", "qemu", {"cicustom": "user=local:snippets/u.yaml"}, (), A, "config.guest_credentials"),
    ("cloud-init user delete", "qemu", {}, ("sshkeys",), A, "config.guest_credentials"),
    ("qemu-only key on lxc", "lxc", {"name": "web"}, (), A, "config.unknown_key"),
    ("lxc-only key on qemu", "qemu", {"hostname": "web"}, (), A, "config.unknown_key"),
    ("disk key of the other type", "lxc", {}, ("scsi0",), A, "config.unknown_key"),
]


@pytest.mark.parametrize(("guest_type", "set_", "delete", "cls", "op_kind"),
                         [pytest.param(*row[1:], id=row[0]) for row in SET_DELETE_ROWS])
def test_config_key_rows(guest_type: str, set_: dict[str, str], delete: tuple[str, ...], cls: Class,
                         op_kind: str) -> None:
    """Each config row of docs/SAFETY.md §2.1 is classed by its effect, with the op kind roles name."""
    verdict = run(guest_type, "set_config", set_=set_, delete=delete)
    assert (verdict.cls, verdict.op_kind) == (cls, op_kind)
    assert all(verdict.reasons[0].startswith(f"{key}: ") for key in (*set_, *delete))


QEMU_BENIGN = ["name", "balloon", "sockets", "vcpus", "cpu", "numa", "agent", "vga", "hotplug", "bios",
               "machine", "acpi", "kvm", "tablet", "localtime", "ipconfig0", "ipconfig7", "keyboard", "reboot"]
# A value of each key's own grammar (a property string such as vga's does not read "1").
BENIGN_VALUES = {"vga": "std", "machine": "q35", "ipconfig0": "ip=dhcp",
                 "ipconfig7": "ip=10.0.0.7/24,gw=10.0.0.1", "keyboard": "de", "cpu": "host,flags=+aes",
                 "startup": "order=2,up=30", "timezone": "Europe/Berlin", "bios": "ovmf", "ostype": "l26"}
COMMON_BENIGN = ["description", "tags", "onboot", "startup", "memory", "cores", "cpulimit", "cpuunits", "ostype",
                 "nameserver", "searchdomain"]
LXC_BENIGN = ["hostname", "swap", "cmode", "console", "tty", "timezone"]


@pytest.mark.parametrize(("guest_type", "key"), [("qemu", k) for k in (*QEMU_BENIGN, *COMMON_BENIGN)]
                         + [("lxc", k) for k in (*LXC_BENIGN, *COMMON_BENIGN)])
def test_benign_keys_are_benign_to_write_and_delete(guest_type: str, key: str) -> None:
    """The docs/SAFETY.md §2.1 benign key list: writing or deleting one loses no data, whoever asks."""
    value = BENIGN_VALUES.get(key, "1")
    for verdict in (run(guest_type, "set_config", set_={key: value}), run(guest_type, "set_config", delete=(key,))):
        assert (verdict.cls, verdict.op_kind, verdict.rule) == (B, "config", "benign_key")


def test_a_boot_order_keeping_the_first_device_is_benign_a_new_first_device_is_not() -> None:
    """What boots first reads every disk: a hub must not netboot a guest into an image of its choosing."""
    config = {**QEMU_CONFIG, "boot": "order=scsi0;net0"}
    kept = run("qemu", "set_config", set_={"boot": "order=scsi0;ide2;net0"}, config=config)
    assert (kept.cls, kept.op_kind) == (B, "config")
    netboot = run("qemu", "set_config", set_={"boot": "order=net0;scsi0"}, config=config)
    assert (netboot.cls, netboot.op_kind) == (A, "config.boot_device")


def test_lxc_nic_firewall_lowered_needs_approval() -> None:
    """An LXC NIC written without the firewall it has leaves PVE's filters: approval (matrix row: firewall 1->0)."""
    config = {**LXC_CONFIG, "net0": f"name=eth0,bridge=vmbr0,firewall=1,hwaddr={LXC_MAC},ip=dhcp"}
    lowered = run("lxc", "set_config", set_={"net0": f"name=eth0,bridge=vmbr0,hwaddr={LXC_MAC},ip=dhcp"}, config=config)
    assert (lowered.cls, lowered.op_kind, lowered.rule) == (A, "config.nic_firewall_off", "nic_firewall_off")
    kept = run("lxc", "set_config", set_={"net0": f"name=eth0,bridge=vmbr1,hwaddr={LXC_MAC},ip=dhcp,firewall=1"},
               config=config)
    assert kept.cls is B


@pytest.mark.parametrize("guest_type", ["qemu", "lxc"])
def test_protection_lowered_needs_approval(guest_type: str) -> None:
    """protection 1→0 lowers PVE's removal guard; writing 0 where it is already 0 changes nothing."""
    lowered = run(guest_type, "set_config", set_={"protection": "0"}, config=protected(guest_type))
    assert (lowered.cls, lowered.op_kind) == (A, "config.protection_off")
    assert run(guest_type, "set_config", set_={"protection": "off"}).cls is B
    assert run(guest_type, "set_config", set_={"protection": "0"}, read=False).cls is A


def test_facts_not_read_fail_closed() -> None:
    """Without the config, a disk write may be a swap and a NIC write may drop the MAC."""
    assert run("qemu", "set_config", set_={"scsi1": "local-lvm:32"}, read=False).op_kind == "config.disk_swap"
    assert run("qemu", "set_config", set_={"scsi1": "local-lvm:32"}, read=False).cls is D
    assert run("lxc", "set_config", set_={"net1": "name=eth1"}, read=False).cls is A


@dataclass(frozen=True, slots=True, kw_only=True)
class Power:
    """One start/stop row: the guest, what is pending, who asks, the class expected."""

    guest_type: str
    kind: str
    source: Source
    cls: Class
    protection: str = "0"
    pending: frozenset[str] = frozenset()


POWER_ROWS = {
    "start": Power(guest_type="qemu", kind="start", source=Source.HUB, cls=B),
    "start lxc": Power(guest_type="lxc", kind="start", source=Source.HUB, cls=B),
    "stop": Power(guest_type="qemu", kind="stop", source=Source.HUB, cls=B),
    "stop lxc": Power(guest_type="lxc", kind="stop", source=Source.HUB, cls=B),
    "start with pending drives": Power(guest_type="qemu", kind="start", source=Source.LOCAL_FILE, cls=A,
                                       pending=frozenset({"scsi1"})),
    "start protected from hub": Power(guest_type="qemu", kind="start", source=Source.HUB, cls=A, protection="1"),
    "stop protected from hub": Power(guest_type="lxc", kind="stop", source=Source.HUB, cls=A, protection="1"),
    "stop protected from selftest": Power(guest_type="qemu", kind="stop", source=Source.SELFTEST, cls=A,
                                          protection="1"),
    "stop protected from the local file": Power(guest_type="qemu", kind="stop", source=Source.LOCAL_FILE, cls=B,
                                                protection="1"),
    "stop protected by an operator op": Power(guest_type="lxc", kind="stop", source=Source.OPERATOR_OP, cls=B,
                                              protection="1"),
    "stop: pending drives do not matter": Power(guest_type="qemu", kind="stop", source=Source.HUB, cls=B,
                                                pending=frozenset({"scsi1"})),
}


@pytest.mark.parametrize("row", [pytest.param(row, id=name) for name, row in POWER_ROWS.items()])
def test_power_rows(row: Power) -> None:
    """start/stop are benign unless a start applies pending drives or an untrusted source touches a protected guest."""
    config = {**CONFIGS[row.guest_type], "protection": row.protection}
    verdict = run(row.guest_type, row.kind, config=config, pending=row.pending, source=row.source)
    assert (verdict.cls, verdict.op_kind) == (row.cls, row.kind)


def test_power_of_a_guest_whose_config_was_not_read() -> None:
    """Protection unknown: a hub's stop needs approval, the local file's does not."""
    assert run("qemu", "stop", read=False, source=Source.HUB).cls is A
    assert run("qemu", "stop", read=False, source=Source.LOCAL_FILE).cls is B


OP_KIND_ROWS = [
    ("disk.resize", {}, A, "disk.resize"),
    ("disk.move", {"storage": "ceph", "delete": 0}, A, "disk.move"),
    ("disk.move", {"storage": "ceph", "delete": 1}, D, "disk.move_delete"),
    ("disk.move", {"target-vmid": 101}, D, "disk.reassign"),
    ("disk.move_delete", {}, D, "disk.move_delete"),
    ("disk.reassign", {}, D, "disk.reassign"),
    ("snapshot.create", {"snapname": "pre"}, A, "snapshot.create"),
    ("snapshot.rollback", {}, D, "snapshot.rollback"),
    ("snapshot.delete", {}, D, "snapshot.delete"),
    ("guest.migrate", {"target": "pve2"}, A, "guest.migrate"),
    ("guest.template", {}, D, "guest.template"),
    ("guest.destroy", {"purge": False}, D, "guest.destroy"),
    ("config.protection_off", {}, A, "config.protection_off"),
    ("vm.frobnicate", {}, D, "unknown"),
    ("", {}, D, "unknown"),
]


@pytest.mark.parametrize("guest_type", ["qemu", "lxc"])
@pytest.mark.parametrize(("kind", "params", "cls", "op_kind"),
                         [pytest.param(*row, id=f"{row[0]}-{row[3]}") for row in OP_KIND_ROWS])
def test_op_kind_rows(guest_type: str, kind: str, params: dict[str, object], cls: Class, op_kind: str) -> None:
    """The issue-10 op kinds get their docs/SAFETY.md §1.3 class whoever asks; an unknown kind is destructive."""
    for source in Source:
        verdict = run(guest_type, kind, params=params, source=source)
        assert (verdict.cls, verdict.op_kind) == (cls, op_kind)


def test_destroy_flags_unreferenced_disks() -> None:
    """destroy_unreferenced_disks=true reaches volumes outside the config: the verdict says so."""
    plain = run("qemu", "guest.destroy")
    flagged = run("qemu", "guest.destroy", params={"destroy_unreferenced_disks": True})
    assert not any("destroy_unreferenced_disks" in r for r in plain.reasons)
    assert any("destroy_unreferenced_disks=true" in r and "outside the config" in r for r in flagged.reasons)


def test_a_mild_kind_cannot_smuggle_keys() -> None:
    """Keys ride along on any kind and still count: a 'start' carrying hookscript is destructive."""
    verdict = run("qemu", "start", set_={"hookscript": "local:snippets/x.pl"}, source=Source.LOCAL_FILE)
    assert (verdict.cls, verdict.op_kind) == (D, "config.host_code")


def test_set_config_reports_every_key_strictest_first() -> None:
    """A plan shows why: one reason per key, the deciding one first."""
    verdict = run("qemu", "set_config", set_={"memory": "4096", "net0": "e1000,bridge=vmbr1"}, delete=("scsi0",))
    assert (verdict.cls, verdict.op_kind, verdict.rule) == (D, "config.disk_detach", "disk_detach")
    assert verdict.reasons[0].startswith("scsi0: delete detaches a disk")
    assert [r.split(":")[0] for r in verdict.reasons] == ["scsi0", "net0", "memory"]


@pytest.mark.parametrize(("field", "kwargs"), [
    ("vmid", {"vmid": 0, "guest_type": "qemu"}),
    ("vmid", {"vmid": True, "guest_type": "qemu"}),
    ("guest_type", {"vmid": 100, "guest_type": "QEMU"}),
    ("delete", {"vmid": 100, "guest_type": "lxc", "delete": "scsi0"}),
])
def test_malformed_action_names_the_field(field: str, kwargs: dict[str, object]) -> None:
    """Bad input is a clear error naming the field, not a silent misclassification."""
    with pytest.raises(ValueError, match=f"Action.{field}"):
        Action(kind="set_config", **kwargs)  # type: ignore[arg-type]
