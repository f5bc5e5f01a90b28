"""Builders for planner.v1 messages used across tests."""

from __future__ import annotations

from planner.v1 import planner_pb2 as pb

QEMU, LXC = pb.GUEST_TYPE_QEMU, pb.GUEST_TYPE_LXC
RUNNING, STOPPED, PAUSED = pb.RUN_STATE_RUNNING, pb.RUN_STATE_STOPPED, pb.RUN_STATE_PAUSED


def want(
    vmid: int,
    *,
    state: pb.RunState.ValueType | None = None,
    config: dict[str, str] | None = None,
    description: str | None = None,
) -> pb.DesiredGuest:
    """A desired guest managing only the parts given."""
    guest = pb.DesiredGuest(vmid=vmid)
    if state is not None:
        guest.run_state = state
    if config is not None:
        guest.spec.SetInParent()
        guest.spec.config.update(config)
    if description is not None:
        guest.description = description
    return guest


def have(
    vmid: int,
    *,
    kind: pb.GuestType.ValueType = QEMU,
    state: pb.RunState.ValueType = RUNNING,
    config: dict[str, str] | None = None,
    known: bool = True,
    lock: str = "",
    digest: str = "",
) -> pb.ActualGuest:
    """An actual guest as the executor would report it."""
    return pb.ActualGuest(
        vmid=vmid, type=kind, run_state=state, config_known=known, config=config or {},
        lock=lock, digest=digest or f"digest-{vmid}",
    )


def config(vmid: int, values: dict[str, str] | None = None, delete: tuple[str, ...] = ()) -> pb.Action:
    """A SetConfig action."""
    return pb.Action(vmid=vmid, type=QEMU, set_config=pb.SetConfigAction(set=values or {}, delete=delete))


ONE_GUEST = ([want(100, state=RUNNING)], [have(100, state=STOPPED)])  # a plan's input with one start to plan
