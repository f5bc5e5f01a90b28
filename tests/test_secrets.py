"""Secrets stay secret: an API token needs no login; none shows in --print-config, a log, a repr or a gRPC detail."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from executor.pve.node import Credentials, ProxmoxNode
from planner import server
from planner.v1 import planner_pb2 as pb
from tests.certs import Pki
from tests.executor_helpers import run_module


def test_api_token_auth_needs_no_login(fakepve: Any, connect: Callable[..., Any]) -> None:
    """With an API token every request carries it; no ticket is ever requested."""
    fakepve.apitokens["reconcile@pve!executor"] = "0b6c-token-secret"
    fakepve.add_vm(100, "web", status="running")
    node = ProxmoxNode(connect(credentials=Credentials(user="reconcile@pve!executor",
                                                       token_secret="0b6c-token-secret")))
    assert [g.vmid for g in node.guests()] == [100]
    assert not [p for _, p, _ in fakepve.requests if p.endswith("/access/ticket")]
    assert "0b6c" not in repr(node.session._connection)  # secrets are never printed


def test_print_config_redacts_secrets(tmp_path: Path) -> None:
    """Secrets from the environment or the file never appear in --print-config."""
    config = tmp_path / "executor.toml"
    config.write_text('node = "pve1"\npve_user = "root@pam"\npve_password = "hunter2-file"\n')
    shown = run_module("executor", "run", "--config", str(config), "--print-config",
                       env={"PVE_EXECUTOR_PVE_TOKEN_SECRET": "tok-3f9a-env"})
    assert shown.returncode == 0
    assert 'pve_password = "<redacted>"' in shown.stdout and 'pve_token_secret = "<redacted>"' in shown.stdout
    assert "hunter2" not in shown.stdout + shown.stderr and "tok-3f9a" not in shown.stdout + shown.stderr


def test_full_run_logs_never_contain_the_token_secret_or_password(fakepve: Any, fakepve_cafile: str,
                                                                  planner: server.Running, tmp_path: Path) -> None:
    """Every log line of a token run and of a password run (with failures and retries) is free of secrets."""
    fakepve.apitokens["reconcile@pve!executor"] = "tok-8d1e-SECRET"
    fakepve.users["ops@pve"] = "pw-77c2-SECRET"
    vm = fakepve.add_vm(100, "web", status="stopped")
    vm.start_error = "could not start: storage offline"  # a failure path, logged with its error
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n    config: {onboot: 1}\n")
    (tmp_path / "token").write_text("tok-8d1e-SECRET\n")
    base = ["executor", "run", "--once", "--node", "pve1", "--pve-url", f"https://127.0.0.1:{fakepve.port}",
            "--pve-ca-file", fakepve_cafile, "--planner", f"127.0.0.1:{planner.port}", "--desired", str(desired),
            "--log-format", "json"]
    token = run_module(*base, "--pve-token-id", "reconcile@pve!executor", "--pve-token-file",
                       str(tmp_path / "token"), "--state-dir", str(tmp_path / "a"))
    password = run_module(*base, "--pve-user", "ops@pve", "--state-dir", str(tmp_path / "b"),
                          env={"PVE_EXECUTOR_PVE_PASSWORD": "pw-77c2-SECRET"})
    for result in (token, password):
        assert result.returncode == 1  # the start failed, as arranged
        assert '"event": "action"' in result.stderr
        assert "SECRET" not in result.stderr + result.stdout


def test_grpc_status_details_never_carry_secrets(mtls_planner: server.Running, pki: Pki) -> None:
    """A refused TLS handshake reports no key material in its status details."""
    channel = grpc.secure_channel(f"127.0.0.1:{mtls_planner.port}", grpc.ssl_channel_credentials(
        root_certificates=Path(pki.ca).read_bytes()))
    with channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/planner.v1.PlannerService/Plan")(pb.PlanRequest().SerializeToString(), timeout=3)
    assert "PRIVATE KEY" not in str(info.value.details())
