"""The gate reads PVE's grammar (issue 13 items 1-2, docs/SAFETY.md §2.2, §12 rows 49, 50, 53).

The grammar is generated from PVE's own API schema (the apidoc fakepve ships); these tests keep the
generated module fresh, enumerate the schema so that a key a PVE release adds fails until the key table
gives it a row, and pin what the red team got through: aliases (``volume=`` for ``file=``, ``cdrom`` for
``ide2``), a dir storage's ``N/`` volumes, LXC ``basevol-N-``, values PVE reads differently from us.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.loop.desired import Declared
from executor.loop.engine import Engine
from opctl.doc import Proposal
from planner.v1 import planner_pb2 as pb
from safety import grammar, keys
from safety.classify import Action, Class, GuestFacts, Source, classify
from safety.refusal import Refused
from tests.planner_standins import scripted_planner
from tests.signed_helpers import add_vm, mutations, open_desk

ROOT = Path(__file__).resolve().parent.parent
A, B, D = Class.APPROVAL, Class.BENIGN, Class.DESTRUCTIVE
Make = Callable[..., Engine]


def schema_config_keys() -> dict[str, set[str]]:
    """Every config key PVE's schema names (writable or returned by GET), numbered families as ``name[n]``."""
    data = importlib.resources.files("fakepve") / "data" / "pve-api.json.gz"
    paths = json.loads(gzip.decompress(data.read_bytes()))["paths"]
    found = {}
    for guest_type, method in (("qemu", "POST"), ("lxc", "PUT")):
        path = paths[f"/nodes/{{node}}/{guest_type}/{{vmid}}/config"]
        found[guest_type] = set(path[method]["parameters"]["properties"]) | set(path["GET"]["returns"]["properties"])
    return found


