"""The plan: minimal, deterministic, touches only what is declared, never data."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from planner.model import GuestType, Plan, SetConfig, SkipReason, Start, Stop
from planner.plan import plan
from planner.v1 import planner_pb2 as pb
from tests.builders import LXC, PAUSED, QEMU, RUNNING, STOPPED, have, want

Q, L = GuestType.QEMU, GuestType.LXC


def test_start_and_stop_follow_desired_run_state() -> None:
    """A stopped guest declared running starts; a running one declared stopped stops."""
    result = plan([want(101, state=RUNNING), want(102, state=STOPPED), want(103, state=RUNNING)],
                  [have(101, state=STOPPED), have(102, kind=LXC, state=RUNNING), have(103, state=RUNNING)])
    assert result.actions == (Start(vmid=101, guest_type=Q), Stop(vmid=102, guest_type=L))
    assert result.skipped == ()


def test_set_config_carries_only_differing_keys_with_digest() -> None:
    """SetConfig names the keys that differ, in PVE's write form, with the digest read."""
    result = plan([want(100, config={"memory": "4096", "cores": "2", "onboot": "true"})],
                  [have(100, config={"memory": "2048", "cores": "2"}, digest="abc")])
    assert result.actions == (
        SetConfig(vmid=100, guest_type=Q, set=(("memory", "4096"), ("onboot", "1")), delete=(), digest="abc"),
    )


def test_blank_desired_value_deletes_the_key() -> None:
    """A blank desired value clears the key with delete, never with an empty string."""
    result = plan([want(100, config={"tags": "", "name": "web"})], [have(100, config={"tags": "old", "name": "web"})])
    assert result.actions == (SetConfig(vmid=100, guest_type=Q, set=(), delete=("tags",), digest="digest-100"),)


def test_description_is_managed_through_set_config() -> None:
    """The description field is written as the description key; its quirks are not drift."""
    result = plan([want(100, description="web tier"), want(101, description="db")],
                  [have(100, config={"description": "web tier\n"}), have(101, config={})])
    assert result.actions == (
        SetConfig(vmid=101, guest_type=Q, set=(("description", "db"),), delete=(), digest="digest-101"),
    )


def test_config_comes_before_run_state_and_vmids_ascend() -> None:
    """Per guest SetConfig precedes Start; guests are in ascending vmid whatever the input order."""
    result = plan([want(300, state=RUNNING, config={"memory": "1024"}), want(200, state=STOPPED)],
                  [have(200), have(300, state=STOPPED, config={"memory": "512"})])
    assert [(type(a).__name__, a.vmid) for a in result.actions] == [("Stop", 200), ("SetConfig", 300), ("Start", 300)]


def test_unmanaged_guests_and_parts_are_untouched() -> None:
    """Guests only in actual, and parts a desired guest leaves unset, produce nothing."""
    result = plan([want(100, config={"memory": "512"})],
                  [have(100, state=STOPPED, config={"memory": "512", "cores": "8"}), have(999, state=STOPPED)])
    assert result == Plan(actions=(), skipped=())


def test_desired_guest_missing_from_actual_is_skipped() -> None:
    """Provisioning is out of scope: a declared guest not on the node is a skip."""
    result = plan([want(100, state=RUNNING)], [])
    assert [(s.vmid, s.reason) for s in result.skipped] == [(100, SkipReason.NOT_FOUND)]
    assert result.actions == ()


def test_locked_guest_is_skipped_with_the_lock_named() -> None:
    """Every write to a locked guest fails: skip it and say which lock."""
    result = plan([want(100, state=RUNNING, config={"memory": "1"})], [have(100, state=STOPPED, lock="backup")])
    assert result.actions == ()
    (skip,) = result.skipped
    assert skip.reason == SkipReason.LOCKED and "backup" in skip.detail


def test_unknown_config_never_gets_set_config() -> None:
    """No SetConfig for a guest whose config could not be read; its run state is still planned."""
    result = plan([want(100, state=RUNNING, config={"memory": "1024"}, description="x")],
                  [have(100, state=STOPPED, known=False)])
    assert result.actions == (Start(vmid=100, guest_type=Q),)
    assert [s.reason for s in result.skipped] == [SkipReason.CONFIG_UNKNOWN]


