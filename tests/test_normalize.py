"""Normalizers: every PVE round-trip quirk compares equal; real differences do not."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from planner.model import GuestType
from planner.normalize import (
    DEFAULT_REGISTRY,
    NIC_MODELS,
    PropertyString,
    canon_description,
    canon_inner,
    canon_number,
    canon_size,
    raw_fields,
    rule,
    text,
)

Q, L = GuestType.QEMU, GuestType.LXC


def same(kind: GuestType, key: str, desired: str, actual: str | None) -> bool:
    return DEFAULT_REGISTRY.lookup(kind, key).same(desired, actual)


@pytest.mark.parametrize(
    ("kind", "desired", "actual"),
    [
        (Q, "web tier", "web tier\n"),  # LXC-style trailing newline
        (L, "line one\nline two", "line one\nline two\n"),
        (Q, "a\r\nb", "a\nb"),  # CRLF becomes LF
        (Q, "notes   \n\n", "notes"),  # QEMU strips trailing whitespace
    ],
)
def test_description_quirks_are_not_drift(kind: GuestType, desired: str, actual: str) -> None:
    """A description PVE reformatted reads back as the same description."""
    assert same(kind, "description", desired, actual)


def test_description_text_change_is_drift() -> None:
    """Changing the words of a description is drift."""
    assert not same(Q, "description", "web tier", "db tier")
    assert not same(Q, "description", "a\nb", "a b")


@pytest.mark.parametrize(
    ("kind", "key", "desired", "actual"),
    [
        (Q, "memory", "2048", "2048"),
        (Q, "cpulimit", "0.5", ".5"),
        (Q, "cpulimit", "0.50", "0.5"),
        (Q, "cores", "2", "2.0"),
        (L, "swap", "512", None),  # absent means the default
        (Q, "sockets", "1", None),
        (Q, "memory", "4096", "current=4096"),  # PVE 9 writes memory as a property string
    ],
)
def test_numbers_compare_by_value(kind: GuestType, key: str, desired: str, actual: str | None) -> None:
    """Numbers that come back as other spellings, or as an omitted default, are equal."""
    assert same(kind, key, desired, actual)


def test_numbers_differ_by_value() -> None:
    """A different number is drift."""
    assert not same(Q, "memory", "4096", "2048")
    assert not same(Q, "cores", "2", None)


@pytest.mark.parametrize(
    ("desired", "actual"),
    [("1", "1"), ("true", "1"), ("on", "1"), ("yes", "1"), ("0", "0"), ("false", None), ("off", "0")],
)
def test_booleans_compare_as_pve_parses_them(desired: str, actual: str | None) -> None:
    """PVE's boolean spellings are one value; absent is the default (onboot: 0)."""
    assert same(Q, "onboot", desired, actual)


def test_boolean_is_written_as_one_or_zero() -> None:
    """PVE refuses True on a write: booleans go out as 1/0."""
    assert DEFAULT_REGISTRY.lookup(Q, "onboot").write("true", "0") == "1"
    assert DEFAULT_REGISTRY.lookup(L, "protection").write("off", None) == "0"
    assert not same(Q, "onboot", "1", "0")
    assert same(Q, "acpi", "1", None)  # acpi defaults on


@pytest.mark.parametrize(("desired", "actual"), [("web,Prod", "prod;web"), ("a b a", "a;b"), ("x;y", "y;x")])
def test_tags_compare_as_a_set(desired: str, actual: str) -> None:
    """Tags come back lowercased, deduplicated, sorted and ';'-joined."""
    assert same(Q, "tags", desired, actual)


def test_tags_are_written_semicolon_joined() -> None:
    """Tags are written as PVE stores them."""
    assert DEFAULT_REGISTRY.lookup(Q, "tags").write("web,db web", "old") == "db;web"
    assert not same(Q, "tags", "web", "web;db")


@pytest.mark.parametrize(("key", "actual"), [("name", " "), ("name", ""), ("name", None), ("ostype", " ")])
def test_blank_equals_absent(key: str, actual: str | None) -> None:
    """An emptied value reads back as '' or ' ', which both mean absent."""
    assert same(L, key, "", actual)


