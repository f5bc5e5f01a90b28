"""tests.executor_helpers.unused_port under pytest-xdist: no two workers, nor the kernel, hand out the same port."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.executor_helpers import unused_port, worker_slice


def _ephemeral() -> range:
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii").split())
    return range(low, high + 1)


def test_unused_ports_are_the_workers_own_below_the_ephemeral_range_and_never_repeat() -> None:
    """A bind-0-then-release port came from the range bind(0) and every outgoing connection draw from: another
    worker's server could take it before the daemon it was meant for bound it."""
    ports = [unused_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(port in worker_slice() and port not in _ephemeral() for port in ports), ports
    with socket.socket() as kernels:  # what the kernel picks is never in a slice
        kernels.bind(("127.0.0.1", 0))
        assert kernels.getsockname()[1] not in worker_slice()


def test_each_worker_has_its_own_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """gw0..gw7 (and a serial run, gw0's) get disjoint slices, all below the ephemeral range."""
    slices = []
    for index in range(8):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
        slices.append(set(worker_slice()))
    assert sum(len(s) for s in slices) == len(set().union(*slices))
    assert max(set().union(*slices)) < _ephemeral().start
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert set(worker_slice()) == slices[0]
