"""Normalizers: every PVE round-trip quirk compares equal; real differences do not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from planner.model import GuestType
from planner.normalize import (
    DEFAULT_REGISTRY,
    PropertyString,
    canon_description,
    canon_number,
    canon_size,
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
    assert DEFAULT_REGISTRY.lookup(Q, "onboot").write("true") == "1"
    assert DEFAULT_REGISTRY.lookup(L, "protection").write("off") == "0"
    assert not same(Q, "onboot", "1", "0")
    assert same(Q, "acpi", "1", None)  # acpi defaults on


@pytest.mark.parametrize(("desired", "actual"), [("web,Prod", "prod;web"), ("a b a", "a;b"), ("x;y", "y;x")])
def test_tags_compare_as_a_set(desired: str, actual: str) -> None:
    """Tags come back lowercased, deduplicated, sorted and ';'-joined."""
    assert same(Q, "tags", desired, actual)


def test_tags_are_written_semicolon_joined() -> None:
    """Tags are written as PVE stores them."""
    assert DEFAULT_REGISTRY.lookup(Q, "tags").write("web,db web") == "db;web"
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
    assert rule_.same(declared, rule_.write(declared))
    assert rule_.same(declared, rule_.write(declared).lower())
