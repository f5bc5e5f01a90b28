"""planner.v1 stand-ins served on loopback: one answering from a script, one refusing every request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc

from planner.v1 import planner_pb2 as pb
from planner.v1 import planner_pb2_grpc as pb_grpc


class ScriptedPlanner(pb_grpc.PlannerServiceServicer):
    """A planner.v1 stand-in that answers the n-th Plan call with the n-th scripted response (the last repeats)."""

    def __init__(self, responses: list[pb.PlanResponse]) -> None:
        self._responses, self.calls = responses, 0
        self._lock = threading.Lock()

    def Plan(self, request: pb.PlanRequest, context: grpc.ServicerContext) -> pb.PlanResponse:
        """The next scripted answer, whatever was asked."""
        with self._lock:
            self.calls += 1
            return self._responses[min(self.calls, len(self._responses)) - 1]


class RefusingPlanner(pb_grpc.PlannerServiceServicer):
    """A planner.v1 stand-in whose Plan refuses every request with INVALID_ARGUMENT; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def Plan(self, request: pb.PlanRequest, context: grpc.ServicerContext) -> pb.PlanResponse:
        """Refuse, as a planner refuses a malformed request."""
        with self._lock:
            self.calls += 1
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "desired[0].run_state: unknown value 7")
        raise AssertionError("abort returned")


@contextmanager
def served(servicer: pb_grpc.PlannerServiceServicer) -> Iterator[int]:
    """``servicer`` served on 127.0.0.1 (a free port): the port; stopped after."""
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_PlannerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


@contextmanager
def scripted_planner(responses: list[pb.PlanResponse]) -> Iterator[str]:
    """A ScriptedPlanner on 127.0.0.1 (free port): its target; stopped after."""
    with served(ScriptedPlanner(responses)) as port:
        yield f"127.0.0.1:{port}"


@contextmanager
def refusing_planner() -> Iterator[tuple[RefusingPlanner, int]]:
    """A RefusingPlanner served on 127.0.0.1 (a free port): (servicer, port); stopped after."""
    servicer = RefusingPlanner()
    with served(servicer) as port:
        yield servicer, port
