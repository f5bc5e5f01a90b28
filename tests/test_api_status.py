"""One mapping from error to gRPC status: domain errors by the table, any other exception INTERNAL and logged.

A real API server on loopback over an engine stand-in whose calls raise what the test says: a raised
exception must never reach a client as UNKNOWN (grpc's answer to an exception it did not expect).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest
from structlog.testing import capture_logs

from executor.api.server import start_api
from executor.errors import InvalidInputError
from executor.gate.kinds import StepError
from executor.loop.desired import DesiredStateError
from executor.loop.engine import Engine
from executor.loop.queue import QueueClosedError
from executor.pve.node import PveAnswerError, PveUnavailableError
from executor.signed.desk import RateLimitedError
from executor.v1 import executor_pb2 as pb
from executor.v1 import executor_pb2_grpc as pb_grpc
from journal import JournalWriteError


class RaisingEngine:
    """An engine stand-in: not recovering; its status and its tick raise ``error``."""

    def __init__(self) -> None:
        self.recovering = threading.Event()
        self.error: Exception = RuntimeError("unset")

    def status(self) -> Any:
        """Raise the error the test set."""
        raise self.error

    def tick(self, wait: bool = False) -> Any:
        """Raise the error the test set."""
        raise self.error


@pytest.fixture(name="engine")
def _engine() -> RaisingEngine:
    """The engine stand-in; each test sets what it raises."""
    return RaisingEngine()


@pytest.fixture(name="stub")
def _stub(engine: RaisingEngine) -> Iterator[pb_grpc.ExecutorServiceStub]:
    """A client of a real executor API on loopback over the raising engine."""
    api = start_api(cast(Engine, engine), "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            yield pb_grpc.ExecutorServiceStub(channel)
    finally:
        api.stop(0)


MAPPED = [
    (PveUnavailableError("no answer from pve1: ConnectionError"), grpc.StatusCode.UNAVAILABLE, "Proxmox: no answer"),
    (PveAnswerError("guest 100: status list: not a list"), grpc.StatusCode.UNAVAILABLE, "Proxmox: guest 100"),
    (RateLimitedError("too many calls"), grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls"),
    (DesiredStateError("desired.yaml:3: vmid: not an integer"), grpc.StatusCode.INVALID_ARGUMENT, "desired.yaml:3"),
    (StepError("set: memory: not an integer"), grpc.StatusCode.INVALID_ARGUMENT, "Proxmox: set: memory"),
    (InvalidInputError("bad input"), grpc.StatusCode.INVALID_ARGUMENT, "bad input"),
    (QueueClosedError("closed"), grpc.StatusCode.UNAVAILABLE, "closed"),
    (JournalWriteError("disk full"), grpc.StatusCode.UNAVAILABLE, "journal: disk full"),
]


@pytest.mark.parametrize(("error", "code", "start"), MAPPED, ids=[type(e).__name__ for e, _, _ in MAPPED])
def test_a_domain_error_gets_its_status_from_the_table(engine: RaisingEngine, stub: pb_grpc.ExecutorServiceStub,
                                                       error: Exception, code: grpc.StatusCode, start: str) -> None:
    """Each kind of error raised under a call reaches the client with the table's code and its message."""
    engine.error = error
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert caught.value.code() == code
    assert caught.value.details().startswith(start)


@pytest.mark.parametrize("call", ["GetStatus", "Reconcile"])
def test_a_bug_reaches_the_client_as_internal_with_a_log_line(engine: RaisingEngine, stub: pb_grpc.ExecutorServiceStub,
                                                             call: str) -> None:
    """An exception no table row names: INTERNAL (not UNKNOWN), its text not sent, an api_call_failed line with
    the traceback in the log."""
    engine.error = KeyError("password=hunter2")
    request = {"GetStatus": pb.GetStatusRequest(), "Reconcile": pb.ReconcileRequest()}[call]
    with capture_logs() as logs, pytest.raises(grpc.RpcError) as caught:
        getattr(stub, call)(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in caught.value.details()
    failed = [e for e in logs if e["event"] == "api_call_failed"]
    assert len(failed) == 1 and failed[0]["method"] == call and failed[0]["exc_info"]
    assert failed[0]["log_level"] == "error"


def test_an_abort_keeps_its_own_code(engine: RaisingEngine, stub: pb_grpc.ExecutorServiceStub) -> None:
    """A call that aborts on purpose (``context.abort``) is answered with that code, not mapped again."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListOperations(pb.ListOperationsRequest(limit=5000), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "limit: at most 1000"