def test_data_bearing_difference_is_skipped_not_written() -> None:
    """A disk that differs is reported with its keys; the benign keys are still written."""
    result = plan([want(100, config={"scsi0": "local-lvm:vm-100-disk-0,size=64G", "memory": "2048",
                                     "scsi1": "local-lvm:8"})],
                  [have(100, config={"scsi0": "local-lvm:vm-100-disk-0,size=32G", "memory": "1024"})])
    assert result.actions == (SetConfig(vmid=100, guest_type=Q, set=(("memory", "2048"),), delete=(),
                                        digest="digest-100"),)
    (skip,) = result.skipped
    assert skip.reason == SkipReason.DATA_BEARING_KEY and skip.keys == ("scsi0", "scsi1")


def test_paused_and_template_guests_are_not_started() -> None:
    """Start would fail on a paused VM or a template: skip with the reason."""
    result = plan([want(100, state=RUNNING), want(101, state=RUNNING)],
                  [have(100, state=PAUSED), have(101, state=STOPPED, config={"template": "1"})])
    assert result.actions == ()
    assert [(s.vmid, s.reason) for s in result.skipped] == [(100, SkipReason.PAUSED), (101, SkipReason.TEMPLATE)]


def test_paused_guest_declared_stopped_is_stopped() -> None:
    """A paused VM is not stopped: it gets a Stop."""
    assert plan([want(100, state=STOPPED)], [have(100, state=PAUSED)]).actions == (Stop(vmid=100, guest_type=Q),)


def test_write_only_key_is_reported_not_compared() -> None:
    """cipassword reads back as stars: never drift, never written, reported as uncomparable."""
    result = plan([want(100, config={"cipassword": "hunter2"})], [have(100, config={"cipassword": "**********"})])
    assert result.actions == ()
    assert [(s.reason, s.keys) for s in result.skipped] == [(SkipReason.UNCOMPARABLE_KEY, ("cipassword",))]


def test_pending_change_matching_desired_is_not_drift() -> None:
    """actual config is the pending-applied view: a change waiting for reboot is already there."""
    pending_applied = {"memory": "8192", "cores": "4"}
    assert plan([want(100, config={"memory": "8192"})], [have(100, config=pending_applied)]).actions == ()


def test_quirky_round_trip_plans_nothing() -> None:
    """A guest whose every value came back reformatted by PVE has no drift."""
    desired = {"memory": "2048", "cpulimit": "0.5", "onboot": "true", "tags": "Web,db", "ostype": "other",
               "net0": "virtio,bridge=vmbr0,firewall=on", "name": "", "scsi0": "local:vm-100-disk-0,size=1024M"}
    actual = {"memory": "2048.0", "cpulimit": ".5", "onboot": "1", "tags": "db;web", "name": " ",
              "net0": "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1", "scsi0": "local:vm-100-disk-0,size=1G"}
    assert plan([want(100, config=desired, description="x\r\n")],
                [have(100, config={**actual, "description": "x\n"})]) == Plan(actions=(), skipped=())


def test_property_strings_are_written_merged_over_actual() -> None:
    """A changed NIC keeps its MAC and flags in the SetConfig itself (PVE replaces the whole value and draws
    a new MAC when none is sent); an absent key is written as declared; an LXC NIC keeps its hwaddr."""
    result = plan(
        [want(100, config={"net0": "e1000,bridge=vmbr1", "net1": "virtio,bridge=vmbr2", "cpu": "host",
                           "agent": "enabled=1", "startup": "order=2", "ipconfig0": "ip=10.0.0.5/24,gw=10.0.0.1"}),
         want(101, config={"net0": "name=eth0,bridge=vmbr1"})],
        [have(100, config={"net0": "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1", "cpu": "kvm64,flags=+aes",
                           "agent": "0,fstrim_cloned_disks=1", "startup": "order=1,up=30",
                           "ipconfig0": "ip=dhcp,ip6=auto"}),
         have(101, kind=LXC, config={"net0": "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth"})])
    assert result.actions == (
        SetConfig(vmid=100, guest_type=Q, delete=(), digest="digest-100", set=(
            ("agent", "1,fstrim_cloned_disks=1"), ("cpu", "host,flags=+aes"),
            ("ipconfig0", "ip=10.0.0.5/24,ip6=auto,gw=10.0.0.1"),
            ("net0", "e1000=BC:24:11:AA:BB:CC,bridge=vmbr1,firewall=1"), ("net1", "virtio,bridge=vmbr2"),
            ("startup", "order=2,up=30"))),
        SetConfig(vmid=101, guest_type=L, delete=(), digest="digest-101", set=(
            ("net0", "name=eth0,bridge=vmbr1,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth"),)),
    )


