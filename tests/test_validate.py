"""Request validation: bad input is refused whole, naming the field."""

from __future__ import annotations

import pytest

from planner.plan import plan
from planner.v1 import planner_pb2 as pb
from planner.validate import InvalidRequestError
from tests.builders import PAUSED, RUNNING, have, want


def refused(desired: list[pb.DesiredGuest], actual: list[pb.ActualGuest]) -> str:
    with pytest.raises(InvalidRequestError) as info:
        plan(desired, actual)
    return str(info.value)


@pytest.mark.parametrize(
    ("desired", "actual", "message"),
    [
        ([want(0)], [], "desired[0].vmid: must be 100..999999999, got 0"),
        ([], [have(100), have(99)], "actual[1].vmid: must be 100..999999999, got 99"),
        ([want(100), want(101), want(100)], [], "desired[2].vmid: duplicate vmid 100 (also desired[0])"),
        ([], [have(105), have(105)], "actual[1].vmid: duplicate vmid 105 (also actual[0])"),
        ([want(100, state=PAUSED)], [], "desired[0].run_state: must be RUN_STATE_RUNNING or RUN_STATE_STOPPED"),
        ([want(100, state=pb.RUN_STATE_UNSPECIFIED)], [], "desired[0].run_state"),
        ([], [pb.ActualGuest(vmid=100, run_state=RUNNING)], "actual[0].type: required"),
        ([], [pb.ActualGuest(vmid=100, type=pb.GUEST_TYPE_LXC)], "actual[0].run_state: required"),
        ([want(100, config={"Memory": "1"})], [], "desired[0].spec.config['Memory']: not a PVE config key"),
        ([want(100, config={"net 0": "1"})], [], "desired[0].spec.config['net 0']: not a PVE config key"),
        ([want(100, config={"": "1"})], [], "desired[0].spec.config['']: not a PVE config key"),
        ([want(100, config={"digest": "x"})], [], "desired[0].spec.config['digest']: is set by PVE"),
        ([want(100, config={"name": "a\nb"})], [], "desired[0].spec.config['name']: value contains a line break"),
        ([want(100, config={"name": "a\x00"})], [], "desired[0].spec.config['name']: value contains"),
        ([want(100, description="a\x00")], [], "desired[0].description: contains NUL"),
        ([want(100, description="x" * 8193)], [], "desired[0].description: longer than PVE's 8192"),
        ([want(100, config={"description": "a"})], [], "desired[0].spec.config['description']: declare it in the"),
        ([want(100, config={"Bad": "1"})], [have(100, lock="backup")], "desired[0].spec.config['Bad']"),
        ([want(100, config={"name": "a\nb"})], [], "desired[0].spec.config['name']: value contains"),
    ],
)
def test_bad_request_names_the_field(desired: list[pb.DesiredGuest], actual: list[pb.ActualGuest],
                                     message: str) -> None:
    """Each rule PVE enforces is refused with the path of the offending field."""
    assert refused(desired, actual).startswith(message)


def test_valid_request_passes() -> None:
    """Newlines are fine in descriptions; PVE key names with digits, '_' and '-' are valid."""
    plan([want(100, state=RUNNING, config={"net0": "virtio", "migrate_downtime": "1", "amd-sev": "type=std"},
               description="a\nb")],
         [have(100), have(999_999_999)])
