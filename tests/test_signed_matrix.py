"""The rejection matrix of docs/SAFETY.md §12 against the real executor: each test names its row.

Rows 6-37 and 46 (the offline checks) have unit tests in tests/test_signedop.py and test_truststore.py,
rows 42-43 in tests/test_gate.py. Here the rows that need the executor: a real engine, gate, lane and
journal in process (``open_desk``: fakepve over HTTPS, the real planner) and its OpDesk, signing with
the payload builder ``op sign`` uses. The crash rows (3, 4) run ``pve-executor run`` as a process and kill it
with SIGKILL while fakepve holds its Proxmox call.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from executor.api.server import start_api
from executor.app.wiring import open_journal
from executor.gate.decisions import Refusal
from executor.loop.desired import Declared, StaticProvider
from executor.loop.engine import Engine
from executor.signed.clock import mark_nonces
from executor.v1 import executor_pb2 as epb
from executor.v1 import executor_pb2_grpc as epb_grpc
from journal import Begun, Ended, Journal, JournalCorruptError, Outcome, RefusalRecord, TaskStarted
from opctl.doc import Proposal
from planner import server
from safety.classify import Source
from safety.payload import parse_payload
from safety.signedop import Envelope
from tests.executor_helpers import ROOT, unused_port
from tests.signed_helpers import (
    Daemon,
    HeldRequest,
    add_vm,
    api_propose,
    api_submit,
    hold_lane,
    journal_files,
    mutations,
    op_refusal,
    open_desk,
    records_on_disk,
    run_command,
    signed_by,
    spent,
)
from tests.tmpfs import tiny_filesystem

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
    assert next((r.reason, r.op_id) for r in desk.records() if isinstance(r, RefusalRecord)) == ("LOCKED", op_id)
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


def test_row45_a_backup_lock_holds_a_config_op_without_spending_it(fakepve: Any, make_engine: Make,
                                                                  tmp_path: Path) -> None:
    """Row 45 for a config op: its step carries the signed digest, which the lock moved. The lock is checked
    before any digest, so the detach is LOCKED and retried, never refused as stale (that would spend it),
    and runs once the backup ends."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "config.disk_detach", **DETACH), "alice", "bob", role="destroyer")
    fakepve.snapshot_lock(100, "backup")
    op_id, refusal = desk.run(envelope)
    assert refusal is None and desk.desk.accepted() == 1 and not spent(desk, op_id)
    fakepve.unlock(100)
    desk.engine.tick(wait=True)
    desk.settle()
    assert "scsi1" not in fakepve.vm(100).config and spent(desk, op_id)


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
    entries = {p.vmid: Proposal(action=json.loads(p.descriptor), challenge=None) for p in desk.engine.gate.pending()}
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



def test_row43_an_approval_no_longer_listed_is_class_mismatch_and_not_spent(fakepve: Any, make_engine: Make,
                                                                           tmp_path: Path) -> None:
    """Row 43, a class mismatch from the gate's side: an approved hub stop is APPROVAL only while its entry is
    listed. The hub stops declaring the stops, the tick drops the entries, and the signed stop is
    CLASS_MISMATCH with the guest exactly as signed: a transient refusal, so it is not spent. Once the hub
    asks again and the entry is listed again, the same envelope runs."""
    for vmid in range(110, 115):
        add_vm(fakepve, vmid, disks=1, status="running")
    asks = [Declared(vmid=v, state="stopped" if v < 113 else "running") for v in range(110, 115)]
    desk = open_desk(make_engine, tmp_path, asks, source=Source.HUB)
    desk.engine.tick(wait=True)
    (entry,) = [p for p in desk.engine.gate.pending() if p.vmid == 110]
    envelope = desk.sign(Proposal(action=json.loads(entry.descriptor), challenge=None), "alice", role="operator")
    provider = desk.engine.provider
    assert isinstance(provider, StaticProvider)
    provider.guests = [Declared(vmid=v, state="running") for v in range(110, 115)]
    desk.engine.tick(wait=True)
    assert desk.engine.gate.pending() == []
    op_id, refusal = desk.run(envelope)
    assert _reason((op_id, refusal)) == "CLASS_MISMATCH" and not spent(desk, op_id)
    provider.guests = asks
    desk.engine.tick(wait=True)
    before = len(fakepve.requests)
    assert desk.run(envelope)[1] is None and spent(desk, op_id)
    assert [p for _, p in mutations(fakepve, before)] == ["/api2/json/nodes/pve1/qemu/110/status/shutdown"]


# --- replays and races ------------------------------------------------------------------------------------

DETACH = {"delete": ["scsi1"]}


