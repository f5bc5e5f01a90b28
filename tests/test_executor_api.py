"""The executor's gRPC API: GetStatus, Reconcile and ListOperations; mutual TLS beyond loopback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.grpcserver import ServerTls
from executor.api.server import start_api
from executor.loop.desired import Declared
from executor.loop.engine import Engine
from executor.v1 import executor_pb2 as epb
from executor.v1 import executor_pb2_grpc as epb_grpc
from tests.certs import Pki
from tests.executor_helpers import run_module


def test_executor_api_status_reconcile_and_operations(fakepve: Any, make_engine: Callable[..., Engine]) -> None:
    """GetStatus, Reconcile and ListOperations over a real loopback server."""
    fakepve.add_vm(100, "web", status="stopped")
    engine = make_engine([Declared(vmid=100, state="running")])
    api = start_api(engine, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            stub = epb_grpc.ExecutorServiceStub(channel)
            assert stub.GetStatus(epb.GetStatusRequest(), timeout=10).ticks == 0
            tick = stub.Reconcile(epb.ReconcileRequest(), timeout=30).tick
            assert (tick.outcome, tick.actions_queued, tick.actions_succeeded) == (epb.TICK_OUTCOME_OK, 1, 1)
            status = stub.GetStatus(epb.GetStatusRequest(), timeout=10)
            assert status.ticks == 1 and status.journal_enabled and not status.in_flight
            assert [(c.kind, c.outcome, c.count) for c in status.actions] == [("start", "ok", 1)]
            records = stub.ListOperations(epb.ListOperationsRequest(limit=10), timeout=10).operations
            assert [r.record for r in records] == ["begun", "task", "ended"]
            with pytest.raises(grpc.RpcError) as info:
                stub.ListOperations(epb.ListOperationsRequest(limit=5000), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        api.stop(1)


def test_executor_api_over_mutual_tls(fakepve: Any, make_engine: Any, pki: Pki) -> None:
    """The executor API served with TLS and required client certificates answers only trusted clients."""
    engine = make_engine([])
    api = start_api(engine, "127.0.0.1:0", tls=ServerTls(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca))
    try:
        trusted = grpc.ssl_channel_credentials(Path(pki.ca).read_bytes(), Path(pki.client_key).read_bytes(),
                                               Path(pki.client_cert).read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{api.port}", trusted) as channel:
            assert epb_grpc.ExecutorServiceStub(channel).GetStatus(epb.GetStatusRequest(), timeout=5).journal_enabled
        anonymous = grpc.ssl_channel_credentials(Path(pki.ca).read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{api.port}", anonymous) as channel, pytest.raises(grpc.RpcError):
            epb_grpc.ExecutorServiceStub(channel).Reconcile(epb.ReconcileRequest(), timeout=3)
    finally:
        api.stop(0)


def test_executor_api_beyond_loopback_requires_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    """Binding the API to a non-loopback address without client certificates is refused."""
    password = tmp_path / "pw"
    password.write_text("x")
    base = ["executor", "run", "--node", "pve1", "--pve-user", "root@pam", "--pve-password-file", str(password),
            "--listen", "0.0.0.0:0", "--once"]
    refused = run_module(*base)
    assert refused.returncode == 2 and "config: listen: 0.0.0.0:0 is beyond loopback" in refused.stderr
    half = run_module(*base, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key)
    assert half.returncode == 2 and "tls_client_ca" in half.stderr
