"""Each guest's sync state after a tick (executor.loop.fleet.guest_states): a pure function of the tick's view."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from executor.gate.actions import SET_CONFIG, START, STOP, Step
from executor.gate.decisions import Admission, PendingApproval, Refusal
from executor.loop.desired import Declared
from executor.loop.fleet import TickView, guest_states
from executor.loop.observe import Observed, StagedKey
from executor.pve.node import GuestState
from hub.v1 import hub_pb2 as pb
from planner.v1 import planner_pb2 as planner_pb
from safety.classify import Class, Source
from safety.opschema import NOT_SHOWN

NODE = "pve1@lab"


def observed(*guests: GuestState, configs: dict[int, dict[str, str]] | None = None,
             elsewhere: frozenset[int] = frozenset(), unreadable: dict[int, str] | None = None) -> Observed:
    """The node as a tick read it."""
    return Observed(guests={g.vmid: g for g in guests},
                    configs={vmid: (config, f"d{vmid}") for vmid, config in (configs or {}).items()},
                    elsewhere=elsewhere, unreadable=unreadable or {})


def vm(vmid: int, status: str = "running", name: str = "") -> GuestState:
    """A guest in the list."""
    return GuestState(vmid=vmid, type="qemu", status=status, lock="", name=name or f"g{vmid}")


def approval(vmid: int) -> PendingApproval:
    """A change waiting for an operator's signature."""
    return PendingApproval(vmid=vmid, op_kind="config.protection_off", cls=Class.APPROVAL, rule="protection_off",
                           reasons=("protection: turning it off",), source=Source.HUB, reason="APPROVAL_REQUIRED",
                           descriptor=b'{"vmid":%d}' % vmid, first_seen=1_700_000_000.5)


def states(view: TickView, previous: dict[int, pb.GuestState] | None = None) -> dict[int, tuple[str, str]]:
    """vmid -> (state name, reason)."""
    return {vmid: (pb.SyncState.Name(g.state), g.reason)
            for vmid, g in guest_states(view, audience=NODE, previous=previous).items()}


def test_each_guest_gets_the_first_state_that_fits() -> None:
    """In sync, drifted (with its key, declared against actual), a start, refused, pending approval (with its
    descriptor), elsewhere, unreadable, skipped by the planner, staged, failed and backing off, busy."""
    declared = tuple(Declared(vmid=v, state="running") for v in range(100, 111))
    memory = Step(vmid=101, guest_type="qemu", kind=SET_CONFIG, set=(("memory", "4096"),), delete=("tags",))
    start = Step(vmid=102, guest_type="qemu", kind=START)
    view = TickView(
        declared=declared,
        observed=observed(*(vm(v) for v in (100, 101, 103, 104, 107, 108, 109)), vm(102, "stopped"),
                          configs={101: {"memory": "2048", "tags": "old"}}, elsewhere=frozenset({105}),
                          unreadable={106: "qemu guest-list entry: bad status"}),
        planned={101: [memory], 102: [start], 103: [Step(vmid=103, guest_type="qemu", kind=STOP)],
                 104: [Step(vmid=104, guest_type="qemu", kind=SET_CONFIG, set=(("protection", "0"),))]},
        refusals=(Refusal(vmid=103, op_kind="stop", cls=Class.APPROVAL, reason="OUT_OF_SCOPE", detail="not mine"),),
        pending=(approval(104),), skipped=(planner_pb.Skip(vmid=107, reason=planner_pb.SKIP_REASON_LOCKED,
                                                          detail="lock backup"),),
        staged={108: (StagedKey(key="memory", now="1024", next="2048"),)},
        held=frozenset({109, 110}), failing={109: "guest 109 start: task failed"},
        admission=Admission(admitted={}))
    assert states(view) == {
        100: ("SYNC_STATE_IN_SYNC", ""), 101: ("SYNC_STATE_DRIFTED", ""), 102: ("SYNC_STATE_DRIFTED", ""),
        103: ("SYNC_STATE_REFUSED", "OUT_OF_SCOPE"), 104: ("SYNC_STATE_PENDING_APPROVAL", "APPROVAL_REQUIRED"),
        105: ("SYNC_STATE_ELSEWHERE", ""), 106: ("SYNC_STATE_SKIPPED", "UNREADABLE"),
        107: ("SYNC_STATE_SKIPPED", "LOCKED"), 108: ("SYNC_STATE_STAGED", ""),
        109: ("SYNC_STATE_FAILED", "ACTION_FAILED"), 110: ("SYNC_STATE_DRIFTED", "IN_PROGRESS")}
    found = guest_states(view, audience=NODE)
    assert list(found[101].diffs) == [pb.KeyDiff(key="memory", declared="4096", actual="2048"),
                                      pb.KeyDiff(key="tags", declared_absent=True, actual="old")]
    assert list(found[102].diffs) == [pb.KeyDiff(key="run_state", declared="running", actual="stopped")]
    [waiting] = found[104].pending
    assert (waiting.node, waiting.audience, waiting.vmid, waiting.action_class, waiting.descriptor,
            waiting.descriptor_sha256, waiting.first_seen_unix_ms) == (
        NODE, NODE, 104, "APPROVAL", b'{"vmid":104}', approval(104).descriptor_sha256, 1_700_000_000_500)
    assert list(found[108].diffs) == [pb.KeyDiff(key="memory", declared="2048", actual="1024")]
    assert (found[101].name, found[101].type, found[102].actual_run_state, found[102].declared_run_state) == (
        "g101", "qemu", "stopped", "running")


