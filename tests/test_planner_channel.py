"""How the executor reaches its planners: TLS, mutual TLS, and round robin over two, one of which goes away."""

from __future__ import annotations

import pytest

from common.grpcserver import ClientTls, ServerTls
from executor.loop.planner_client import PlannerClient, PlannerUnavailableError
from planner import server
from tests.builders import ONE_GUEST
from tests.certs import Pki
from tests.executor_helpers import unused_port


def test_mutual_tls_between_executor_and_planner(mtls_planner: server.Running, pki: Pki) -> None:
    """With a client CA set, only clients holding a certificate it signed get a plan."""
    target = f"127.0.0.1:{mtls_planner.port}"
    trusted = PlannerClient(target, tls=ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key))
    assert len(trusted.plan(*ONE_GUEST).actions) == 1
    for refused in (ClientTls(ca=pki.ca),  # no client certificate
                    ClientTls(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)):  # signed by another CA
        with pytest.raises(PlannerUnavailableError):
            PlannerClient(target, tls=refused, deadline=3, attempts=1).plan(*ONE_GUEST)
    with pytest.raises(PlannerUnavailableError):
        PlannerClient(target, deadline=3, attempts=1).plan(*ONE_GUEST)  # plaintext


def test_tls_client_verifies_the_planner(pki: Pki) -> None:
    """A TLS planner is reached with its CA, and refused when the client trusts another CA."""
    running = server.start("127.0.0.1:0", tls=ServerTls(cert=pki.server_cert, key=pki.server_key))
    try:
        target = f"127.0.0.1:{running.port}"
        assert PlannerClient(target, tls=ClientTls(ca=pki.ca)).plan(*ONE_GUEST).actions
        with pytest.raises(PlannerUnavailableError):
            PlannerClient(target, tls=ClientTls(ca=pki.other_ca), deadline=3, attempts=1).plan(*ONE_GUEST)
    finally:
        server.stop(running, 1)


def test_two_planners_behind_one_channel_and_one_going_away() -> None:
    """round_robin over two planners spreads the calls; when one stops, the other serves them all."""
    first, second = server.start("127.0.0.1:0"), server.start("127.0.0.1:0")
    try:
        client = PlannerClient(f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}", deadline=5)
        for _ in range(20):
            client.plan(*ONE_GUEST)

        def served(running: server.Running) -> float:
            return float(running.metrics.plans.labels("ok")._value.get())

        assert served(first) > 0 and served(second) > 0
        server.stop(first, 0)
        before = served(second)
        for _ in range(10):
            assert client.plan(*ONE_GUEST).actions
        assert served(second) == before + 10
    finally:
        server.stop(second, 1)


def test_a_planner_started_where_another_client_was_refused_is_reached_at_once() -> None:
    """gRPC shares a subchannel per address across a process's channels: without a pool of its own, a client made
    after a refused connection to that address (a planner that was down, a port used before) inherits the stale
    failure and its backoff, and its first tick reports ``connection refused`` while the planner serves."""
    port = unused_port()
    earlier = PlannerClient(f"127.0.0.1:{port}", deadline=2, attempts=1)  # still open, as another test's may be
    with pytest.raises(PlannerUnavailableError):
        earlier.plan(*ONE_GUEST)
    running = server.start(f"127.0.0.1:{port}")
    try:
        assert PlannerClient(f"127.0.0.1:{port}", deadline=5, attempts=1).plan(*ONE_GUEST).actions
    finally:
        server.stop(running, 1)
        earlier.close()
