"""The desired-state file: a mistake named by file, line and field; values as PVE's text; a broken edit ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from desiredfile.configschema import GUEST_TYPES, key_problem
from executor.loop.desired import Declared, DesiredStateError, FileProvider, check_types, parse
from safety.grammar import key_spec


@pytest.mark.parametrize(("text", "message"), [
    ("guests:\n  - vmid: 100\n    colour: blue\n", "f:3: colour: unknown key"),
    ("guests:\n  - vmid: 100\n    state: paused\n", "f:3: state: must be running or stopped"),
    ("guests:\n  - vmid: 100\n  - vmid: 100\n", "f:3: vmid: duplicate vmid 100 (first at line 2)"),
    ("guests:\n  - vmid: web\n", "f:2: vmid: must be an integer"),
    ("guests:\n  - vmid: 1.5\n", "f:2: vmid: must be an integer"),
    ("guests:\n  - state: running\n", "f:2: vmid: required"),
    ("guests:\n  - vmid: 100\n    config: {Memory: 1}\n", "f:3: config.Memory: not a PVE config key"),
    ("guests:\n  - vmid: 100\n    config: [memory]\n", "f:3: config: must be a mapping"),
    ("hosts: []\n", "f:1: unknown key 'hosts'"),
    ("guests: [\n", "f:2: not valid YAML"),
    ("guests:\n  - vmid: 100\n    description: \"a\\0b\"\n", "f:3: description: holds a NUL or is longer than"),
    (f"guests:\n  - vmid: 100\n    description: {'x' * 8193}\n", "f:3: description: holds a NUL or is longer than"),
])
def test_desired_file_errors_name_file_line_and_field(text: str, message: str) -> None:
    """Every mistake in the desired file is refused with where it is and what is wrong."""
    with pytest.raises(DesiredStateError) as info:
        parse(text, "f")
    assert str(info.value).startswith(message)


def test_desired_file_values_become_pve_text() -> None:
    """YAML booleans are written 1/0 (PVE refuses True), numbers as text, null as a delete."""
    (guest,) = parse("guests:\n  - vmid: 100\n    state: running\n    description: web tier\n"
                     "    config: {memory: 4096, onboot: true, agent: false, tags: ~}\n")
    assert guest == Declared(vmid=100, state="running", description="web tier",
                             config={"memory": "4096", "onboot": "1", "agent": "0", "tags": ""})
    assert parse("") == [] and parse("guests:\n") == []


def test_bad_reload_keeps_the_last_good_state(tmp_path: Path) -> None:
    """An edit that breaks the file is logged and ignored; fixing it is picked up."""
    path = tmp_path / "desired.yaml"
    path.write_text("guests:\n  - vmid: 100\n    state: running\n")
    provider = FileProvider(path)
    path.write_text("guests:\n  - vmid: 100\n    state: runing\n")
    with capture_logs() as logs:
        assert provider.desired() == [Declared(vmid=100, state="running")]
    assert logs[0]["event"] == "desired_reload_failed" and "runing" in logs[0]["error"]
    path.write_text("guests:\n  - vmid: 100\n    state: stopped\n    # now valid\n")
    assert provider.desired() == [Declared(vmid=100, state="stopped")]


# --- checked against PVE's schema (issue 15) -----------------------------------------------------------

@pytest.mark.parametrize(("config", "message"), [
    ("memroy: 1024", "config.memroy: not a Proxmox config key; did you mean `memory`?"),
    ("netx0: 'virtio,bridge=vmbr0'", "config.netx0: not a Proxmox config key; did you mean `net0`?"),
    ("colour: blue", "config.colour: not a Proxmox config key"),
    ("memory: lots", "config.memory: must be an integer (at least 16), got 'lots'"),
    ("memory: 8", "config.memory: must be at least 16, got 8"),
    ("cores: 0", "config.cores: must be at least 1, got 0"),
    ("onboot: maybe", "config.onboot: must be a boolean (true/false, 1/0), got 'maybe'"),
    ("ostype: windows", "config.ostype: must be one of "),
    ("net0: 'virtio,bridg=vmbr0'", "config.net0: not a value PVE reads: unknown field 'bridg'"),
    ("digest: 0123abcd", "config.digest: reserved: a parameter of PVE's config write, not a config key"),
    ("delete: memory", "config.delete: reserved: a parameter of PVE's config write"),
    ("revert: memory", "config.revert: reserved: a parameter of PVE's config write"),
    ("skiplock: 1", "config.skiplock: reserved: a parameter of PVE's config write"),
    ("node: pve1", "config.node: reserved: a parameter of PVE's config write"),
    ("vmid: 100", "config.vmid: reserved: a parameter of PVE's config write, not a config key (the guest's vmid"),
    ("vmstate: 'local:vmstate'", "config.vmstate: read-only: PVE sets it and no write takes it"),
    ("description: web", "config.description: declare it as the guest's `description:`"),
])
def test_config_is_checked_against_pves_schema(tmp_path: Path, config: str, message: str) -> None:
    """A key PVE does not have, a value of the wrong type or range, a reserved parameter: refused with file:line."""
    path = tmp_path / "desired.yaml"
    path.write_text(f"guests:\n  - vmid: 100\n    state: running\n    config:\n      {config}\n")
    with pytest.raises(DesiredStateError) as info:
        FileProvider(path)
    assert str(info.value).startswith(f"{path}:5: {message}"), str(info.value)


def test_every_mistake_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    """Three guests, four mistakes: all four, each with its line, in the order of the file."""
    path = tmp_path / "desired.yaml"
    path.write_text("guests:\n  - vmid: 100\n    state: runing\n    config:\n      memory: lots\n"
                    "  - vmid: 101\n    config: {cores: 2, digest: abc}\n  - vmid: 102\n    stat: running\n")
    with pytest.raises(DesiredStateError) as info:
        FileProvider(path)
    assert str(info.value).splitlines() == [
        f"{path}:3: state: must be running or stopped, got 'runing'",
        f"{path}:5: config.memory: must be an integer (at least 16), got 'lots'",
        f"{path}:7: config.digest: reserved: a parameter of PVE's config write, not a config key "
        "(the executor conditions each write on the digest it read)",
        f"{path}:9: stat: unknown key (expected one of config, description, state, vmid); did you mean `state`?"]


def test_values_pve_takes_pass_the_schema() -> None:
    """Property strings, sizes, booleans, deletes and keys of either guest type are accepted as PVE takes them."""
    (qemu, lxc) = parse("guests:\n  - vmid: 100\n    config:\n"
                        "      memory: 4096\n      cores: 4\n      onboot: true\n      agent: 1\n      tags: ~\n"
                        "      net0: 'virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1'\n      cpu: host\n"
                        "      scsi0: 'local-lvm:vm-100-disk-0,size=32G'\n      cdrom: none\n      cpulimit: 1.5\n"
                        "  - vmid: 101\n    config: {hostname: cache, swap: 0, rootfs: 'local-lvm:subvol-101-disk-0,"
                        "size=8G', features: 'nesting=1', unprivileged: 1}\n")
    assert qemu.config is not None and qemu.config["memory"] == "4096" and qemu.config["tags"] == ""
    assert lxc.config is not None and lxc.config["features"] == "nesting=1"


def test_a_key_the_guests_type_does_not_take_is_named_with_its_line() -> None:
    """`agent` is a QEMU key: on a container the node reports, it is refused at the line it was declared."""
    declared = parse("guests:\n  - vmid: 100\n    config:\n      agent: 1\n  - vmid: 101\n    config:\n"
                     "      agent: 1\n      cpulimit: 200\n", "d.yaml")
    check_types(declared, {100: "qemu"})  # a QEMU guest takes it; a guest not on this node is not checked
    with pytest.raises(DesiredStateError) as info:
        check_types(declared, {100: "qemu", 101: "lxc"})
    assert str(info.value).splitlines() == [
        "d.yaml:7: config.agent: not a Proxmox config key of a lxc guest (guest 101 is lxc)"]
    with pytest.raises(DesiredStateError) as info:
        check_types(declared, {101: "qemu"})
    assert str(info.value) == "d.yaml:8: config.cpulimit: must be from 0 to 128, got 200 (guest 101 is qemu)"


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-10**12, max_value=10**12))
def test_an_integer_key_takes_exactly_its_range(number: int) -> None:
    """`cores` takes an integer of at least 1 (QEMU: no maximum; LXC: at most 8192), nothing else."""
    assert (key_problem(("qemu",), "cores", str(number)) is None) == (number >= 1)
    assert (key_problem(("lxc",), "cores", str(number)) is None) == (1 <= number <= 8192)


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True))
def test_a_key_is_known_exactly_when_pves_schema_has_it(key: str) -> None:
    """Every name either is a key of PVE's schema or is answered "not a Proxmox config key"."""
    problem = key_problem(GUEST_TYPES, key, "")
    known = any(key_spec(t, key) is not None for t in GUEST_TYPES)
    assert known == (problem is None or not problem.startswith("not a Proxmox config key"))
