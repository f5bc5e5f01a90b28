"""The rejection matrix of SAFETY-DESIGN §6 against the real executor: each test names its row.

Rows 6-37 and 46 (the offline checks) have unit tests in tests/test_signedop.py and test_truststore.py,
rows 42-43 in tests/test_gate.py. Here the rows that need the executor: a real engine, gate, lane and
journal in process (``open_desk``: fakepve over HTTPS, the real planner) and its OpDesk, signing with
the payload builder ``op sign`` uses. The crash rows (3, 4) kill a real daemon: tests/test_signed_e2e.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from executor.desired import Declared
from executor.engine import Engine
from executor.opdoc import Proposal as Unsigned
from journal import Ended, Refused
from safety.classify import Source
from safety.payload import parse_payload
from tests.signed_helpers import add_vm, mutations, open_desk, spent

Make = Callable[..., Engine]


def test_row45_a_backup_lock_holds_a_destroy_until_it_ends(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Row 45: a destroy submitted while a backup holds ``lock: backup`` is LOCKED, not run, retried each tick,
    and runs once the backup ends. PVE writes the lock into the config, so the digest moves while it is held
    and comes back after: the lock is checked before the digest, or the op would be dropped as DIGEST_STALE."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", purge=False, destroy_unreferenced_disks=False),
                         "alice", "bob", role="destroyer")
    fakepve.snapshot_lock(100, "backup")  # the state a running vzdump leaves: lock: backup in the config
    before = len(fakepve.requests)
    with capture_logs() as logs:
        op_id, refusal = desk.run(envelope)
        assert refusal is None and desk.desk.accepted() == 1  # accepted, waiting for the lock
        for _ in range(2):
            desk.engine.tick(wait=True)
            desk.settle()
    locked = [e for e in logs if e["event"] == "gate_refused" and e["reason"] == "LOCKED"]
    assert len(locked) == 3  # at the submit and at each of the two ticks
    assert mutations(fakepve, before) == [] and not spent(desk, op_id)
    assert next((r.reason, r.op_id) for r in desk.records() if isinstance(r, Refused)) == ("LOCKED", op_id)
    fakepve.unlock(100)
    desk.engine.tick(wait=True)
    desk.settle()
    assert fakepve.vm(100) is None and desk.desk.accepted() == 0
    assert mutations(fakepve, before) == [("DELETE", "/api2/json/nodes/pve1/qemu/100")]
    assert spent(desk, op_id)


def test_row45_a_lock_that_outlasts_the_op_drops_it_unrun(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Row 45: an op still LOCKED when it expires is dropped at the next tick, never run, its nonce unspent
    (and, expired, it can never run: a resubmit is refused EXPIRED)."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", purge=False, destroy_unreferenced_disks=False),
                         "alice", "bob", role="destroyer", ttl=1)
    fakepve.snapshot_lock(100, "backup")
    op_id, refusal = desk.run(envelope)
    assert refusal is None and desk.desk.accepted() == 1
    not_after = parse_payload(envelope.payload).not_after
    while desk.desk.clock.now() < not_after:
        time.sleep(0.05)
    with capture_logs() as logs:
        desk.engine.tick(wait=True)
    assert [e["op_id"] for e in logs if e["event"] == "op_expired_waiting"] == [op_id]
    assert desk.desk.accepted() == 0
    fakepve.unlock(100)
    desk.engine.tick(wait=True)
    desk.settle()
    assert fakepve.vm(100) is not None and not spent(desk, op_id)
    assert not [r for r in desk.records() if isinstance(r, Ended)]
    assert desk.submit(envelope)[1].reason == "EXPIRED"  # type: ignore[union-attr]


def test_row43_approved_stops_of_a_hub_run_each_and_leave_the_list(fakepve: Any, make_engine: Make,
                                                                     tmp_path: Path) -> None:
    """Row 43, its approval: a hub stopping 3 of 5 guests gets each stop listed for approval. Signing two of
    the listed entries (operator, threshold 1) and submitting them one after the other runs both, and
    nothing else: a SubmitOp leaves the other entries listed (the second approval still matches its entry),
    and the next tick drops the entries of the guests that converged, keeping the one still refused."""
    for vmid in range(110, 115):
        add_vm(fakepve, vmid, disks=1, status="running")
    declared = [Declared(vmid=v, state="stopped" if v < 113 else "running") for v in range(110, 115)]
    desk = open_desk(make_engine, tmp_path, declared, source=Source.HUB)
    refused = desk.engine.tick(wait=True).refusals
    assert [(r.vmid, r.reason) for r in refused] == [(110, "APPROVAL_REQUIRED"), (111, "APPROVAL_REQUIRED"),
                                                     (112, "APPROVAL_REQUIRED")]
    entries = {p.vmid: Unsigned(action=json.loads(p.descriptor), challenge=None) for p in desk.engine.gate.pending()}
    assert sorted(entries) == [110, 111, 112]
    before = len(fakepve.requests)
    for vmid in (110, 111):
        assert desk.run(desk.sign(entries[vmid], "alice", role="operator"))[1] is None
        assert sorted(p.vmid for p in desk.engine.gate.pending()) == [110, 111, 112]
    assert [fakepve.vm(v).status for v in range(110, 115)] == ["stopped", "stopped", "running", "running", "running"]
    assert [p for _, p in mutations(fakepve, before)] == [f"/api2/json/nodes/pve1/qemu/{v}/status/shutdown"
                                                          for v in (110, 111)]
    desk.engine.tick(wait=True)
    assert [p.vmid for p in desk.engine.gate.pending()] == [112]
