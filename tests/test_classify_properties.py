"""Classifier properties: a config write is as strict as its strictest key, provenance and facts only
raise, and nothing the planner calls data-bearing is ever benign to overwrite or delete."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from planner.model import GuestType
from planner.normalize import DEFAULT_REGISTRY
from safety.classify import KIND_RULES, Action, Class, GuestFacts, Source, classify

KEYS = ["memory", "cores", "name", "hostname", "description", "net0", "net1", "scsi0", "scsi1", "efidisk0", "rootfs",
        "mp0", "mp1", "unused0", "vmstate", "hookscript", "args", "protection", "template", "hostpci0", "usb0",
        "serial0", "dev0", "cicustom", "lxc.apparmor.profile", "SCSI0", ""]
VALUES = ["1", "0", "", " ", "local-lvm:vm-100-disk-0,size=32G", "local-lvm:vm-100-disk-0,cache=unsafe", "local-lvm:32",
          "virtio=BC:24:11:00:00:01,bridge=vmbr0", "e1000,bridge=vmbr1", "name=eth0,hwaddr=BC:24:11:00:00:02",
          "name=eth0,bridge=vmbr1", "socket", "spice", "file=a,b", "x"]

configs = st.none() | st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=8)
guest_types = st.sampled_from(["qemu", "lxc"])
writes = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=6)
deletes = st.lists(st.sampled_from(KEYS), max_size=4, unique=True).map(tuple)
kinds = st.sampled_from(sorted(KIND_RULES)) | st.text(max_size=12)
params = st.dictionaries(st.sampled_from(["delete", "target-vmid", "destroy_unreferenced_disks", "purge", "size"]),
                         st.one_of(st.booleans(), st.integers(-1, 200), st.sampled_from(["1", "0", "+2G", ""])),
                         max_size=3)




@st.composite
def actions(draw: st.DrawFn, kinds: st.SearchStrategy[str] = kinds) -> Action:
    """Any action: a known or random kind, carrying config keys and parameters."""
    return Action(kind=draw(kinds), vmid=100, guest_type=draw(guest_types), set=draw(writes), delete=draw(deletes),
                  params=draw(params))


@given(actions(st.just("set_config")), configs, st.sampled_from(list(Source)))
def test_set_config_is_the_max_of_its_keys(action: Action, config: dict[str, str] | None, source: Source) -> None:
    """A config write is exactly as strict as the strictest of its keys classified alone.

    Unless it sets and deletes one key: PVE's grammar reads that as no one meaning, so it is destructive.
    """
    facts = GuestFacts(config=config)
    if set(action.set) & set(action.delete):
        assert classify(action, facts, source).cls is Class.DESTRUCTIVE
        return
    singles = [Action(kind="set_config", vmid=100, guest_type=action.guest_type, set={k: v})
               for k, v in action.set.items()]
    singles += [Action(kind="set_config", vmid=100, guest_type=action.guest_type, delete=(k,)) for k in action.delete]
    whole = classify(action, facts, source)
    assert whole.cls == max((classify(one, facts, source).cls for one in singles), default=Class.BENIGN)
    assert len(whole.reasons) == max(1, len(singles))


@given(actions(), configs, st.booleans(), st.booleans())
def test_provenance_and_facts_only_raise(action: Action, config: dict[str, str] | None, protect: bool,
                                         pending: bool) -> None:
    """No source classes an action below the node's own file, and protection or pending drives never lower it."""
    plain = GuestFacts(config=config)
    raised = GuestFacts(config=None if config is None else {**config, "protection": "1" if protect else "0"},
                        pending_drive_keys=frozenset({"scsi1"} if pending else ()))
    local = classify(action, plain, Source.LOCAL_FILE).cls
    for source in Source:
        assert classify(action, plain, source).cls >= local
        assert classify(action, raised, source).cls >= classify(action, plain, source).cls


@given(actions(st.text(max_size=20).filter(lambda k: k not in KIND_RULES)))
def test_unknown_kind_is_destructive(action: Action) -> None:
    """Any kind the classifier does not know is destructive, whatever it carries and whoever sends it."""
    for source in Source:
        verdict = classify(action, GuestFacts(config={}), source)
        assert (verdict.cls, verdict.op_kind, verdict.rule) == (Class.DESTRUCTIVE, "unknown", "unknown_kind")


def concrete_keys() -> list[str]:
    """Every concrete key of PVE's disk and volume families."""
    families = [("scsi", 31), ("virtio", 16), ("sata", 6), ("ide", 4), ("mp", 256), ("unused", 256)]
    return [f"{name}{i}" for name, count in families for i in range(count)] + ["efidisk0", "tpmstate0", "rootfs"]


def test_every_data_bearing_key_is_never_benign_to_replace_or_delete() -> None:
    """What the planner refuses to write as data-bearing, the executor's gate never lets through as benign."""
    checked = set()
    for guest_type, planner_type in (("qemu", GuestType.QEMU), ("lxc", GuestType.LXC)):
        for key in concrete_keys():
            if not DEFAULT_REGISTRY.lookup(planner_type, key).data_bearing:
                continue
            checked.add((guest_type, key))
            facts = GuestFacts(config={key: "local-lvm:vm-100-disk-0,size=8G"})
            cases = {
                "new volume": Action(kind="set_config", vmid=100, guest_type=guest_type,
                                     set={key: "other:vm-100-disk-7,size=8G"}),
                "delete": Action(kind="set_config", vmid=100, guest_type=guest_type, delete=(key,)),
            }
            for what, action in cases.items():
                for source in Source:
                    assert classify(action, facts, source).cls > Class.BENIGN, (guest_type, key, what, source)
    # The loop is not vacuous: both types' disk keys were found data-bearing.
    assert {("qemu", "scsi30"), ("qemu", "tpmstate0"), ("lxc", "rootfs"), ("lxc", "mp255"), ("lxc", "unused255"),
            ("lxc", "virtio15")} <= checked
