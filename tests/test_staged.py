"""A change PVE stages for the next restart (issue 15): written once, then shown as staged, never re-planned.

Against fakepve answering like PVE (``tests.pve_like``): a running QEMU guest's ``memory`` is not
hotplugged, so PVE keeps it in the config's [PENDING] section, and ``GET .../config`` answers with it
applied. The executor writes it once, and ``plan``, the tick's summary and its log say it is
"staged, applies at the next restart" until a restart applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from executor.api.server import start_api
from executor.loop.desired import Declared
from executor.loop.engine import Engine
from executor.v1 import executor_pb2 as pb
from executor.v1 import executor_pb2_grpc as pb_grpc
from tests import pve_like

Make = Callable[..., Engine]
CONFIG_WRITES = ("POST", "PUT")


@pytest.fixture(name="fakepve")
def _fakepve(_fakepve_pki: tuple[str, str]) -> Iterator[pve_like.PveLike]:
    """This module's fakepve answers like PVE."""
    with pve_like.serving(_fakepve_pki) as pve:
        yield pve


def config_writes(fakepve: Any, vmid: int) -> list[tuple[str, str]]:
    """The config writes Proxmox received for ``vmid``."""
    return [(m, p) for m, p, _ in fakepve.requests if m in CONFIG_WRITES and p.endswith(f"/qemu/{vmid}/config")]


def pending_reads(fakepve: Any, vmid: int) -> int:
    """The GETs of guest ``vmid``'s /pending Proxmox received."""
    return sum(1 for m, p, _ in fakepve.requests if m == "GET" and p.endswith(f"/qemu/{vmid}/pending"))


def test_a_staged_change_is_written_once_and_reported_staged(fakepve: Any, make_engine: Make) -> None:
    """Four ticks: one config write, then three that plan nothing for the guest and count it staged (logged
    once, with the words plan uses). /pending is read again only when the digest moved: after the write."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024})
    engine = make_engine([Declared(vmid=100, config={"memory": "2048"})])
    first = engine.tick(wait=True)
    assert (first.queued, first.succeeded, first.staged, fakepve.vm(100).pending) == (1, 1, 0, {"memory": "2048"})
    with capture_logs() as logs:
        later = [engine.tick(wait=True) for _ in range(3)]
    assert [(s.queued, s.staged) for s in later] == [(0, 1)] * 3
    assert config_writes(fakepve, 100) == [("POST", "/api2/json/nodes/pve1/qemu/100/config")]
    assert [(e["vmid"], e["keys"], e["note"]) for e in logs if e["event"] == "config_staged"] == [
        (100, ["memory"], "staged, applies at the next restart")]
    assert [e["staged"] for e in logs if e["event"] == "tick"] == [1, 1, 1]
    assert pending_reads(fakepve, 100) == 2  # the first tick's, and the one after the write moved the digest


def test_a_restart_applies_it_and_it_is_no_longer_staged(fakepve: Any, make_engine: Make) -> None:
    """Once a restart applies the pending section, nothing is staged and nothing is written."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024})
    engine = make_engine([Declared(vmid=100, config={"memory": "2048"})])
    engine.tick(wait=True)
    assert engine.tick(wait=True).staged == 1
    fakepve.vm(100).apply_pending()  # what PVE's start does (a restart outside the executor)
    after = engine.tick(wait=True)
    assert (after.queued, after.staged, len(config_writes(fakepve, 100))) == (0, 0, 1)


def test_status_counts_the_staged_guests(fakepve: Any, make_engine: Make) -> None:
    """GetStatus's last tick carries guests_staged."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024})
    engine = make_engine([Declared(vmid=100, config={"memory": "2048"})])
    engine.tick(wait=True)
    engine.tick(wait=True)
    api = start_api(engine, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            status = pb_grpc.ExecutorServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
    finally:
        api.stop(0)
    assert (status.last_tick.guests_staged, status.last_tick.actions_queued) == (1, 0)
