"""A TLS misconfiguration towards the planner names the flag to fix; every other failure keeps its cause.

Real gRPC servers on loopback (plaintext, TLS, mutual TLS) with certificates made for the run
(``tests.certs``); a port bound and released; a name under ``.invalid``; a listener that never answers.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.grpcserver import ClientTls, ServerTls
from executor.loop.planner_client import PlannerClient, PlannerUnavailableError
from planner import server
from tests.builders import ONE_GUEST
from tests.certs import Pki
from tests.executor_helpers import ROOT, cli, unused_port


@pytest.fixture(name="tls_planner")
def _tls_planner(pki: Pki) -> Iterator[server.Running]:
    """A real planner on 127.0.0.1 serving TLS (no client certificate asked for)."""
    running = server.start("127.0.0.1:0", tls=ServerTls(cert=pki.server_cert, key=pki.server_key))
    yield running
    server.stop(running, 1)


@pytest.fixture(name="silent")
def _silent() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    yield int(listener.getsockname()[1])
    listener.close()


def failure(target: str, tls: ClientTls | None = None, deadline: float = 5.0) -> PlannerUnavailableError:
    """The error of one Plan call to ``target`` (one attempt)."""
    with pytest.raises(PlannerUnavailableError) as caught:
        PlannerClient(target, tls=tls, deadline=deadline, attempts=1).plan(*ONE_GUEST)
    return caught.value


def test_a_plaintext_client_at_a_tls_planner_is_told_to_give_planner_tls(tls_planner: server.Running,
                                                                         mtls_planner: server.Running) -> None:
    """gRPC only says "Socket closed": the probe finds TLS spoken there; the message names --planner-tls."""
    for running in (tls_planner, mtls_planner):
        error = failure(f"127.0.0.1:{running.port}")
        assert error.cause == "tls_required" and "--planner-tls" in str(error) and "--planner-tls" in error.hint


def test_a_missing_client_certificate_names_the_client_flags(mtls_planner: server.Running, pki: Pki) -> None:
    """A mutual-TLS planner closes the connection of a client without a certificate: the flags to give."""
    error = failure(f"127.0.0.1:{mtls_planner.port}", ClientTls(ca=pki.ca))
    assert error.cause == "tls_client_cert_required", error
    assert "--planner-client-cert" in str(error) and "--planner-client-key" in str(error), error


def test_a_client_certificate_the_planner_does_not_trust_is_named(mtls_planner: server.Running, pki: Pki) -> None:
    """A client certificate from another CA: the message names the file and the planner's --tls-client-ca."""
    error = failure(f"127.0.0.1:{mtls_planner.port}", ClientTls(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key))
    assert error.cause == "tls_client_cert_rejected", error
    assert pki.rogue_cert in str(error) and "--tls-client-ca" in str(error), error


def test_an_untrusted_planner_certificate_names_planner_ca(tls_planner: server.Running, pki: Pki) -> None:
    """The planner's certificate signed by a CA the executor was not given: --planner-ca."""
    error = failure(f"127.0.0.1:{tls_planner.port}", ClientTls(ca=pki.other_ca))
    assert error.cause == "tls_untrusted" and "--planner-ca" in str(error), error


def test_a_tls_client_at_a_plaintext_planner_is_told_so(planner: server.Running, pki: Pki) -> None:
    """TLS towards a planner that does not speak it: drop --planner-tls, or serve TLS from the planner."""
    error = failure(f"127.0.0.1:{planner.port}", ClientTls(ca=pki.ca))
    assert error.cause == "tls_not_spoken" and "--planner-tls" in str(error), error


def test_refused_unknown_host_and_timeout_are_distinct(silent: int) -> None:
    """Nothing listening, a name that never resolves, a peer that never answers: three causes, --planner."""
    causes = {failure(f"127.0.0.1:{unused_port()}").cause, failure("nonexistent.invalid:50051").cause,
              failure(f"127.0.0.1:{silent}", deadline=1.0).cause}
    assert causes == {"refused", "dns", "timeout"}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(name="executor_cli")
def _executor_cli(fakepve: Any, fakepve_cafile: str, tmp_path: Path) -> Callable[..., list[str]]:
    """pve-executor's command line against fakepve (guest 100 declared) and the planner ``target``."""
    fakepve.add_vm(100, "vm1", status="stopped")
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n")

    def make(target: str, *args: str) -> list[str]:
        return [*cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, target, tmp_path, *args),
                "--desired", str(desired)]
    return make


def test_run_once_against_a_tls_planner_logs_the_cause_and_the_flag(executor_cli: Callable[..., list[str]],
                                                                    tls_planner: server.Running,
                                                                    tmp_path: Path) -> None:
    """`run --once` in plaintext at a TLS planner: the tick event has cause= and hint=; exit 1 with one line."""
    result = _run(executor_cli(f"127.0.0.1:{tls_planner.port}", "run", "--once", "--state-dir",
                               str(tmp_path / "state")))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    ticks = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    ticks = [t for t in ticks if t.get("event") == "tick"]
    assert [(t["outcome"], t.get("cause")) for t in ticks] == [("planner_unavailable", "tls_required")], ticks
    assert "--planner-tls" in ticks[0]["hint"]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("pve-executor: planner at ") and "--planner-tls" in line, line


def test_plan_without_a_client_certificate_names_the_flags(executor_cli: Callable[..., list[str]],
                                                           mtls_planner: server.Running, pki: Pki) -> None:
    """`plan` with TLS but no client certificate at a mutual-TLS planner: exit 1, one line, the two flags."""
    result = _run(executor_cli(f"127.0.0.1:{mtls_planner.port}", "plan", "--planner-ca", pki.ca))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "--planner-client-cert" in line and "--planner-client-key" in line, line


def test_a_key_that_does_not_fit_its_certificate_is_a_config_error(executor_cli: Callable[..., list[str]],
                                                                   mtls_planner: server.Running, pki: Pki) -> None:
    """The client key of another pair: exit 2 before any connection, naming both flags and both files."""
    result = _run(executor_cli(f"127.0.0.1:{mtls_planner.port}", "plan", "--planner-ca", pki.ca,
                               "--planner-client-cert", pki.client_cert, "--planner-client-key", pki.rogue_key))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert pki.client_cert in line and pki.rogue_key in line, line
    assert "--planner-client-cert" in line and "--planner-client-key" in line, line