def test_a_guest_not_read_this_tick_keeps_its_last_diffs_and_a_secret_value_is_never_sent() -> None:
    """A busy guest carries the previous report's diffs and names; a description or password differs, unshown."""
    previous = {100: pb.GuestState(vmid=100, name="web", type="qemu", actual_run_state="running",
                                   diffs=[pb.KeyDiff(key="memory", declared="2", actual="1")])}
    held = guest_states(TickView(declared=(Declared(vmid=100),), observed=observed(), held=frozenset({100})),
                        audience=NODE, previous=previous)[100]
    assert (held.name, held.actual_run_state, list(held.diffs)) == ("web", "running", list(previous[100].diffs))
    secret = Step(vmid=101, guest_type="qemu", kind=SET_CONFIG, set=(("cipassword", "hunter2"),
                                                                      ("description", "new words")))
    view = TickView(declared=(Declared(vmid=101),), observed=observed(vm(101), configs={101: {"description": "old"}}),
                    planned={101: [secret]})
    diffs = guest_states(view, audience=NODE)[101].diffs
    assert [(d.key, d.declared, d.actual, d.actual_absent) for d in diffs] == [
        ("cipassword", NOT_SHOWN, "", True), ("description", NOT_SHOWN, NOT_SHOWN, False)]
    assert b"hunter2" not in b"".join(d.SerializeToString() for d in diffs)


KINDS = st.sampled_from(["plain", "drift", "refuse", "pending", "elsewhere", "skip", "held", "staged"])


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(100, 140), KINDS, max_size=12))
def test_every_declared_guest_has_exactly_one_state_and_only_an_untouched_one_is_in_sync(
        kinds: dict[int, str]) -> None:
    """Whatever the tick saw: one GuestState per declared guest, with a state set; in sync exactly when nothing
    touched it; its vmid is its key."""
    view = TickView(
        declared=tuple(Declared(vmid=v) for v in kinds),
        observed=observed(*(vm(v) for v, k in kinds.items() if k != "elsewhere"),
                          elsewhere=frozenset(v for v, k in kinds.items() if k == "elsewhere")),
        planned={v: [Step(vmid=v, guest_type="qemu", kind=START)] for v, k in kinds.items()
                 if k in ("drift", "refuse", "pending")},
        refusals=tuple(Refusal(vmid=v, op_kind="start", cls=Class.APPROVAL, reason="LOCKED", detail="x")
                       for v, k in kinds.items() if k == "refuse"),
        pending=tuple(approval(v) for v, k in kinds.items() if k == "pending"),
        skipped=tuple(planner_pb.Skip(vmid=v, reason=planner_pb.SKIP_REASON_NOT_FOUND)
                      for v, k in kinds.items() if k == "skip"),
        held=frozenset(v for v, k in kinds.items() if k == "held"),
        staged={v: (StagedKey(key="memory", now="1", next="2"),) for v, k in kinds.items() if k == "staged"})
    found = guest_states(view, audience=NODE)
    assert sorted(found) == sorted(kinds)
    assert all(g.vmid == v and g.state != pb.SYNC_STATE_UNSPECIFIED for v, g in found.items())
    assert {v for v, g in found.items() if g.state == pb.SYNC_STATE_IN_SYNC} == {
        v for v, k in kinds.items() if k == "plain"}
    assert guest_states(view, audience=NODE) == found  # pure: the same view, the same states