def test_the_generated_grammar_is_the_schemas() -> None:
    """safety/pvegrammar_data.py is what scripts/gen_pve_grammar.py makes of the schema now (run it to refresh)."""
    result = subprocess.run([sys.executable, "scripts/gen_pve_grammar.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("guest_type", ["qemu", "lxc"])
def test_every_schema_key_has_an_explicit_row(guest_type: str) -> None:
    """No key of PVE's schema falls to the unknown-key default: each has a row with its reason, so a key a new
    PVE release adds fails here until it is given one. API parameters are not config keys."""
    names = schema_config_keys()[guest_type] - keys.API_PARAMETERS
    concrete = {name.replace("[n]", "0") for name in names}
    missing = sorted(key for key in concrete if not keys.known(guest_type, key))
    assert missing == []
    assert len(names) >= (85 if guest_type == "qemu" else 30)  # the enumeration is not vacuous
    assert {grammar.key_spec(guest_type, key) is not None for key in concrete} == {True}


# --- PVE's property-string grammar -----------------------------------------------------------

@pytest.mark.parametrize(("value", "fields"), [
    ("volume=local-lvm:vm-500-disk-0", {"file": "local-lvm:vm-500-disk-0"}),  # volume is an alias of file
    ("local-lvm:vm-100-disk-0,cache=none", {"file": "local-lvm:vm-100-disk-0", "cache": "none"}),  # default key
    ("file=local-lvm:vm-100-disk-0,backup=off", {"file": "local-lvm:vm-100-disk-0", "backup": "0"}),
])
def test_a_drive_reads_as_pve_reads_it(value: str, fields: dict[str, str]) -> None:
    """A bare token is the default key, an alias is its target, booleans read as 1/0."""
    assert grammar.parse("qemu", "scsi0", value) == fields


def test_a_nic_model_token_spells_two_fields() -> None:
    """QEMU's ``virtio=<MAC>`` is a keyAlias: model=virtio and macaddr=<MAC>."""
    assert grammar.parse("qemu", "net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0") == {
        "model": "virtio", "macaddr": "BC:24:11:00:00:01", "bridge": "vmbr0"}


@pytest.mark.parametrize(("key", "value", "why"), [
    ("scsi0", "file=local-lvm:vm-100-disk-0,volume=/dev/sda", "alias"),
    ("scsi0", "local-lvm:vm-100-disk-0,file=/dev/sda", "duplicate field 'file'"),
    ("scsi0", "local-lvm:vm-100-disk-0,cache=none,cache=unsafe", "duplicate"),
    ("scsi0", "local-lvm:vm-100-disk-0,foo=1", "unknown field"),
    ("scsi0", "local-lvm:vm-100-disk-0,cache=", "a name and a value"),
    ("scsi0", "local-lvm:vm-100-disk-0,cache=bogus", "is not one of"),
    ("scsi0", "cache=none", "needs the field 'file'"),
    ("net0", "model=virtio,virtio=BC:24:11:00:00:01", "a second time"),
    ("net0", "virtio,firewall=maybe", "not a PVE boolean"),
    ("mp0", "local-lvm:vm-100-disk-1", "needs the field 'mp'"),
])
def test_a_value_pve_would_read_otherwise_is_unreadable(key: str, value: str, why: str) -> None:
    """Unknown, duplicate and double-spelled fields, missing required ones, values outside the enum."""
    with pytest.raises(grammar.UnreadableError, match=why):
        grammar.parse("lxc" if key == "mp0" else "qemu", key, value)


@pytest.mark.parametrize(("value", "owner"), [
    ("local-lvm:vm-500-disk-0", 500), ("local-lvm:base-500-disk-0", 500), ("local-zfs:subvol-500-disk-0", 500),
    ("local-zfs:basevol-500-disk-0", 500), ("local:500/x.qcow2", 500), ("local:500/vm-500-disk-0.qcow2", 500),
    ("local-zfs:base-500-disk-0/vm-100-disk-1", 100),  # a linked clone belongs to the clone
    ("local:500/base-500-disk-0.qcow2/100/vm-100-disk-1.qcow2", 100),
])
def test_a_volumes_owner_comes_from_pves_volume_grammar(value: str, owner: int) -> None:
    """One function tells who owns a volume, in every naming PVE's storage plugins use."""
    assert grammar.volume(value) == grammar.Volume(kind="owned", owner=owner, text=value)


@pytest.mark.parametrize(("value", "kind"), [
    ("local:iso/debian.iso", "iso"), ("local:snippets/u.yaml", "content"),
    ("local:backup/vzdump-qemu-1.vma", "content"),
    ("local:iso/../images/500/x.qcow2", "unknown"), ("local-lvm:32", "new"),
    ("none", "none"), ("/dev/sda", "host"), ("cdrom", "host"), ("vm-100-disk-0", "unknown"),
    ("local:100/vm-500-disk-0.qcow2", "unknown"),  # two owners in one name: not ours to guess
])
def test_what_else_a_disk_value_can_name(value: str, kind: str) -> None:
    """An ISO, host content, a new allocation, no medium, a host path or device, or a name whose owner is unclear."""
    assert grammar.volume(value).kind == kind


# --- matrix rows 49, 50, 53: classified by the grammar ----------------------------------------

QEMU_DISKS = {"ide2": "local-lvm:vm-100-disk-3,size=32G", "scsi0": "local-lvm:vm-100-disk-0,size=32G",
              "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"}


def verdict(guest_type: str, *, set_: dict[str, str] | None = None, delete: tuple[str, ...] = (),
            config: dict[str, str] | None = None, vmid: int = 100) -> tuple[Class, str, str]:
    """(class, op kind, rule) of a config write from a hub."""
    action = Action(kind="set_config", vmid=vmid, guest_type=guest_type, set=set_ or {}, delete=delete)
    found = classify(action, GuestFacts(config=QEMU_DISKS if config is None else config), Source.HUB)
    return found.cls, found.op_kind, found.rule


@pytest.mark.parametrize(("key", "value"), [
    ("scsi5", "volume=local-lvm:vm-500-disk-0"),  # the red team's first spelling
    ("scsi6", "volume=/dev/sda"),  # the host's disk
    ("scsi7", "local:500/x.qcow2"),  # a dir storage's volume of guest 500
    ("scsi8", "file=local-zfs:base-500-disk-0/vm-500-disk-1"),
    ("efidisk0", "volume=local-lvm:vm-500-disk-9"),
])
def test_row_49_an_alias_spelling_is_classified_as_the_plain_one(key: str, value: str) -> None:
    """Another guest's volume or a host path is destructive however PVE lets it be spelled."""
    assert verdict("qemu", set_={key: value}) == (D, "config.disk_swap", "disk_foreign")


def test_row_49_an_lxc_mount_point_of_another_guests_base_volume() -> None:
    """LXC ``basevol-N-`` is guest N's, like ``subvol-N-``."""
    found = verdict("lxc", set_={"mp3": "local-zfs:basevol-500-disk-0,mp=/x"}, config={}, vmid=200)
    assert found == (D, "config.disk_swap", "disk_foreign")


def test_row_49_cdrom_is_ide2() -> None:
    """A ``cdrom`` write over an ide2 hard disk swaps it out; a ``cdrom`` delete detaches it. Over an ISO, a
    cdrom write changes the medium only."""
    assert verdict("qemu", set_={"cdrom": "local:iso/x.iso"}) == (D, "config.disk_swap", "disk_swap")
    assert verdict("qemu", delete=("cdrom",)) == (D, "config.disk_detach", "disk_detach")
    on_iso = {**QEMU_DISKS, "ide2": "local:iso/a.iso,media=cdrom"}
    assert verdict("qemu", set_={"cdrom": "local:iso/b.iso"}, config=on_iso) == (A, "config.disk_options",
                                                                                  "disk_media")
    assert verdict("qemu", set_={"cdrom": "none", "ide2": "none,media=cdrom"}, config=on_iso)[0] is D  # two spellings


@pytest.mark.parametrize(("key", "value"), [
    ("scsi0", "file=local-lvm:vm-100-disk-0,volume=local-lvm:vm-500-disk-0"),
    ("scsi0", "local-lvm:vm-100-disk-0,foo=1"),
    ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0,bridge=vmbr1"),
    ("agent", "1,freeze-fs=0,freeze-fs-on-backup=1"),
    ("vga", "std,secret=1"),
])
def test_row_50_a_value_that_does_not_parse_is_destructive(key: str, value: str) -> None:
    """UnreadableError is destructive, whatever the key's row would say of a readable value."""
    assert verdict("qemu", set_={key: value}) == (D, "config.unreadable", "unreadable")


def test_row_50_a_disk_as_read_that_does_not_parse_makes_a_write_over_it_destructive() -> None:
    """The class of a disk write depends on the volume it replaces: if that does not read, neither does the write."""
    config = {**QEMU_DISKS, "scsi0": "local-lvm:vm-100-disk-0,newfield=1"}
    assert verdict("qemu", set_={"scsi0": "local-lvm:vm-100-disk-0,cache=none"}, config=config)[0] is D


@pytest.mark.parametrize("key", ["ciuser", "sshkeys", "cipassword", "cicustom"])
def test_row_53_cloud_init_credentials_need_approval(key: str) -> None:
    """Who logs in to the guest is not a hub's to grant itself."""
    value = "user=local:snippets/u.yaml" if key == "cicustom" else "root"
    assert verdict("qemu", set_={key: value})[:2] == (A, "config.guest_credentials")


@pytest.mark.parametrize(("guest_type", "key", "value", "expected"), [
    ("qemu", "keyboard", "de", (B, "config")), ("qemu", "reboot", "0", (B, "config")),
    ("lxc", "timezone", "Europe/Berlin", (B, "config")),
    ("qemu", "lock", "backup", (A, "config.lock")), ("lxc", "features", "nesting=1", (A, "config.isolation")),
    ("lxc", "unprivileged", "0", (D, "config.host_code")), ("qemu", "virtiofs0", "shared", (A, "config.host_device")),
    ("qemu", "ivshmem", "size=32", (A, "config.host_device")),
    ("qemu", "rng0", "/dev/hwrng", (A, "config.host_device")),
    ("qemu", "rng0", "/dev/urandom", (B, "config")), ("qemu", "vmgenid", "1", (A, "config.guest_identity")),
    ("qemu", "runningmachine", "pc-q35-9.0", (D, "config.pve_internal")),
])
def test_keys_that_used_to_fall_to_the_default_have_their_class(guest_type: str, key: str, value: str,
                                                                 expected: tuple[Class, str]) -> None:
    """Harmless keys are no longer gated; keys that matter no longer get their class by luck."""
    config: dict[str, str] = {}
    assert verdict(guest_type, set_={key: value}, config=config)[:2] == expected


def test_the_smbios_uuid_is_the_guests_identity() -> None:
    """Changing or dropping the uuid needs approval, like a MAC; other SMBIOS fields are labels."""
    config = {"smbios1": "uuid=6c0f2d4e-0000-4000-8000-000000000001,manufacturer=acme"}
    assert verdict("qemu", set_={"smbios1": "uuid=6c0f2d4e-0000-4000-8000-000000000002"}, config=config)[0] is A
    assert verdict("qemu", set_={"smbios1": "manufacturer=acme"}, config=config)[0] is A
    assert verdict("qemu", delete=("smbios1",), config=config)[0] is A
    kept = "uuid=6C0F2D4E-0000-4000-8000-000000000001,manufacturer=other"
    assert verdict("qemu", set_={"smbios1": kept}, config=config)[0] is B


# --- the red team's attack, end to end --------------------------------------------------------

ALIASED_ATTACHES = {
    "another guest's disk via volume=": {"scsi5": "volume=local-lvm:vm-500-disk-0"},
    "the host's disk via volume=": {"scsi6": "volume=/dev/sda"},
    "a dir storage volume of guest 500": {"scsi7": "local:500/x.qcow2"},
}


@pytest.mark.parametrize("case", sorted(ALIASED_ATTACHES))
def test_one_operator_key_cannot_attach_a_foreign_volume_by_alias(case: str, fakepve: Any, make_engine: Make,
                                                                  tmp_path: Path) -> None:
    """The red team's attack: the operator role (APPROVAL, one key) proposes and signs a config.disk_attach whose
    volume is spelled with PVE's alias. The gate classes it DESTRUCTIVE: ProposeOp will not build it as an
    attach, and an envelope signed as an attach anyway is refused (its role cannot sign what the write really is);
    nothing reaches Proxmox."""
    add_vm(fakepve, 100)
    add_vm(fakepve, 500, disks=1)
    desk = open_desk(make_engine, tmp_path)
    values = ALIASED_ATTACHES[case]
    with pytest.raises(Refused, match=r"config\.disk_swap"):
        desk.propose(100, "config.disk_attach", set=values)
    swap = json.loads(desk.propose(100, "config.disk_swap", set=values).action)
    forged = Proposal(action={**swap, "kind": "config.disk_attach", "class": "APPROVAL"}, challenge=None)
    before = len(fakepve.requests)
    _, refusal = desk.run(desk.sign(forged, "alice", role="operator"))
    assert refusal is not None and refusal.reason in {"CLASS_MISMATCH", "ROLE_DENIES"}
    assert mutations(fakepve, before) == []
    assert not set(values) & set(fakepve.vm(100).config)


# --- item 3: the scope check reads the declaration with the same grammar -----------------------

def test_row_51_a_planner_cannot_drop_declared_nic_fields(fakepve: Any, make_engine: Make) -> None:
    """The root-owned file declares a NIC with its firewall and VLAN tag; a compromised planner writes the NIC
    without them (MAC kept, so benign by class). The write is out of scope: PVE never receives it."""
    mac = "BC:24:11:00:00:01"
    fakepve.add_vm(100, "web", status="stopped", config={"net0": f"virtio={mac},bridge=vmbr1,firewall=1,tag=10"})
    declared = [Declared(vmid=100, config={"net0": "virtio,bridge=vmbr0,firewall=1,tag=10"})]
    subset = pb.Action(vmid=100, type=pb.GUEST_TYPE_QEMU,
                       set_config=pb.SetConfigAction(set={"net0": f"virtio={mac},bridge=vmbr0"}))
    with scripted_planner([pb.PlanResponse(actions=[subset])]) as target:
        summary = make_engine(declared, planner_target=target).tick(wait=True)
    assert [(r.vmid, r.reason) for r in summary.refusals] == [(100, "OUT_OF_SCOPE")]
    assert mutations(fakepve) == []
    assert fakepve.vm(100).config["net0"].endswith("firewall=1,tag=10")