@pytest.mark.parametrize(
    ("kind", "key", "default"),
    [(Q, "ostype", "other"), (Q, "scsihw", "lsi"), (Q, "cpu", "kvm64"), (L, "arch", "amd64"), (Q, "bios", "seabios")],
)
def test_omitted_defaults_equal_their_value(kind: GuestType, key: str, default: str) -> None:
    """PVE omits keys at their default; declaring the default is not drift."""
    assert same(kind, key, default, None)
    assert not same(kind, key, default + "x", None)


@pytest.mark.parametrize(
    ("kind", "key", "desired", "actual"),
    [
        (Q, "net0", "virtio,bridge=vmbr0", "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0,firewall=1"),
        (Q, "net0", "bridge=vmbr0,virtio=bc:24:11:2a:3b:4c", "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0"),
        (Q, "net0", "model=virtio,bridge=vmbr0,firewall=on", "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0,firewall=1"),
        (Q, "net0", "virtio,bridge=vmbr0,link_down=0", "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0"),
        (L, "net0", "name=eth0,bridge=vmbr0,ip=dhcp",
         "bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,name=eth0,type=veth"),
        (Q, "agent", "enabled=1", "1"),
        (Q, "cpu", "host", "cputype=host"),
        (L, "features", "nesting=1,keyctl=on", "keyctl=1,nesting=1"),
        (Q, "smbios1", "manufacturer=acme", "uuid=7b1c5e8e-1f4f-4c1e-9a55-6f5c1e2d3a4b,manufacturer=acme"),
        (Q, "agent", "1,freeze-fs-on-backup=1", "1"),  # a field on by default, omitted
        (Q, "hostpci0", "0000:01:00.0,rombar=on", "0000:01:00.0,pcie=1"),
    ],
)
def test_property_strings_compare_pinned_fields(kind: GuestType, key: str, desired: str, actual: str) -> None:
    """Reordered keys, generated MACs, 'on' written as 1 and unpinned fields are not drift."""
    assert same(kind, key, desired, actual)


@pytest.mark.parametrize(
    ("key", "desired", "actual"),
    [
        ("net0", "virtio,bridge=vmbr1", "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0"),
        ("net0", "e1000,bridge=vmbr0", "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0"),
        ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0", "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0"),
        ("net0", "virtio,bridge=vmbr0,firewall=1", "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0"),
        ("net1", "virtio,bridge=vmbr0", None),
        ("agent", "1,freeze-fs-on-backup=0", "1"),  # omitted means on: pinning it off is a change
        ("hostpci0", "0000:01:00.0,rombar=0", "0000:01:00.0"),
        ("scsi0", "local:vm-100-disk-0,backup=0", "local:vm-100-disk-0"),
    ],
)
def test_property_string_pinned_field_change_is_drift(key: str, desired: str, actual: str | None) -> None:
    """A field the desired value pins, with another value, is drift."""
    assert not same(Q, key, desired, actual)


@pytest.mark.parametrize(("a", "b"), [("1024M", "1G"), ("1T", "1024G"), ("512K", "524288"), ("1.5G", "1536M")])
def test_sizes_compare_in_bytes(a: str, b: str) -> None:
    """1024M comes back as 1G: sizes are compared in bytes."""
    assert canon_size(a) == canon_size(b)
    assert same(Q, "scsi0", f"local-lvm:vm-100-disk-0,size={a}", f"local-lvm:vm-100-disk-0,size={b}")


def test_disks_are_data_bearing() -> None:
    """Disks and volumes are flagged data-bearing on both guest types."""
    for kind, key in [(Q, "scsi0"), (Q, "virtio3"), (Q, "efidisk0"), (Q, "tpmstate0"), (L, "rootfs"), (L, "mp2"),
                      (Q, "unused0"), (L, "unused1"), (Q, "ide2"), (Q, "sata1")]:
        assert DEFAULT_REGISTRY.lookup(kind, key).data_bearing, key
    assert not DEFAULT_REGISTRY.lookup(Q, "net0").data_bearing