def test_nic_write_drops_only_what_desired_pins_to_zero_and_takes_a_pinned_mac() -> None:
    """firewall=0 removes the flag; a MAC the desired value pins replaces the actual one."""
    nic = "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1"
    result = plan([want(100, config={"net0": "virtio,bridge=vmbr0,firewall=0",
                                     "net1": "virtio=BC:24:11:00:00:01,bridge=vmbr0"})],
                  [have(100, config={"net0": nic, "net1": nic})])
    assert result.actions == (SetConfig(vmid=100, guest_type=Q, delete=(), digest="digest-100", set=(
        ("net0", "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0"),
        ("net1", "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1"))),)


# --- properties -------------------------------------------------------------------------------

VALUES = {
    "memory": ["512", "2048", "4096.0"], "cores": ["1", "2", "4"], "onboot": ["0", "1", "true", "off", ""],
    "tags": ["a;b", "b,a", "web", ""], "name": ["web", "db", "", " "],
    "net0": ["virtio,bridge=vmbr0", "virtio=BC:24:11:00:00:01,bridge=vmbr0", "e1000,bridge=vmbr1"],
    "cpulimit": ["0", "0.5", ".5"], "scsi0": ["local:1,size=1G", "local:1,size=1024M", "local:2"],
}
configs = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in VALUES.items()})
descriptions = st.none() | st.sampled_from(["x", "x\n", "y", ""])
states = st.sampled_from([RUNNING, STOPPED, PAUSED])


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[list[pb.DesiredGuest], list[pb.ActualGuest]]:
    vmids = draw(st.lists(st.integers(100, 140), unique=True, max_size=12))
    desired, actual = [], []
    for vmid in vmids:
        role = draw(st.sampled_from(["both", "both", "desired", "actual"]))
        if role != "actual":
            desired.append(want(vmid, state=draw(st.none() | st.sampled_from([RUNNING, STOPPED])),
                                config=draw(st.none() | configs), description=draw(descriptions)))
        if role != "desired":
            config = draw(configs)
            if (description := draw(descriptions)) is not None:
                config["description"] = description
            actual.append(have(vmid, kind=draw(st.sampled_from([QEMU, LXC])), state=draw(states), config=config,
                               known=draw(st.booleans()),
                               lock=draw(st.sampled_from(["", "", "", "backup"]))))
    return desired, actual


def _apply(actual: list[pb.ActualGuest], result: Plan) -> list[pb.ActualGuest]:
    """What the node looks like after the plan's actions succeed."""
    out = [pb.ActualGuest.FromString(a.SerializeToString()) for a in actual]
    by_vmid = {a.vmid: a for a in out}
    for action in result.actions:
        guest = by_vmid[action.vmid]
        match action:
            case SetConfig():
                guest.config.update(action.set)
                for key in action.delete:
                    del guest.config[key]
            case Start():
                guest.run_state = RUNNING
            case Stop():
                guest.run_state = STOPPED
    return out


@settings(max_examples=300)
@given(snapshots(), st.randoms())
def test_plan_is_deterministic_whatever_the_input_order(snap: tuple[list[pb.DesiredGuest], list[pb.ActualGuest]],
                                                         rnd: random.Random) -> None:
    """The same snapshots in any order give the same plan."""
    desired, actual = snap
    shuffled_d, shuffled_a = desired[:], actual[:]
    rnd.shuffle(shuffled_d)
    rnd.shuffle(shuffled_a)
    assert plan(desired, actual) == plan(shuffled_d, shuffled_a)


@settings(max_examples=300)
@given(snapshots())
def test_applying_the_plan_converges(snap: tuple[list[pb.DesiredGuest], list[pb.ActualGuest]]) -> None:
    """After the plan's actions, re-planning yields no SetConfig and no power action."""
    desired, actual = snap
    first = plan(desired, actual)
    assert plan(desired, _apply(actual, first)).actions == ()


@settings(max_examples=300)
@given(snapshots())
def test_actions_only_touch_declared_guests_and_keys(snap: tuple[list[pb.DesiredGuest], list[pb.ActualGuest]]) -> None:
    """Every action is for a declared guest, on a managed part, never on a data-bearing key."""
    desired, actual = snap
    by_vmid = {d.vmid: d for d in desired}
    for action in plan(desired, actual).actions:
        guest = by_vmid[action.vmid]
        if isinstance(action, SetConfig):
            managed = set(guest.spec.config) | ({"description"} if guest.HasField("description") else set())
            written = {k for k, _ in action.set} | set(action.delete)
            assert written <= managed and "scsi0" not in written
        else:
            assert guest.HasField("run_state")
