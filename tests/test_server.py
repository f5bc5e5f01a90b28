"""The planner as a user meets it: a real server on loopback, a real channel, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from bench.snapshot import snapshot
from planner import server
from planner.v1 import planner_pb2 as pb
from planner.v1 import planner_pb2_grpc as pb_grpc
from tests.builders import RUNNING, STOPPED, have, want

ROOT = Path(__file__).resolve().parent.parent


def test_plan_over_a_real_channel(channel: grpc.Channel) -> None:
    """A client on loopback gets the plan, with map keys serialized in sorted order."""
    stub = pb_grpc.PlannerServiceStub(channel)
    request = pb.PlanRequest(desired=[want(100, state=RUNNING, config={"memory": "1", "cores": "2", "name": "a"})],
                             actual=[have(100, state=STOPPED)])
    response = stub.Plan(request, timeout=10)
    assert [a.WhichOneof("kind") for a in response.actions] == ["set_config", "start"]
    raw = channel.unary_unary("/planner.v1.PlannerService/Plan")(request.SerializeToString(), timeout=10)
    assert raw == response.SerializeToString(deterministic=True)


def test_same_input_gives_same_bytes(channel: grpc.Channel) -> None:
    """The same snapshot, in any order, gives byte-identical responses."""
    call = channel.unary_unary("/planner.v1.PlannerService/Plan")
    request = snapshot(300, drift_every=7)
    reordered = pb.PlanRequest(desired=list(reversed(request.desired)), actual=list(reversed(request.actual)))
    assert call(request.SerializeToString(), timeout=30) == call(reordered.SerializeToString(), timeout=30)


def test_bad_input_is_invalid_argument(channel: grpc.Channel) -> None:
    """A client sending an unspecified enum gets INVALID_ARGUMENT naming the field."""
    stub = pb_grpc.PlannerServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Plan(pb.PlanRequest(actual=[pb.ActualGuest(vmid=100, run_state=RUNNING)]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("actual[0].type:")


def test_health_reports_serving(channel: grpc.Channel) -> None:
    """The overall and the planner's health are SERVING once the server is up."""
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "planner.v1.PlannerService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_services(channel: grpc.Channel) -> None:
    """What `grpcurl list` and `describe` ask works: services and the Plan method by name."""
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"planner.v1.PlannerService", "grpc.health.v1.Health"} <= services
    pool = DescriptorPool(database)
    method = pool.FindServiceByName("planner.v1.PlannerService").methods_by_name["Plan"]
    assert (method.input_type.full_name, method.output_type.full_name) == ("planner.v1.PlanRequest",
                                                                            "planner.v1.PlanResponse")


def test_fifty_thousand_guests_plan_without_resource_exhausted(channel: grpc.Channel) -> None:
    """A 50,000-guest snapshot (~8x gRPC's default 4 MiB) is planned: 1% drift, 500 SetConfigs."""
    request = snapshot(50_000)
    assert request.ByteSize() > 4 * 1024 * 1024
    response = pb_grpc.PlannerServiceStub(channel).Plan(request, timeout=120)
    assert len(response.actions) == 500
    assert all(dict(a.set_config.set) == {"memory": "8192"} for a in response.actions)


def test_message_limit_is_configurable() -> None:
    """A planner started with a 1 MiB limit refuses a larger request with RESOURCE_EXHAUSTED."""
    running = server.start("127.0.0.1:0", max_message_bytes=1 << 20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.PlannerServiceStub(channel)
            assert stub.Plan(snapshot(100), timeout=10) is not None
            with pytest.raises(grpc.RpcError) as info:
                stub.Plan(snapshot(5_000), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(running, grace=1)


def test_graceful_shutdown_announces_not_serving(planner: server.Running, channel: grpc.Channel) -> None:
    """Health watchers see NOT_SERVING when shutdown begins, before the server goes away."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stopper = threading.Thread(target=server.stop, args=(planner, 2))
    stopper.start()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    stopper.join(5)
    assert not stopper.is_alive()


def start_cli(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Run `python -m planner serve` on a free loopback port; return it and its bound address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "planner", "serve", "--listen", "127.0.0.1:0", "--log-format", "json", *args],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        event = json.loads(line)
        if event["event"] == "planner_listening":
            return proc, event["address"]
    proc.kill()
    raise AssertionError("planner never logged planner_listening")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_then_exits_cleanly_on_signal(sig: signal.Signals) -> None:
    """`planner serve` logs its bound address as JSON, serves, and exits 0 within the grace period."""
    proc, address = start_cli("--grace", "2")
    try:
        with grpc.insecure_channel(address) as channel:
            response = pb_grpc.PlannerServiceStub(channel).Plan(
                pb.PlanRequest(desired=[want(100, state=STOPPED)], actual=[have(100)]), timeout=10)
        assert len(response.actions) == 1
        started = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert proc.stderr is not None
        events = [json.loads(line)["event"] for line in proc.stderr]
        assert "signal_received" in events and events[-1] == "planner_stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_an_address_it_cannot_bind() -> None:
    """A bad --listen exits non-zero with a message naming the address."""
    result = subprocess.run([sys.executable, "-m", "planner", "serve", "--listen", "256.0.0.1:1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert "256.0.0.1:1" in result.stderr