def test_write_only_and_generated_keys_are_not_compared() -> None:
    """cipassword reads back as stars and vmgenid is generated: never compared."""
    assert not DEFAULT_REGISTRY.lookup(Q, "cipassword").comparable
    assert not DEFAULT_REGISTRY.lookup(Q, "vmgenid").comparable


def test_registry_takes_new_quirks_without_touching_the_plan() -> None:
    """A new rule added to the registry overrides the built-in one for its keys only."""
    registry = DEFAULT_REGISTRY.extended([rule("hookscript", frozenset({Q}), PropertyString(default_key="path"))])
    assert registry.lookup(Q, "hookscript").same("local:snippets/a.sh", "path=local:snippets/a.sh")
    assert not DEFAULT_REGISTRY.lookup(Q, "hookscript").same("local:snippets/a.sh", "path=local:snippets/a.sh")
    assert registry.lookup(L, "hookscript") == text()


@given(st.decimals(allow_nan=False, allow_infinity=False, places=4))
def test_number_spellings_are_one_value(value: object) -> None:
    """Any decimal and its spellings (trailing zeros, surrounding space) canonicalize alike."""
    spelled = str(value)
    assert canon_number(spelled) == canon_number(f" {spelled}0 " if "." in spelled else f" {spelled} ")


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00\r")))
def test_description_canonical_form_is_stable(value: str) -> None:
    """Canonicalizing twice changes nothing, and PVE's trailing newline never matters."""
    once = canon_description(value)
    assert canon_description(once) == once
    assert canon_description(value + "\n") == once
    assert canon_description(value.replace("\n", "\r\n")) == once


@given(st.lists(st.sampled_from(["web", "Web", "db", "prod", "a-b", "x_1"]), min_size=1),
       st.sampled_from([",", ";", " "]))
def test_written_tags_read_back_equal(tags: list[str], sep: str) -> None:
    """Whatever the separator and case, the written form compares equal to the declared one."""
    rule_ = DEFAULT_REGISTRY.lookup(Q, "tags")
    declared = sep.join(tags)
    assert rule_.same(declared, rule_.write(declared, None))
    assert rule_.same(declared, rule_.write(declared, "x").lower())


# --- writes: the merge over actual ------------------------------------------------------------

MAC = "BC:24:11:AA:BB:CC"
NIC = f"virtio={MAC},bridge=vmbr0,firewall=1"
LXC_NIC = "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth"


def write(kind: GuestType, key: str, desired: str, actual: str | None) -> str:
    return DEFAULT_REGISTRY.lookup(kind, key).write(desired, actual)


@pytest.mark.parametrize(
    ("kind", "key", "desired", "actual", "written"),
    [
        (Q, "net0", "virtio,bridge=vmbr1", NIC, f"virtio={MAC},bridge=vmbr1,firewall=1"),
        (Q, "net0", "e1000,bridge=vmbr0", NIC, f"e1000={MAC},bridge=vmbr0,firewall=1"),
        (Q, "net0", "model=E1000", NIC, f"e1000={MAC},bridge=vmbr0,firewall=1"),
        (Q, "net0", "virtio,bridge=vmbr0,tag=20,mtu=1400", NIC,
         f"virtio={MAC},bridge=vmbr0,firewall=1,tag=20,mtu=1400"),
        (L, "net0", "name=eth0,bridge=vmbr1,ip=dhcp", LXC_NIC,
         "name=eth0,bridge=vmbr1,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth"),
        (L, "net0", "ip=10.0.0.5/24,gw=10.0.0.1", LXC_NIC,
         "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=10.0.0.5/24,type=veth,gw=10.0.0.1"),
    ],
)
def test_nic_write_keeps_the_mac_and_unpinned_fields(kind: GuestType, key: str, desired: str, actual: str,
                                                     written: str) -> None:
    """PVE replaces a whole netN and draws a new MAC when none is sent: the write carries actual's MAC and flags."""
    assert write(kind, key, desired, actual) == written