def test_row1_replaying_an_op_that_ran_is_nonce_spent(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Row 1: a detach runs once; the same envelope again is NONCE_SPENT and sends nothing."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "config.disk_detach", **DETACH), "alice", "bob", role="destroyer")
    op_id, refusal = desk.run(envelope)
    assert refusal is None and "scsi1" not in fakepve.vm(100).config and spent(desk, op_id)
    before = len(fakepve.requests)
    assert _reason(desk.run(envelope)) == "NONCE_SPENT"
    assert mutations(fakepve, before) == []


def test_row2_replaying_an_op_whose_run_failed_is_nonce_spent(fakepve: Any, make_engine: Make,
                                                              tmp_path: Path) -> None:
    """Row 2: the detach's write fails at PVE; the nonce stays spent (burn keys are never released), so the
    same envelope is NONCE_SPENT and the write is never tried again: the operator re-signs."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "config.disk_detach", **DETACH), "alice", "bob", role="destroyer")
    fakepve.fail("POST", "/nodes/pve1/qemu/100/config", 500, "storage busy", times=1)
    op_id, refusal = desk.run(envelope)
    assert refusal is None and "scsi1" in fakepve.vm(100).config
    assert [r.outcome for r in desk.records() if isinstance(r, Ended)] == [Outcome.FAILED] and spent(desk, op_id)
    before = len(fakepve.requests)
    assert _reason(desk.run(envelope)) == "NONCE_SPENT"
    assert mutations(fakepve, before) == [] and "scsi1" in fakepve.vm(100).config


def test_row5_the_same_op_submitted_twice_at_once_runs_once(fakepve: Any, make_engine: Make,
                                                             tmp_path: Path) -> None:
    """Row 5: two SubmitOp calls with one envelope, at once (the destroy held at PVE so neither can finish
    first): one is accepted, the other NONCE_IN_FLIGHT; the destroy is sent once."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    held = HeldRequest(fakepve, "DELETE", "/nodes/pve1/qemu/100")
    start = threading.Barrier(2)

    def submit() -> str:
        start.wait(5)
        return _reason(desk.submit(envelope))

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            answers = sorted(pool.map(lambda _: submit(), range(2)))
    finally:
        held.release()
    desk.settle()
    assert answers == ["NONCE_IN_FLIGHT", "accepted"]
    assert fakepve.vm(100) is None
    assert [m for m, p in mutations(fakepve) if p.endswith("/qemu/100")] == ["DELETE"]


def test_no_op_is_proposed_or_submitted_while_recovery_runs(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """An op checked against a journal whose in-flight operations are not resolved yet could run twice:
    while the daemon recovers, ProposeOp and SubmitOp answer UNAVAILABLE (and the tick waits too)."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    desk.engine.recovering.set()
    api = start_api(desk.engine, "127.0.0.1:0", desk=desk.desk)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            stub = epb_grpc.ExecutorServiceStub(channel)
            signed = epb.SignedOp(payload_type=envelope.payload_type, payload=envelope.payload,
                                  signatures=[epb.OpSignature(keyid=s.keyid, sig=s.sig) for s in envelope.signatures])
            with pytest.raises(grpc.RpcError) as proposing:
                stub.ProposeOp(epb.ProposeOpRequest(vmid=100, kind="snapshot.create", params_json='{"snapname": "s2"}'),
                               timeout=5)
            with pytest.raises(grpc.RpcError) as submitting:
                stub.SubmitOp(epb.SubmitOpRequest(op=signed), timeout=5)
            assert proposing.value.code() is submitting.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        api.stop(0)
    assert fakepve.vm(100).snapshots == {}


def test_an_approval_op_from_before_a_wiped_state_dir_never_runs(fakepve: Any, make_engine: Make,
                                                                 tmp_path: Path) -> None:
    """Beyond the matrix: an APPROVAL op carries no challenge, so a wiped state_dir (a new journal that never
    saw its nonce spent) would let it run again within its 24 h. A new gate secret sets the clock floor:
    the op, run once on the old state, is refused on the new one as signed before this state began."""
    add_vm(fakepve, 100)
    old = open_desk(make_engine, tmp_path)
    envelope = old.sign(old.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    assert old.run(envelope)[1] is None and "s1" in fakepve.vm(100).snapshots
    time.sleep(1.05)  # payload times are whole seconds: the new state begins a second later
    fresh = open_desk(make_engine, tmp_path)  # another state dir: the spent nonce is not in its journal
    before = len(fakepve.requests)
    refusal = fresh.run(envelope)[1]
    assert refusal is not None and refusal.reason == "EXPIRED" and "state began" in refusal.detail
    assert mutations(fakepve, before) == []


def test_row48_two_ops_for_one_action_run_it_once(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Row 48: the same detach signed twice (two nonces): the first runs, the second is DIGEST_STALE (the
    first changed the config), whether it comes after or is already queued behind it; that spends it too."""
    add_vm(fakepve, 100)
    add_vm(fakepve, 101)
    desk = open_desk(make_engine, tmp_path)
    for vmid in (100, 101):
        proposal = desk.propose(vmid, "config.disk_detach", **DETACH)
        first, second = (desk.sign(proposal, "alice", "bob", role="destroyer") for _ in range(2))
        if vmid == 100:  # one after the other
            assert desk.run(first)[1] is None
            op_id, refusal = desk.run(second)
            assert _reason((op_id, refusal)) == "DIGEST_STALE"
        else:  # both accepted before either ran: the lane refuses the second on the config it reads
            gate = hold_lane(desk, vmid)
            assert desk.submit(first)[1] is None
            op_id, refusal = desk.submit(second)
            gate.set()
            desk.settle()
            assert refusal is None and _lane_refusal(desk, op_id) == "DIGEST_STALE"
        assert "scsi1" not in fakepve.vm(vmid).config and spent(desk, op_id)
    assert len([p for m, p in mutations(fakepve) if p.endswith("/config")]) == 2


# --- the guest moved on ------------------------------------------------------------------------------------

def test_row13_an_op_for_another_config_version_is_digest_stale(fakepve: Any, make_engine: Make,
                                                                tmp_path: Path) -> None:
    """Row 13: a destroy signed before an administrator's edit is DIGEST_STALE at admission; one accepted
    and then edited while it waits in the guest's lane is DIGEST_STALE in the lane. Neither runs, and both
    are spent (a digest can come back: tests/test_signed_attacks.py hole H): the operators re-sign, and
    the fresh proposal runs."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    stale = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    fakepve.vm(100).config["memory"] = 4096
    stale_id, refusal = desk.run(stale)
    assert _reason((stale_id, refusal)) == "DIGEST_STALE"
    queued = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    gate = hold_lane(desk, 100)
    queued_id, refusal = desk.submit(queued)
    fakepve.vm(100).config["memory"] = 8192
    gate.set()
    desk.settle()
    assert refusal is None and _lane_refusal(desk, queued_id) == "DIGEST_STALE"
    assert fakepve.vm(100) is not None and spent(desk, stale_id) and spent(desk, queued_id)
    assert [_reason(desk.run(envelope)) for envelope in (stale, queued)] == ["NONCE_SPENT", "NONCE_SPENT"]
    fresh = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    assert desk.run(fresh)[1] is None and fakepve.vm(100) is None


# The kinds PVE takes no digest for, with their params (DESTROY's, which is defined further down).
NO_DIGEST: dict[str, dict[str, Any]] = {"guest.destroy": {"purge": False, "destroy_unreferenced_disks": False},
                                        "snapshot.delete": {"snapname": "s1"}, "snapshot.rollback": {"snapname": "s1"}}


@pytest.mark.parametrize("kind", sorted(NO_DIGEST))
def test_row13_a_kind_pve_takes_no_digest_for_is_compared_on_the_lanes_last_read(
        kind: str, fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Row 13 where PVE cannot help: destroy, rollback and snapshot delete take no digest, so the lane compares
    the signed digest with the config read just before the call (docs/SAFETY.md §5.2). The window is widened on purpose:
    the op is admitted, and an administrator's edit lands while fakepve holds the lane's config read, after
    every earlier check. DIGEST_STALE, the op spent, and fakepve received no destroy, rollback or delete."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    if kind != "guest.destroy":
        assert desk.run(desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator"))[1] \
            is None
    envelope = desk.sign(desk.propose(100, kind, **NO_DIGEST[kind]), "alice", "bob", role="destroyer")
    gate = hold_lane(desk, 100)
    op_id, refusal = desk.submit(envelope)
    assert refusal is None  # admitted on the signed digest
    held = HeldRequest(fakepve, "GET", "/qemu/100/config")
    before = len(fakepve.requests)
    gate.set()
    try:
        assert held.seen.wait(20), "the lane never read the config"
        fakepve.vm(100).config["memory"] = 8192  # PVE answers the read after the edit
    finally:
        held.release()
    desk.settle()
    assert _lane_refusal(desk, op_id) == "DIGEST_STALE" and spent(desk, op_id)
    assert mutations(fakepve, before) == []
    assert fakepve.vm(100) is not None and (kind == "guest.destroy" or "s1" in fakepve.vm(100).snapshots)


def test_row13_a_binding_mismatch_because_the_guest_moved_spends_the_op(fakepve: Any, make_engine: Make,
                                                                        tmp_path: Path) -> None:
    """Row 13 when the change also changes the op's kind: a MAC change (config.nic_identity) is accepted; while
    it waits in the lane an administrator sets that MAC by hand, so the write is no NIC identity change any
    more: BINDING_MISMATCH (the kind, named before the digest), with the guest at another digest. That is a
    refusal for the guest's state: spent. The administrator puts the old MAC back (the signed digest with
    it), and the envelope replayed is NONCE_SPENT; nothing was sent for it."""
    old, new = "virtio=BC:24:11:00:00:01,bridge=vmbr0", "virtio=BC:24:11:00:00:02,bridge=vmbr0"
    add_vm(fakepve, 100, net0=old)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "config.nic_identity", set={"net0": new}), "alice", role="operator")
    gate = hold_lane(desk, 100)
    op_id, refusal = desk.submit(envelope)
    assert refusal is None
    fakepve.vm(100).config["net0"] = new
    before = len(fakepve.requests)
    gate.set()
    desk.settle()
    assert _lane_refusal(desk, op_id) == "BINDING_MISMATCH" and spent(desk, op_id)
    fakepve.vm(100).config["net0"] = old
    assert _reason(desk.run(envelope)) == "NONCE_SPENT"
    assert mutations(fakepve, before) == [] and fakepve.vm(100).config["net0"] == old


def test_row14_a_destroyed_and_recreated_vmid_is_digest_stale(fakepve: Any, make_engine: Make,
                                                              tmp_path: Path) -> None:
    """Row 14: a destroy signed for guest 100; 100 is destroyed out of band and created again (PVE gives a
    new guest a new SMBIOS uuid): the op is DIGEST_STALE and the new guest stays; the op is spent."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    fakepve.vms.remove(fakepve.vm(100))
    add_vm(fakepve, 100, smbios1="uuid=0c6a3d27-7c1e-4d8a-9a41-5d8f0e0f1a2b")
    op_id, refusal = desk.run(envelope)
    assert _reason((op_id, refusal)) == "DIGEST_STALE"
    assert fakepve.vm(100) is not None and spent(desk, op_id)


def test_beyond_the_matrix_a_vmid_recreated_as_another_guest_type_is_binding_mismatch(
        fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Not in the matrix (row 14's sibling): a detach signed for QEMU guest 101, and 101 re-created as a
    container. The op's guest type no longer binds: BINDING_MISMATCH, nothing sent, the op spent (the guest
    is not the one signed for: a refusal for the guest's state spends, like DIGEST_STALE)."""
    add_vm(fakepve, 101)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(101, "config.disk_detach", **DETACH), "alice", "bob", role="destroyer")
    fakepve.vms.remove(fakepve.vm(101))
    fakepve.add_ct(101, "box")
    before = len(fakepve.requests)
    op_id, refusal = desk.run(envelope)
    assert _reason((op_id, refusal)) == "BINDING_MISMATCH"
    assert mutations(fakepve, before) == [] and spent(desk, op_id)


def test_row44_a_protected_guest_is_not_destroyed_until_protection_is_cleared_by_its_own_op(
        fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Row 44: a destroy of a guest with protection=1 is refused PROTECTED before the call, nonce unspent.
    Clearing protection is its own approved op (config.protection_off, operator); after it, the same
    envelope is DIGEST_STALE (the config moved), and a destroy proposed afresh runs."""
    add_vm(fakepve, 100, protection=1)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    op_id, refusal = desk.run(envelope)
    assert refusal is None and _lane_refusal(desk, op_id) == "PROTECTED"
    assert fakepve.vm(100) is not None and not spent(desk, op_id)
    off = desk.sign(desk.propose(100, "config.protection_off", delete=["protection"]), "alice", role="operator")
    assert desk.run(off)[1] is None and "protection" not in fakepve.vm(100).config
    assert _reason(desk.run(envelope)) == "DIGEST_STALE"
    again = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    assert desk.run(again)[1] is None and fakepve.vm(100) is None


def test_beyond_the_matrix_an_op_that_expires_while_queued_never_runs(fakepve: Any, make_engine: Make,
                                                                      tmp_path: Path) -> None:
    """Not in the matrix (row 6 in the lane): an op accepted while valid but still queued behind the guest's
    work when it expires is refused EXPIRED in the lane, right before the call: not run, nonce unspent."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer", ttl=1)
    gate = hold_lane(desk, 100)
    op_id, refusal = desk.submit(envelope)
    assert refusal is None
    not_after = parse_payload(envelope.payload).not_after
    while desk.desk.clock.now() < not_after:
        time.sleep(0.05)
    gate.set()
    desk.settle()
    assert _lane_refusal(desk, op_id) == "EXPIRED"
    assert fakepve.vm(100) is not None and not spent(desk, op_id)


def test_beyond_the_matrix_a_key_smuggled_into_an_approved_config_op_is_class_mismatch(
        fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Not in the matrix: an operator key (APPROVAL only) signs a config.protection_off that also sets a
    hookscript (host code, DESTRUCTIVE). The operator role names no config.host_code: ROLE_DENIES (were it
    named, the gate would class the whole write DESTRUCTIVE: CLASS_MISMATCH); nothing sent."""
    add_vm(fakepve, 100, protection=1)
    desk = open_desk(make_engine, tmp_path)
    action = json.loads(desk.propose(100, "config.protection_off", delete=["protection"]).action)
    action["params"]["set"] = {"hookscript": "local:snippets/evil.sh"}
    before = len(fakepve.requests)
    op_id, refusal = desk.run(desk.sign(Proposal(action=action, challenge=None), "alice", role="operator"))
    assert _reason((op_id, refusal)) == "ROLE_DENIES"
    assert mutations(fakepve, before) == [] and "hookscript" not in fakepve.vm(100).config


def test_beyond_the_matrix_a_revoked_op_never_runs(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Not in the matrix (row 34 through RevokeOp): a signed op.revoke by a key that could have signed the
    target marks it revoked before it is submitted; the destroy is then OP_REVOKED, never sent, its nonce
    never spent, and a second revocation is refused."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    target = parse_payload(envelope.payload).op_id
    revocation = desk.sign(desk.propose(100, "op.revoke", op_id=target), "alice", role="operator")
    assert desk.desk.revoke(revocation) == (target, None)
    before = len(fakepve.requests)
    assert _reason(desk.run(envelope)) == "OP_REVOKED"
    assert mutations(fakepve, before) == [] and fakepve.vm(100) is not None and not spent(desk, target)
    again = desk.sign(desk.propose(100, "op.revoke", op_id=target), "alice", role="operator")
    assert desk.desk.revoke(again)[1] is not None


# --- the journal and the clock ------------------------------------------------------------------------------

def _fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full (page by page, unbuffered, so no page is left free)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def test_row38_a_full_disk_at_begin_refuses_the_op_and_benign_work_goes_on(fakepve: Any, make_engine: Make,
                                                                           tmp_path: Path) -> None:
    """Row 38: the journal's disk fills up before the op's begin (a real, tiny tmpfs). The begin fails with
    ENOSPC: the op is refused JOURNAL_UNAVAILABLE and not run, nothing durable spent its nonce, the gate is
    benign-only from then on (a declared memory change still runs) and further signed ops are refused."""
    add_vm(fakepve, 100)
    fakepve.add_vm(101, "web", status="stopped", config={"memory": 512})
    with tiny_filesystem(tmp_path) as mount:
        desk = open_desk(make_engine, tmp_path, [Declared(vmid=101, config={"memory": "1024"})],
                         journal_dir=mount / "journal")
        journal = desk.engine.journal
        assert journal is not None
        try:
            envelope = desk.sign(desk.propose(100, "config.disk_detach", **DETACH), "alice", "bob",
                                 role="destroyer")
            mark_nonces(mount / "journal")  # this state accepted signed ops before: only the begin writes now
            _fill(mount / "filler")
            with capture_logs() as logs:
                _, refusal = desk.run(envelope)
            assert refusal is None  # admitted; the lane's begin is what met the full disk
            assert [(e["reason"], e["where"]) for e in logs if e["event"] == "gate_refused"] == [
                ("JOURNAL_UNAVAILABLE", "lane")]
            failed = [e["error"] for e in logs if e["event"] == "journal_failed_benign_only_from_now"]
            assert len(failed) == 1 and "No space left on device" in failed[0]
            assert desk.engine.journal is None and "scsi1" in fakepve.vm(100).config
            assert [p for _, p in mutations(fakepve)] == []
            assert desk.engine.tick(wait=True).succeeded == 1 and str(fakepve.vm(101).config["memory"]) == "1024"
            assert _reason(desk.submit(envelope)) == "JOURNAL_UNAVAILABLE"
        finally:
            journal.close()
        (mount / "filler").unlink()
        with Journal.open(mount / "journal") as reopened:
            assert not [k for k in (getattr(r, "key", None) for r in reopened.recent()) if k and k.startswith("op:")]
            assert not [r for r in reopened.recent() if isinstance(r, Begun)]


def test_row39_a_corrupt_journal_at_open_refuses_every_signed_op_and_benign_work_goes_on(
        fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Row 39: the journal is damaged (a record in the middle): the daemon's open finds it corrupt and runs
    journal-less. Every signed op, destructive or not, is refused JOURNAL_UNAVAILABLE and nothing is sent;
    a declared benign change still runs."""
    add_vm(fakepve, 100)
    fakepve.add_vm(101, "web", status="stopped", config={"memory": 512})
    healthy = open_desk(make_engine, tmp_path)
    ops = [healthy.sign(healthy.propose(100, "config.disk_detach", **DETACH), "alice", "bob", role="destroyer"),
           healthy.sign(healthy.propose(100, "snapshot.create", snapname="before"), "alice", role="operator")]
    journal = healthy.engine.journal
    assert journal is not None
    for n in range(20):
        journal.end(journal.begin(vmid=900, kind="start", payload={"n": n}), Outcome.OK)
    journal.close()
    (segment,) = healthy.state_dir.glob("journal-*.log")
    data = bytearray(segment.read_bytes())
    data[len(data) // 3] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError):
        Journal.open(healthy.state_dir)
    with capture_logs() as logs:
        assert open_journal(str(healthy.state_dir)) is None
    assert [e["event"] for e in logs] == ["journal_unavailable_benign_only"]
    desk = open_desk(make_engine, tmp_path, [Declared(vmid=101, config={"memory": "1024"})], journal=False)
    before = len(fakepve.requests)
    assert [_reason(desk.run(envelope)) for envelope in ops] == ["JOURNAL_UNAVAILABLE"] * 2
    assert mutations(fakepve, before) == []
    assert desk.engine.tick(wait=True).succeeded == 1
    assert [p for _, p in mutations(fakepve, before)] == ["/api2/json/nodes/pve1/qemu/101/config"]


def _journal_at(directory: Path, at: float) -> None:
    """A journal in ``directory`` whose last record was written at ``at`` (its high-water mark)."""
    with Journal.open(directory, clock=lambda: at) as journal:
        journal.refuse(vmid=100, kind="stop", reason="APPROVAL_REQUIRED", detail="written by a clock at that time")


def test_row40_a_clock_set_back_two_hours_revives_no_expired_op(fakepve: Any, make_engine: Make,
                                                               tmp_path: Path) -> None:
    """Row 40: the journal last wrote 2 h from now (when this op, valid 15 min, had long expired): the wall
    clock has jumped back 2 h. The gate's clock is the high-water mark, so the op is EXPIRED, with the
    executor's clock in the detail, and nothing runs."""
    add_vm(fakepve, 100)
    now = time.time()
    _journal_at(tmp_path / "journal-0", now + 7200)  # the directory the desk's engine opens
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer", now=now)
    assert parse_payload(envelope.payload).not_after > time.time()  # valid by the wall clock
    op_id, refusal = desk.run(envelope)
    assert refusal is not None and refusal.reason == "EXPIRED"
    # The detail rounds the clock to the second: compare the number (a prefix of its digits failed when the
    # high-water mark sat just below a multiple of 100 s and rounded up over it).
    shown = re.search(r"executor clock (\d+) ", refusal.detail)
    assert shown is not None, refusal.detail
    assert now + 7200 - 1 <= int(shown[1]) <= time.time() + 7200 + 1, refusal.detail
    assert fakepve.vm(100) is not None and not spent(desk, op_id)


def test_row41_a_clock_run_ahead_to_2040_expires_every_op_until_clock_reset(fakepve: Any, make_engine: Make,
                                                                            tmp_path: Path) -> None:
    """Row 41: a clock that ran ahead left the journal's high-water mark in 2040: every op is EXPIRED (fail
    closed, logged). ``pve-executor clock-reset`` (daemon stopped) lets the gate follow the wall clock again:
    an op signed after the reset runs; one whose not_before is earlier than the reset stays refused."""
    add_vm(fakepve, 100)
    state = tmp_path / "journal-0"
    _journal_at(state, dt.datetime(2040, 1, 1, tzinfo=dt.UTC).timestamp())
    ahead = open_desk(make_engine, tmp_path)
    # Signed seconds before the reset (payload times are whole seconds: the same second would pass).
    earlier = ahead.sign(ahead.propose(100, "snapshot.create", snapname="before"), "alice", role="operator",
                         now=time.time() - 5)
    with capture_logs() as logs:
        assert _reason(ahead.run(earlier)) == "EXPIRED"
    assert any(e["event"] == "clock_ahead_of_high_water" for e in logs)
    assert ahead.engine.journal is not None
    ahead.engine.journal.close()  # the daemon is stopped for the reset
    reset = subprocess.run([sys.executable, "-m", "executor", "clock-reset", "--state-dir", str(state),
                            "--log-format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           check=False)
    assert reset.returncode == 0 and reset.stdout.startswith("clock reset:"), reset.stderr
    floor = json.loads((state / "clock.reset").read_text())["floor"]
    after = open_desk(make_engine, tmp_path, journal_dir=state)
    refusal = after.run(earlier)[1]
    assert refusal is not None and (refusal.reason, refusal.detail) == (
        "EXPIRED", f"signed before {int(floor)}, when this executor's state began or its clock was reset")
    fresh = after.sign(after.propose(100, "config.disk_detach", **DETACH), "alice", "bob", role="destroyer",
                       now=floor + 1)  # signed a second after the reset (op sign backdates not_before by 60 s)
    assert after.run(fresh)[1] is None and "scsi1" not in fakepve.vm(100).config
    assert fakepve.vm(100).snapshots == {}


def test_row46_a_challenge_from_another_executor_is_refused(fakepve: Any, make_engine: Make,
                                                            tmp_path: Path) -> None:
    """Row 46: two executors of the same node (same audience), each with its own state_dir/gate.secret. A
    destroy proposed by one, signed and submitted to the other, is CHALLENGE_INVALID there; its own
    proposal, signed the same way, runs."""
    add_vm(fakepve, 100)
    this, other = open_desk(make_engine, tmp_path), open_desk(make_engine, tmp_path)
    assert (this.state_dir / "gate.secret").read_bytes() != (other.state_dir / "gate.secret").read_bytes()
    foreign = this.sign(other.propose(100, "config.disk_detach", **DETACH), "alice", "bob", role="destroyer")
    assert _reason(this.run(foreign)) == "CHALLENGE_INVALID" and "scsi1" in fakepve.vm(100).config
    own = this.sign(this.propose(100, "config.disk_detach", **DETACH), "alice", "bob", role="destroyer")
    assert this.run(own)[1] is None and "scsi1" not in fakepve.vm(100).config


def test_row47_a_flood_of_junk_is_refused_before_any_journal_write_then_rate_limited(
        fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Row 47: 40 junk SubmitOp calls over the real API (forged signatures, unknown keys, a foreign payload
    type, no or too many signatures, an oversized payload): each answered is refused with its reason and
    counted, the journal's files are byte for byte unchanged, and after the burst of 20 the API answers
    RESOURCE_EXHAUSTED."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    real = desk.sign(desk.propose(100, "config.disk_detach", **DETACH), "alice", "bob", role="destroyer")
    forged = epb.OpSignature(keyid=real.signatures[0].keyid, sig=os.urandom(64))
    junk = [
        epb.SignedOp(payload_type=real.payload_type, payload=real.payload, signatures=[forged]),
        epb.SignedOp(payload_type=real.payload_type, payload=os.urandom(200),
                     signatures=[epb.OpSignature(keyid="sha256:" + "0" * 64, sig=os.urandom(64))]),
        epb.SignedOp(payload_type="application/vnd.in-toto+json", payload=real.payload, signatures=[forged]),
        epb.SignedOp(payload_type=real.payload_type, payload=real.payload),
        epb.SignedOp(payload_type=real.payload_type, payload=real.payload, signatures=[forged] * 5),
        epb.SignedOp(payload_type=real.payload_type, payload=b"{" * 20000, signatures=[forged]),
    ]
    reasons = {"SIGNATURE_INVALID", "UNKNOWN_KEY", "PAYLOAD_TYPE", "MALFORMED"}
    files = journal_files(desk.state_dir)
    api = start_api(desk.engine, "127.0.0.1:0", desk=desk.desk)
    answered, exhausted = [], 0
    try:
        with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            stub = epb_grpc.ExecutorServiceStub(channel)
            for n in range(40):
                try:
                    response = stub.SubmitOp(epb.SubmitOpRequest(op=junk[n % len(junk)]), timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    exhausted += 1
                    continue
                answered.append((response.decision, epb.RefusalReason.Name(response.refusal.reason)))
    finally:
        api.stop(1)
    assert len(answered) >= 20 and exhausted >= 15
    assert answered[:6] == [("refused", f"REFUSAL_REASON_{r}") for r in ("SIGNATURE_INVALID", "UNKNOWN_KEY",
                                                                        "PAYLOAD_TYPE", "MALFORMED", "MALFORMED",
                                                                        "MALFORMED")]
    assert {r.removeprefix("REFUSAL_REASON_") for _, r in answered} == reasons
    assert journal_files(desk.state_dir) == files and not [r for r in desk.records() if isinstance(r, RefusalRecord)]
    counted = sum(desk.engine.gate.metrics.registry.get_sample_value(
        "pve_executor_gate_decisions_total", {"class": "unknown", "decision": "refused", "reason": r.lower()}) or 0
        for r in reasons)
    assert counted == len(answered)
    assert mutations(fakepve) == []


# --- helpers of the in-process rows --------------------------------------------------------------------------

def _reason(result: tuple[str, Refusal | None]) -> str:
    """A submit's outcome: "accepted", or the refusal's reason."""
    return "accepted" if result[1] is None else result[1].reason


def _lane_refusal(desk: Any, op_id: str) -> str:
    """The reason the lane refused the signed op ``op_id`` with (journaled under ``op:<op_id>:<sha256>:refused``)."""
    journal = desk.engine.journal
    assert journal is not None
    last = op_refusal(journal, op_id)
    assert last is not None, f"the lane did not refuse op {op_id}"
    return str(last[0])


# --- the crash rows: a real daemon, killed with SIGKILL while its Proxmox call is held ------------------

DESTROY = {"purge": False, "destroy_unreferenced_disks": False}


def _killed_mid_destroy(fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path,
                        *, reaches_pve: bool) -> tuple[list[str], Envelope, str]:
    """A daemon submits a signed destroy of 100 and is SIGKILLed while fakepve holds its DELETE, unanswered.

    The journal on disk then holds the op's begin (its nonce spent), no task and no end. After the kill
    fakepve either acts on the held request (``reaches_pve``: PVE took the call) or answers it 595 (it never
    reached PVE). Returns the daemon's command, the envelope and the journal's op id.
    """
    add_vm(fakepve, 100)
    command = run_command(fakepve, fakepve_cafile, planner.port, tmp_path)
    with Daemon(command, unused_port()) as daemon:
        daemon.wait_serving()
        envelope = signed_by(api_propose(daemon.api, 100, "guest.destroy", **DESTROY), "alice", "bob",
                             role="destroyer")
        held = HeldRequest(fakepve, "DELETE", "/nodes/pve1/qemu/100")
        try:
            assert api_submit(daemon.api, envelope)[0] == "accepted"
            assert held.seen.wait(20), "the destroy never reached fakepve"
            on_disk = records_on_disk(tmp_path / "state")
            daemon.kill()
            if not reaches_pve:
                fakepve.fail("DELETE", "/nodes/pve1/qemu/100", 595, "No route to host", times=1)
        finally:
            held.release()
    deadline = time.monotonic() + 10
    while not (fakepve.vm(100) is None if reaches_pve else ("DELETE", "/nodes/pve1/qemu/100") not in fakepve.failures):
        assert time.monotonic() < deadline, "fakepve never answered the held call"
        time.sleep(0.01)
    op_id = parse_payload(envelope.payload).op_id
    (begun,) = [r for r in on_disk if isinstance(r, Begun) and (r.key or "").startswith(f"op:{op_id}:")]
    assert [r for r in on_disk if isinstance(r, TaskStarted | Ended) and r.op_id == begun.op_id] == []
    return command, envelope, begun.op_id


def _restart(command: list[str]) -> tuple[Daemon, list[dict[str, Any]]]:
    """The daemon again: once it serves, recovery has ended; its ``recovered`` log events."""
    daemon = Daemon(command, unused_port())
    daemon.wait_serving()
    return daemon, daemon.events("recovered")


def test_row3_killed_after_begin_before_the_call_ends_not_applied_and_spent(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """Row 3: SIGKILL after the begin record, while the destroy call is held before PVE acts on it. The
    restarted daemon's recovery finds no task and the digest as planned: FAILED "not applied". The guest
    is intact, and resubmitting the same envelope is NONCE_SPENT: the nonce was spent exactly once."""
    command, envelope, journal_id = _killed_mid_destroy(fakepve, fakepve_cafile, planner, tmp_path,
                                                         reaches_pve=False)
    daemon, recovered = _restart(command)
    with daemon:
        assert [(e["op_id"], e["outcome"], e["detail"]) for e in recovered] == [(journal_id, "failed",
                                                                                 "not applied")]
        assert api_submit(daemon.api, envelope) == ("refused", "NONCE_SPENT")
    assert fakepve.vm(100) is not None and not [t for t in fakepve.tasklog if t["type"] == "qmdestroy"]


def test_row4_killed_after_pve_took_the_call_recovers_the_task_and_ran_once(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """Row 4: SIGKILL while PVE holds the destroy call, so no UPID was ever journaled; PVE then runs it. The
    restarted daemon's recovery finds the qmdestroy task by type and vmid and takes the outcome from it
    (ok, "OK"); the destroy ran once, and the envelope replayed is NONCE_SPENT."""
    command, envelope, journal_id = _killed_mid_destroy(fakepve, fakepve_cafile, planner, tmp_path,
                                                         reaches_pve=True)
    (task,) = [t for t in fakepve.tasklog if t["type"] == "qmdestroy"]
    seen = len(fakepve.requests)
    daemon, recovered = _restart(command)
    with daemon:
        assert [(e["op_id"], e["outcome"], e["detail"]) for e in recovered] == [(journal_id, "ok", "OK")]
        assert any(p.endswith(f"/tasks/{task['upid']}/status") for _, p, _ in fakepve.requests[seen:])
        assert api_submit(daemon.api, envelope) == ("refused", "NONCE_SPENT")
    assert fakepve.vm(100) is None
    assert [m for m, p, _ in fakepve.requests if p.endswith("/qemu/100") and m == "DELETE"] == ["DELETE"]


def test_state_files_written_at_once_from_many_threads_all_land(tmp_path: Path) -> None:
    """Two SubmitOps at once both mark the state (nonces.spent): the private-file writer uses a temporary of
    its own per write, so concurrent writers never trip over each other's rename, and the file is 0600."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from executor.gate.files import write_private  # noqa: PLC0415

    target = tmp_path / "nonces.spent"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: write_private(target, f"{i}\n".encode()), range(64)))
    assert target.stat().st_mode & 0o777 == 0o600 and target.read_text().strip().isdigit()
    assert [p.name for p in tmp_path.iterdir()] == ["nonces.spent"]


def test_a_new_secret_raises_the_floor_over_an_old_clock_reset(tmp_path: Path) -> None:
    """A wipe that leaves an old clock.reset behind still gets a fresh floor when the secret is made anew
    (the floor only rises; a reset's offset is kept)."""
    from executor.signed.clock import gate_secret  # noqa: PLC0415

    (tmp_path / "clock.reset").write_text(json.dumps({"offset": 12.0, "floor": 1000.0}))
    before = time.time()
    gate_secret(tmp_path)
    reset = json.loads((tmp_path / "clock.reset").read_text())
    assert reset["offset"] == 12.0 and reset["floor"] >= before
