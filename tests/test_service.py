"""The servicer in process (grpcio-testing): statuses, conversion, logging."""

from __future__ import annotations

import grpc
import grpc_testing
import pytest
from structlog.testing import capture_logs

from planner.service import PlannerServicer
from planner.v1 import planner_pb2 as pb
from tests.builders import STOPPED, have, want

SERVICE = pb.DESCRIPTOR.services_by_name["PlannerService"]


@pytest.fixture(name="server")
def _server() -> grpc_testing.Server:
    return grpc_testing.server_from_dictionary({SERVICE: PlannerServicer()}, grpc_testing.strict_real_time())


def call(server: grpc_testing.Server, request: pb.PlanRequest) -> tuple[pb.PlanResponse, grpc.StatusCode, str]:
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name["Plan"], (), request, None)
    response, _, code, details = rpc.termination()
    return response, code, details


def test_plan_returns_typed_actions(server: grpc_testing.Server) -> None:
    """A drifted guest comes back as a oneof action with the guest type and digest."""
    request = pb.PlanRequest(desired=[want(100, state=pb.RUN_STATE_RUNNING, config={"memory": "4096"})],
                             actual=[have(100, state=STOPPED, config={"memory": "2048"}, digest="d")])
    response, code, _ = call(server, request)
    assert code == grpc.StatusCode.OK
    kinds = [a.WhichOneof("kind") for a in response.actions]
    assert kinds == ["set_config", "start"]
    assert dict(response.actions[0].set_config.set) == {"memory": "4096"}
    assert response.actions[0].set_config.digest == "d"
    assert response.actions[1].type == pb.GUEST_TYPE_QEMU


def test_skips_carry_reason_detail_and_keys(server: grpc_testing.Server) -> None:
    """Skips reach the client with their enum reason, detail and keys."""
    request = pb.PlanRequest(desired=[want(100, config={"scsi0": "local:2"}), want(101, state=STOPPED)],
                             actual=[have(100, config={"scsi0": "local:1"})])
    response, _, _ = call(server, request)
    assert [(s.vmid, s.reason, list(s.keys)) for s in response.skipped] == [
        (100, pb.SKIP_REASON_DATA_BEARING_KEY, ["scsi0"]), (101, pb.SKIP_REASON_NOT_FOUND, [])]


def test_invalid_request_is_invalid_argument_naming_the_field(server: grpc_testing.Server) -> None:
    """Bad input is INVALID_ARGUMENT with the field path, never UNKNOWN."""
    with capture_logs() as logs:
        _, code, details = call(server, pb.PlanRequest(actual=[have(100), have(100)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "actual[1].vmid: duplicate vmid 100 (also actual[0])"
    assert logs[0]["event"] == "plan_rejected" and logs[0]["field"] == "actual[1].vmid"


def test_one_log_line_per_plan_with_counts(server: grpc_testing.Server) -> None:
    """Each Plan logs one event with its counts and duration."""
    with capture_logs() as logs:
        call(server, pb.PlanRequest(desired=[want(100, state=STOPPED)], actual=[have(100), have(101)]))
    (line,) = logs
    assert line["event"] == "plan"
    assert (line["desired"], line["actual"], line["actions"], line["skipped"]) == (1, 2, 1, 0)
    assert line["duration_ms"] >= 0


def test_request_is_not_mutated_by_planning(server: grpc_testing.Server) -> None:
    """Planning reads maps without inserting defaults into the caller's message."""
    request = pb.PlanRequest(desired=[want(100, config={"memory": "1", "template": "0"}, state=pb.RUN_STATE_RUNNING)],
                             actual=[have(100, state=STOPPED, config={})])
    before = request.SerializeToString(deterministic=True)
    call(server, request)
    assert request.SerializeToString(deterministic=True) == before