@pytest.mark.parametrize(
    ("kind", "desired", "actual", "written"),
    [
        (Q, "virtio=BC:24:11:00:00:01,bridge=vmbr0", NIC, "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1"),
        (Q, "bridge=vmbr0,macaddr=BC:24:11:00:00:02", NIC, "virtio=BC:24:11:00:00:02,bridge=vmbr0,firewall=1"),
        (Q, "e1000=BC:24:11:00:00:03", NIC, "e1000=BC:24:11:00:00:03,bridge=vmbr0,firewall=1"),
        (L, "hwaddr=BC:24:11:00:00:04,bridge=vmbr2", LXC_NIC,
         "name=eth0,bridge=vmbr2,hwaddr=BC:24:11:00:00:04,ip=dhcp,type=veth"),
    ],
)
def test_a_pinned_mac_wins(kind: GuestType, desired: str, actual: str, written: str) -> None:
    """A MAC the desired value pins (model=MAC, macaddr=, hwaddr=) replaces the actual one."""
    assert write(kind, "net0", desired, actual) == written


@pytest.mark.parametrize(
    ("kind", "key", "desired", "actual", "written"),
    [
        (Q, "net0", "virtio,bridge=vmbr0,firewall=0", NIC, f"virtio={MAC},bridge=vmbr0"),
        (Q, "net0", "virtio,firewall=off,tag=", f"{NIC},tag=20", f"virtio={MAC},bridge=vmbr0"),
        (Q, "ipconfig0", "ip6=", "ip=dhcp,ip6=auto", "ip=dhcp"),
        (L, "net0", "firewall=0,bridge=vmbr1", "name=eth0,bridge=vmbr0,firewall=1,hwaddr=BC:24:11:00:00:01",
         "name=eth0,bridge=vmbr1,hwaddr=BC:24:11:00:00:01"),
    ],
)
def test_a_field_pinned_to_its_zero_is_removed(kind: GuestType, key: str, desired: str, actual: str,
                                                written: str) -> None:
    """Pinning a field to 0 or blank is the one way the write drops an actual field."""
    assert write(kind, key, desired, actual) == written


@pytest.mark.parametrize(
    ("key", "desired", "actual", "written"),
    [
        ("cpu", "host", "x86-64-v2-AES,flags=+aes", "host,flags=+aes"),
        ("cpu", "cputype=host,hidden=1", "kvm64,flags=+pcid", "host,flags=+pcid,hidden=1"),
        ("cpu", "flags=+aes", "cputype=host", "cputype=host,flags=+aes"),
        ("agent", "1", "0,fstrim_cloned_disks=1", "1,fstrim_cloned_disks=1"),
        ("agent", "enabled=1", "fstrim_cloned_disks=1", "1,fstrim_cloned_disks=1"),
        ("agent", "1,freeze-fs-on-backup=0", "1,fstrim_cloned_disks=1",
         "1,fstrim_cloned_disks=1,freeze-fs-on-backup=0"),
        ("startup", "order=2", "order=1,up=30,down=60", "order=2,up=30,down=60"),
        ("startup", "3", "order=1,up=30", "order=3,up=30"),
        ("startup", "order=2,up=10", "down=5", "down=5,order=2,up=10"),  # PVE writes startup's order keyed
        ("ipconfig0", "ip=10.0.0.5/24,gw=10.0.0.1", "ip=dhcp,ip6=auto", "ip=10.0.0.5/24,ip6=auto,gw=10.0.0.1"),
        ("hostpci0", "0000:02:00.0,rombar=0", "0000:01:00.0,pcie=1", "0000:02:00.0,pcie=1,rombar=0"),
    ],
)
def test_property_string_write_merges_over_actual(key: str, desired: str, actual: str, written: str) -> None:
    """Every property string is written whole: actual's fields stay, the pinned ones are laid over them.

    The default key's bare value comes first where PVE writes it bare; a spelling actual uses is kept.
    A field whose omission means on (freeze-fs-on-backup, rombar) is written as 0, never dropped.
    """
    assert write(Q, key, desired, actual) == written


