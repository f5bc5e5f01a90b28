"""Red team (issue 13, second pass): blast radius, replays and the digest ABA, the API socket.

Each hole is an ``xfail(strict=True)`` test that shows it against a real engine on fakepve (HTTPS),
a real journal and, for the API, the real Unix-socket front; each counts what Proxmox received.
The plain tests are attacks that held, kept because they show why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from executor.desired import Declared, FileProvider, provider_source
from executor.engine import Engine
from executor.opapi import to_proto
from executor.pve import ProxmoxNode
from executor.server import start_api
from executor.v1 import executor_pb2 as epb
from executor.v1 import executor_pb2_grpc as epb_grpc
from safety.classify import Source
from tests.executor_helpers import HeldReads
from tests.signed_helpers import add_vm, open_desk
from tests.test_api_socket import _sock_dir  # noqa: F401  (the sock_dir fixture)
from tests.test_blast_drain import stopped, write_hub

Make = Callable[..., Engine]


# --- blast radius ---------------------------------------------------------------------------------------------

@pytest.mark.xfail(strict=True, reason="H-A: guests stopped before the hub came count as managed and running: "
                   "a hub that declares them (no run state) dilutes the half rule and stops every running guest")
def test_a_hub_drains_every_running_guest_by_declaring_the_stopped_ones(fakepve: Any, make_engine: Make,
                                                                      tmp_path: Path) -> None:
    """Five running guests, five stopped by their owners (off, or templates). The hub declares all ten, the
    five stopped ones with no run state, and the five running ones stopped. ``managed`` is ten and nothing
    counts as already stopped, so 2 * stops never exceeds it: three windows later the node runs nothing,
    no approval asked."""
    for vmid in range(100, 110):
        fakepve.add_vm(vmid, f"vm{vmid}", status="running" if vmid < 105 else "stopped")
    desired = tmp_path / "desired.yaml"
    write_hub(desired, {**{v: "stopped" for v in range(100, 105)}, **{v: None for v in range(105, 110)}})
    engine = make_engine([], stop_window=0.0)  # every tick a new window: only the half rule holds the hub
    engine.provider = FileProvider(desired)
    assert provider_source(engine.provider) is Source.HUB
    refusals = []
    for _ in range(4):
        refusals.extend(engine.tick(wait=True).refusals)
    running = sorted(vm.vmid for vm in fakepve.vms if vm.status == "running")
    assert running, f"the hub stopped every running guest of the node ({stopped(fakepve)}), refusals: {refusals}"


# --- the API socket ---------------------------------------------------------------------------------------------

@pytest.mark.xfail(strict=True, reason="H-B: Reconcile has no rate and no per-caller share of the API's 4 workers: "
                   "one member of the group queues ticks and another's SubmitOp waits behind all of them")
def test_one_callers_reconcile_queue_starves_anothers_submit(fakepve: Any, node: ProxmoxNode, make_engine: Make,
                                                              tmp_path: Path, sock_dir: Path) -> None:
    """One connection (well within the front's 32 per uid) opens 20 Reconcile calls at once; each runs a
    whole tick (0.2 s here: a slow Proxmox), one tick at a time. The operator's valid op, sent just after,
    queues behind them in gRPC's pool and misses a 3 s deadline (every queued call is a whole tick of reads)."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path, [Declared(vmid=100, state="stopped")],
                     pve=HeldReads(node, every=lambda: time.sleep(0.2)))
    envelope = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    path = sock_dir / "executor.sock"
    api = start_api(desk.engine, f"unix:{path}", desk=desk.desk)
    calls: list[Any] = []
    try:
        with grpc.insecure_channel(f"unix:{path}") as flooder, grpc.insecure_channel(f"unix:{path}") as channel:
            stub = epb_grpc.ExecutorServiceStub(flooder)
            calls = [stub.Reconcile.future(epb.ReconcileRequest(), timeout=20) for _ in range(20)]
            time.sleep(0.3)
            started = time.monotonic()
            try:
                answer = epb_grpc.ExecutorServiceStub(channel).SubmitOp(epb.SubmitOpRequest(op=to_proto(envelope)),
                                                                       timeout=3)
                decision = answer.decision
            except grpc.RpcError as exc:
                decision = exc.code().name
            waited = time.monotonic() - started
            for call in calls:  # bounded: 20 ticks of 0.2 s; the server stops with none left running
                call.exception(timeout=20)
    finally:
        api.stop(0)
    assert decision == "accepted", f"the operator's op: {decision} after {waited:.1f} s, {desk.engine.ticks} ticks"
