"""Scope check and blast radius: actions stay inside what was declared, and remote sources cannot drain a node."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safety.blast import RemoteStop, StopBudget, limit_stops, settle
from safety.classify import Action, Source
from safety.scope import Declaration, out_of_scope

RUNNING = Declaration(vmid=105, state="running", config_keys=frozenset({"memory", "net0"}), description=True)
STOPPED = Declaration(vmid=105, state="stopped", config_keys=None, description=False)
DESCRIBED = Declaration(vmid=105, state=None, config_keys=None, description=True)


def act(kind: str, *, set_: dict[str, str] | None = None, delete: tuple[str, ...] = ()) -> Action:
    return Action(kind=kind, vmid=105, guest_type="qemu", set=set_ or {}, delete=delete)


@pytest.mark.parametrize(("action", "declared"), [
    (act("start"), RUNNING),
    (act("stop"), STOPPED),
    (act("set_config", set_={"memory": "2048", "description": "web"}, delete=("net0",)), RUNNING),
    (act("set_config", set_={"description": "web"}), DESCRIBED),
    (act("set_config"), RUNNING),
])
def test_declared_actions_are_in_scope(action: Action, declared: Declaration) -> None:
    """What the desired state declared, in its direction, passes the scope check."""
    assert out_of_scope(action, declared) is None


@pytest.mark.parametrize(("action", "declared", "says"), [
    (act("start"), None, "not declared"),
    (act("stop"), RUNNING, "declared run state is running"),
    (act("start"), STOPPED, "declared run state is stopped"),
    (act("start"), DESCRIBED, "run state is not managed"),
    (act("set_config", set_={"hookscript": "local:snippets/x.pl"}), RUNNING, "keys not declared: hookscript"),
    (act("set_config", delete=("scsi0", "cores")), RUNNING, "keys not declared: cores, scsi0"),
    (act("set_config", set_={"memory": "1024"}), DESCRIBED, "keys not declared: memory"),
    (act("set_config", set_={"description": "x"}), STOPPED, "neither config nor description is managed"),
    (act("guest.destroy"), RUNNING, "never declares a 'guest.destroy' action"),
    (act("teleport"), RUNNING, "never declares"),
    (act("start"), Declaration(vmid=106, state="running", config_keys=None, description=False), "guest 106"),
])
def test_undeclared_actions_are_out_of_scope(action: Action, declared: Declaration | None, says: str) -> None:
    """Anything the desired state did not declare is refused as out of scope, with a reason naming what."""
    reason = out_of_scope(action, declared)
    assert reason is not None and says in reason and "guest 105" in reason


@pytest.mark.parametrize(("stops", "managed", "source", "limit", "budget"), [
    # docs/SAFETY.md §12 row 43: a hub stopping 40 of 50 needs approval; 12 of 50 runs 5 per tick.
    (range(100, 140), 50, Source.HUB, None, StopBudget(admitted=(), deferred=(), need_approval=tuple(range(100, 140)))),
    ([111, 100, 105, 101, 110, 102, 103, 104, 106, 107, 108, 109], 50, Source.HUB, None,
     StopBudget(admitted=(100, 101, 102, 103, 104), deferred=tuple(range(105, 112)), need_approval=())),
    (range(100, 125), 50, Source.HUB, None,  # exactly half is not "more than half"
     StopBudget(admitted=tuple(range(100, 105)), deferred=tuple(range(105, 125)), need_approval=())),
    (range(100, 140), 50, Source.LOCAL_FILE, None, StopBudget(admitted=tuple(range(100, 140)), deferred=(),
                                                             need_approval=())),
    (range(100, 140), 50, Source.LOCAL_FILE, 3, StopBudget(admitted=(100, 101, 102), deferred=tuple(range(103, 140)),
                                                          need_approval=())),
    ([7, 3, 5], 10, Source.SELFTEST, None, StopBudget(admitted=(3, 5), deferred=(7,), need_approval=())),
    ([7, 3, 5], 10, Source.HUB, 8, StopBudget(admitted=(3, 5, 7), deferred=(), need_approval=())),
    ([9, 9, 9], 4, Source.HUB, None, StopBudget(admitted=(9,), deferred=(), need_approval=())),
    ([9], 0, Source.HUB, None, StopBudget(admitted=(), deferred=(), need_approval=(9,))),
    ([], 0, Source.HUB, None, StopBudget(admitted=(), deferred=(), need_approval=())),
])
def test_stop_budget(stops: list[int], managed: int, source: Source, limit: int | None, budget: StopBudget) -> None:
    """The node's file stops anything; a remote source gets max(2, 10%) per tick, lowest vmids first."""
    assert limit_stops(list(stops), managed=managed, source=source, max_stops_per_tick=limit) == budget