@pytest.mark.parametrize(
    ("kind", "key", "desired", "actual"),
    [(Q, "net0", "virtio,bridge=vmbr1", None), (L, "net0", "name=eth0,bridge=vmbr1", " "), (Q, "cpu", "host", "")],
)
def test_property_string_without_actual_is_written_as_declared(kind: GuestType, key: str, desired: str,
                                                                 actual: str | None) -> None:
    """With nothing to merge with (a new NIC, an absent key), the declared value is the write."""
    assert write(kind, key, desired, actual) == desired
    assert DEFAULT_REGISTRY.lookup(kind, key).write(desired, "x=1") != desired  # ...and only then


MERGE_RULES = [(Q, "net0"), (L, "net0"), (Q, "cpu"), (Q, "agent"), (Q, "startup"), (Q, "ipconfig0"),
               (L, "features"), (Q, "hostpci0"), (Q, "memory")]
FIELD_NAMES = ["bridge", "firewall", "tag", "ip", "gw", "flags", "hidden", "up", "down", "fstrim_cloned_disks",
               "freeze-fs-on-backup", "rombar", "hwaddr", "name", "x-1"]
field_values = st.sampled_from(["0", "1", "on", "off", "", "vmbr0", "10", "10.0", "BC:24:11:00:00:01",
                                "bc:24:11:00:00:01", "+aes;-pcid", "a=b"]) | st.text("abxyz019.:/+-", max_size=6)
bare_values = st.sampled_from(["0", "1", "host", "kvm64", "2048", "0000:01:00.0"]) | st.text("abz19.:", min_size=1,
                                                                                             max_size=5)
macs = st.sampled_from(["BC:24:11:00:00:01", "bc:24:11:00:00:02", "02:00:00:00:00:03"])


@st.composite
def heads(draw: st.DrawFn, default_key: str | None, nic: bool, pinning: bool) -> list[str]:
    """The default key's token(s): a NIC's model and MAC in any accepted spelling, or a bare/keyed default."""
    if nic:
        model = draw(st.sampled_from(sorted(NIC_MODELS)))
        spelled = draw(st.sampled_from(["bare", "mac", "keys", "none"] if pinning else ["bare", "mac", "keys"]))
        return {"bare": [model], "mac": [f"{model}={draw(macs)}"], "none": [],
                "keys": [f"model={model}", f"macaddr={draw(macs)}"]}[spelled]
    if default_key is None or not draw(st.booleans()):
        return []
    value = draw(bare_values)
    return [value] if draw(st.booleans()) else [f"{default_key}={value}"]


@st.composite
def merges(draw: st.DrawFn) -> tuple[PropertyString, str, str]:
    """A property-string rule, a desired value pinning some fields, and an actual value."""
    kind, key = draw(st.sampled_from(MERGE_RULES))
    rule_ = DEFAULT_REGISTRY.lookup(kind, key)
    assert isinstance(rule_, PropertyString)
    strings = []
    for pinning in (True, False):
        fields = draw(st.dictionaries(st.sampled_from(FIELD_NAMES), field_values, max_size=4))
        tokens = [*draw(heads(rule_.default_key, rule_.nic, pinning)), *(f"{k}={v}" for k, v in fields.items())]
        strings.append(",".join(draw(st.permutations(tokens)) if pinning else tokens))
    desired, actual = strings
    assume(raw_fields(desired, rule_.default_key, rule_.nic) and actual)
    return rule_, desired, actual


@settings(max_examples=500)
@given(merges())
def test_written_value_satisfies_desired_and_keeps_every_unpinned_field(case: tuple[PropertyString, str, str]) -> None:
    """The write reads back equal to desired, and no actual field the desired value leaves alone is lost."""
    rule_, desired, actual = case
    written = rule_.write(desired, actual)
    assert rule_.same(desired, written)
    have, out = (raw_fields(v, rule_.default_key, rule_.nic) for v in (actual, written))
    pinned_ = raw_fields(desired, rule_.default_key, rule_.nic)
    for name, value in have.items():
        if name not in pinned_:
            assert name in out and canon_inner(name, out[name]) == canon_inner(name, value), name