@pytest.mark.parametrize(("managed", "limit", "field"), [(-1, None, "managed"), (10, 0, "max_stops_per_tick")])
def test_stop_budget_rejects_bad_settings(managed: int, limit: int | None, field: str) -> None:
    """A nonsensical setting is an error naming it, not a silent 'stop nothing' or 'stop everything'."""
    with pytest.raises(ValueError, match=field):
        limit_stops([100], managed=managed, source=Source.HUB, max_stops_per_tick=limit)


@given(st.lists(st.integers(100, 400), max_size=60), st.integers(0, 300), st.sampled_from(list(Source)),
       st.none() | st.integers(1, 30))
def test_stop_budget_partitions_the_stops(stops: list[int], managed: int, source: Source, limit: int | None) -> None:
    """Every asked stop lands in exactly one bucket; admitted never exceeds the limit and precedes the deferred."""
    budget = limit_stops(stops, managed=managed, source=source, max_stops_per_tick=limit)
    parts = (*budget.admitted, *budget.deferred, *budget.need_approval)
    assert sorted(parts) == sorted(set(stops))
    assert all(list(p) == sorted(p) for p in (budget.admitted, budget.deferred, budget.need_approval))
    if limit is not None:
        assert len(budget.admitted) <= limit
    if budget.admitted and budget.deferred:
        assert budget.admitted[-1] < budget.deferred[0]
    if source is Source.LOCAL_FILE:
        assert not budget.need_approval
    else:
        assert len(budget.admitted) <= max(2, managed // 10) or limit is not None
        assert 2 * len(budget.admitted + budget.deferred) <= managed


def test_a_hub_that_drains_a_node_in_halves_needs_approval_for_the_second_half() -> None:
    """Guests already stopped by the declaration count: half now and half later is still a drain."""
    assert limit_stops([103, 104, 105], managed=6, source=Source.HUB, max_stops_per_tick=10,
                       already_stopped=0).admitted == (103, 104, 105)
    assert limit_stops([103, 104, 105], managed=6, source=Source.HUB, max_stops_per_tick=10,
                       already_stopped=3).need_approval == (103, 104, 105)


def test_stops_already_run_in_the_window_use_up_the_budget() -> None:
    """Ticks on demand do not multiply the rate: stops run in the window count against the limit."""
    budget = limit_stops([100, 101, 102], managed=30, source=Source.HUB, max_stops_per_tick=None, used=2)
    assert (budget.admitted, budget.deferred) == ((100,), (101, 102))


def test_a_written_value_must_be_a_spelling_of_the_declared_one() -> None:
    """Numbers, booleans, tags and text in other spellings pass; a property string may keep actual's fields
    (the MAC); anything else the planner writes is out of scope."""
    from safety.scope import same_value  # noqa: PLC0415

    assert same_value("2048", "2048.0", None) and same_value("yes", "1", None) and same_value("a,B", "a;b", None)
    assert same_value("web tier\r\n", "web tier", None)
    assert same_value("virtio,bridge=vmbr1", "virtio=BC:24:11:00:00:01,bridge=vmbr1,firewall=1",
                      "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1", key="net0")
    assert not same_value("2048", "16", None)
    assert not same_value("virtio,bridge=vmbr1", "virtio,bridge=vmbr1,tag=666", "virtio=BC:24:11:00:00:01,bridge=vmbr0",
                          key="net0")


# --- item 3 of issue 13 (matrix row 51): a write must mean the declared fields laid over actual ----------

NIC = "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1,tag=10"
NIC_DECLARED = Declaration(vmid=105, state=None, config_keys=frozenset({"net0"}), description=False,
                           values={"net0": NIC})


@pytest.mark.parametrize(("actual", "written"), [
    ("virtio=BC:24:11:00:00:01,bridge=vmbr1", "virtio=BC:24:11:00:00:01,bridge=vmbr0"),  # drops firewall and tag
    ("virtio=BC:24:11:00:00:01,bridge=vmbr1", "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1"),  # drops the tag
    ("virtio=BC:24:11:00:00:01,bridge=vmbr1,mtu=9000", f"{NIC}"),  # drops a field the guest has (mtu)
    ("virtio=BC:24:11:00:00:01,bridge=vmbr1", f"{NIC},rate=1"),  # adds one nobody declared
    ("virtio=BC:24:11:00:00:01,bridge=vmbr1", f"{NIC},firewall=0"),  # two spellings: unreadable
])
def test_row_51_a_write_of_part_of_a_declaration_is_out_of_scope(actual: str, written: str) -> None:
    """A compromised planner that writes a subset of the declared fields (PVE then drops the rest) is refused."""
    action = act("set_config", set_={"net0": written})
    reason = out_of_scope(action, NIC_DECLARED, {"net0": actual})
    assert reason is not None and "net0" in reason


@pytest.mark.parametrize(("actual", "written"), [
    ("virtio=BC:24:11:00:00:01,bridge=vmbr1", NIC),
    ("virtio=bc:24:11:00:00:01,bridge=vmbr1,mtu=9000", "tag=10,bridge=vmbr0,firewall=on,model=virtio,"
                                                       "macaddr=BC:24:11:00:00:01,mtu=9000"),
    (None, NIC),
])
def test_the_planners_merge_in_any_spelling_is_in_scope(actual: str | None, written: str) -> None:
    """Declared fields over actual's, in another order or spelling (PVE's aliases, boolean words), pass."""
    action = act("set_config", set_={"net0": written})
    assert out_of_scope(action, NIC_DECLARED, {} if actual is None else {"net0": actual}) is None


SEEN, UNSEEN = RemoteStop(at=100.0, seen=True), RemoteStop(at=100.0)


@pytest.mark.parametrize(("stop", "state", "held", "now", "kept"), [
    (SEEN, "stopped", False, 200.0, SEEN),
    (UNSEEN, "stopped", False, 200.0, SEEN),  # seen stopped: confirmed
    (SEEN, "running", False, 200.0, None),  # someone started it: no longer the source's stop
    (SEEN, "paused", False, 200.0, None),
    (UNSEEN, "running", False, 150.0, UNSEEN),  # its stop may still be under way (a restart mid-shutdown)
    (UNSEEN, "running", False, 200.0, None),  # the grace is over: the stop never happened
    (SEEN, "running", True, 200.0, SEEN),  # held: a job in motion, or a read older than the stop's end
    (SEEN, None, False, 200.0, SEEN),  # listed in a state the rule cannot read: it still counts
])
def test_a_remote_stop_counts_until_the_guest_runs_again(stop: RemoteStop, state: str | None, held: bool, now: float,
                                                         kept: RemoteStop | None) -> None:
    """What the node has decides, never what is declared; in doubt the stop still counts."""
    status = {} if state is None else {105: state}
    settled = settle({105: stop}, status=status, present={105}, held={105} if held else set(), now=now, grace=60.0)
    assert settled.get(105) == kept


def test_a_remote_stop_of_a_guest_gone_from_the_node_no_longer_counts() -> None:
    """Removed or migrated away: it is not this node's to count, held or not."""
    assert settle({105: SEEN}, status={}, present={106}, held={105}, now=0.0, grace=60.0) == {}
