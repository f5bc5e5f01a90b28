"""What became of my op: ``op submit`` and ``op status [--wait]`` as processes against the real daemon on fakepve.

A destroy of a guest with ``protection: 1`` is accepted at admission and refused PROTECTED in its lane:
``op status --wait`` says so (exit 1) with what to do. A detach runs: ``op submit --wait`` reports RAN ok
with its Proxmox task (exit 0), and the op has one id in the CLI, ``ListOperations`` and the daemon's log.
An op held in its guest's lane is WAITING (exit 3) until it runs. Detaching a disk the guest lacks is
refused at propose, naming the parameter.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from structlog.testing import capture_logs

from executor.api.server import start_api
from executor.v1 import executor_pb2 as epb
from executor.v1 import executor_pb2_grpc as epb_grpc
from journal.records import RefusalRecord
from opctl.doc import read_proposal
from planner import server
from safety import signedop
from tests.executor_helpers import unused_port
from tests.signed_helpers import (
    Daemon,
    add_vm,
    done,
    hold_lane,
    ok,
    open_desk,
    operator,
    run_command,
    signed_by,
    unsigned_of,
)
from tests.signing import kid, private

DESTROY = ("guest.destroy", "purge=false", "destroy_unreferenced_disks=false")


def keys(work: Path) -> None:
    """alice.key and bob.key (the trust store's test keys) as 0600 PEM files in ``work``."""
    for name in ("alice", "bob"):
        path = work / f"{name}.key"
        path.write_bytes(private(name).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        path.chmod(0o600)


def propose_and_sign(work: Path, port: int, vmid: int, name: str, *args: str) -> Path:
    """``op propose`` (a process), then the proposal signed by alice and bob (destroyer); the envelope file."""
    (text,) = ok(operator("op", "propose", "--vmid", str(vmid), *args, cwd=work, api=port))
    (work / f"{name}.json").write_text(text, encoding="utf-8")
    envelope = signed_by(read_proposal(text.encode(), name), "alice", "bob", role="destroyer")
    path = work / f"{name}.op"
    path.write_bytes(signedop.envelope_to_json(envelope))
    return path


def fate(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON document ``op status --json`` printed."""
    return dict(json.loads(result.stdout))


def test_a_destroy_the_lane_refuses_protected_and_a_detach_that_runs(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """op submit says accepted (queued) and where to look; op status --wait shows REFUSED PROTECTED, what to do,
    exit 1; submit --wait of a detach shows RAN ok with its task, exit 0; the id is the same everywhere."""
    add_vm(fakepve, 105, protection=1)
    add_vm(fakepve, 106)
    work = tmp_path / "operator"
    work.mkdir()
    keys(work)
    port = unused_port()
    with Daemon(run_command(fakepve, fakepve_cafile, planner.port, tmp_path), port) as daemon:
        daemon.wait_serving()
        destroy = propose_and_sign(work, port, 105, "d", *DESTROY)
        (accepted,) = ok(operator("op", "submit", destroy.name, cwd=work, api=port))
        op_id = json.loads(signedop.parse_envelope_json(destroy.read_bytes()).payload)["op_id"]
        assert accepted == f"accepted: {op_id} (queued; see `pve-executor op status {op_id} --wait`)\n"

        (waited,) = done(operator("op", "status", op_id, "--wait", "--timeout", "30", cwd=work, api=port))
        assert waited.returncode == 1, waited
        first, *rest = waited.stdout.splitlines()
        assert first == (f"op {op_id} (guest.destroy on guest 105): REFUSED PROTECTED: guest 105 has protection=1: "
                         "clear it first with its own approved config.protection_off op")
        assert "  what to do: the guest has protection=1: clear it with its own signed config.protection_off op " \
               "(op propose --vmid 105 config.protection_off), then propose this op again" in rest, rest
        assert fakepve.vm(105) is not None
        (as_json,) = done(operator("op", "status", op_id, "--json", cwd=work, api=port))
        assert as_json.returncode == 1
        assert {k: fate(as_json)[k] for k in ("op_id", "vmid", "kind", "fate", "reason", "exit_code")} == {
            "op_id": op_id, "vmid": 105, "kind": "guest.destroy", "fate": "REFUSED", "reason": "PROTECTED",
            "exit_code": 1}

        detach = propose_and_sign(work, port, 106, "x", "config.disk_detach", "delete=scsi1")
        detach_id = json.loads(signedop.parse_envelope_json(detach.read_bytes()).payload)["op_id"]
        (ran,) = done(operator("op", "submit", detach.name, "--wait", cwd=work, api=port))
        assert ran.returncode == 0, ran
        assert ran.stdout.startswith(f"op {detach_id} (config.disk_detach on guest 106): RAN ok\n  Proxmox task UPID:")
        assert "scsi1" not in fakepve.vm(106).config

        # One id: ListOperations' records of both ops and the daemon's log events carry the op's own id.
        records = daemon.api.ListOperations(epb.ListOperationsRequest(limit=100), timeout=10).operations
        mine = [(r.record, r.op_id) for r in records if r.vmid == 106 or r.op_id == detach_id]
        assert [record for record, _ in mine] == ["begun", "task", "ended"], mine
        assert {op for _, op in mine} == {detach_id}
        assert [r.op_id for r in records if r.record == "refused" and r.vmid == 105] == [op_id]
        actions = [e for e in daemon.events("action") if e.get("vmid") == 106]
        assert actions and {e["op_id"] for e in actions} == {detach_id}, actions
        assert {e["op_id"] for e in daemon.events("gate_refused") if e.get("vmid") == 105} == {op_id}

        (listed,) = ok(operator("op", "status", cwd=work, api=port))
        assert listed.splitlines()[-2:] == [first, ran.stdout.splitlines()[0]]
        unknown = done(operator("op", "status", "ab" * 16, cwd=work, api=port))[0]
        assert unknown.returncode == 1 and f"op {'ab' * 16}: no trace on this executor" in unknown.stderr
        bad = done(operator("op", "status", "not-an-id", cwd=work, api=port))[0]
        assert bad.returncode == 2 and "32 lowercase hex" in bad.stderr


def test_an_op_waiting_in_its_lane_is_waiting_then_ran(make_engine: Any, fakepve: Any, tmp_path: Path) -> None:
    """An accepted op behind other work in its guest's lane: op status exits 3 (WAITING, why); --wait with a
    short --timeout also 3; once the lane is free, --wait reports RAN ok and exits 0."""
    add_vm(fakepve, 107)
    desk = open_desk(make_engine, tmp_path)
    api = start_api(desk.engine, "127.0.0.1:0", desk=desk.desk)
    try:
        held = hold_lane(desk, 107)
        envelope = desk.sign(unsigned_of(desk.propose(107, "config.disk_detach", set={}, delete=["scsi1"],
                                                      force=False)), "alice", "bob", role="destroyer")
        op_id, refusal = desk.submit(envelope)
        assert refusal is None
        now = done(operator("op", "status", op_id, cwd=tmp_path, api=api.port))[0]
        assert now.returncode == 3, now
        assert now.stdout.startswith(f"op {op_id} (config.disk_detach on guest 107): WAITING: queued in guest 107's "
                                     "lane behind 1 other job(s)\n")
        short = done(operator("op", "status", op_id, "--wait", "--timeout", "1", cwd=tmp_path, api=api.port))[0]
        assert short.returncode == 3 and "still WAITING after 1s" in short.stderr, short
        with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            stub = epb_grpc.ExecutorServiceStub(channel)
            with pytest.raises(grpc.RpcError) as bad:
                stub.GetOpStatus(epb.GetOpStatusRequest(op_id="OP"), timeout=10)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "op_id" in str(bad.value.details())
            (listed,) = stub.GetOpStatus(epb.GetOpStatusRequest(), timeout=10).ops
            assert (listed.op_id, listed.fate) == (op_id, epb.OP_FATE_WAITING)
        held.set()
        later = done(operator("op", "status", op_id, "--wait", "--timeout", "30", cwd=tmp_path, api=api.port))[0]
        assert later.returncode == 0 and f"op {op_id} (config.disk_detach on guest 107): RAN ok" in later.stdout
    finally:
        api.stop(0)


def test_an_op_held_back_by_a_lock_says_so(make_engine: Any, fakepve: Any, tmp_path: Path) -> None:
    """A guest locked by a backup: the accepted op waits, and op status says for what (exit 3)."""
    add_vm(fakepve, 111)
    desk = open_desk(make_engine, tmp_path)
    api = start_api(desk.engine, "127.0.0.1:0", desk=desk.desk)
    try:
        proposal = unsigned_of(desk.propose(111, "config.disk_detach", set={}, delete=["scsi1"], force=False))
        fakepve.vm(111).lock = "backup"
        op_id, refusal = desk.run(desk.sign(proposal, "alice", "bob", role="destroyer"))
        assert refusal is None
        result = done(operator("op", "status", op_id, cwd=tmp_path, api=api.port))[0]
        assert result.returncode == 3, result
        assert result.stdout.startswith(f"op {op_id} (config.disk_detach on guest 111): WAITING: guest 111 is locked "
                                        "(backup)"), result.stdout
        assert "retried" in result.stdout
    finally:
        api.stop(0)


def test_an_op_revoked_while_it_waits_is_revoked(make_engine: Any, fakepve: Any, tmp_path: Path) -> None:
    """An op vetoed (op.revoke) while it waits in its lane never runs: op status says REVOKED, exit 1."""
    add_vm(fakepve, 110)
    desk = open_desk(make_engine, tmp_path)
    api = start_api(desk.engine, "127.0.0.1:0", desk=desk.desk)
    try:
        held = hold_lane(desk, 110)
        envelope = desk.sign(unsigned_of(desk.propose(110, "config.disk_detach", set={}, delete=["scsi1"],
                                                      force=False)), "alice", "bob", role="destroyer")
        op_id, refusal = desk.submit(envelope)
        assert refusal is None
        revocation = desk.sign(unsigned_of(desk.propose(110, "op.revoke", op_id=op_id)), "alice", role="operator")
        assert desk.desk.revoke(revocation) == (op_id, None)
        held.set()
        desk.settle()
        result = done(operator("op", "status", op_id, "--json", cwd=tmp_path, api=api.port))[0]
        assert result.returncode == 1, result
        assert {k: fate(result)[k] for k in ("fate", "reason", "vmid")} == {"fate": "REVOKED", "reason": "OP_REVOKED",
                                                                           "vmid": 110}
        assert fate(result)["detail"] == f"vetoed by a signed op.revoke (signed by {kid('alice')}): it never runs"
        assert "scsi1" in fakepve.vm(110).config
    finally:
        api.stop(0)


def test_an_op_revoked_while_it_waits_is_refused_op_revoked_in_the_log_and_the_journal(
        make_engine: Any, fakepve: Any, tmp_path: Path) -> None:
    """The lane's refusal of an op vetoed while queued says OP_REVOKED (as op status does), in its log event and
    its journal record, never TRUST_STORE_INVALID ("the op is not accepted here")."""
    add_vm(fakepve, 111)
    desk = open_desk(make_engine, tmp_path)
    held = hold_lane(desk, 111)
    envelope = desk.sign(unsigned_of(desk.propose(111, "config.disk_detach", set={}, delete=["scsi1"], force=False)),
                         "alice", "bob", role="destroyer")
    op_id, refusal = desk.submit(envelope)
    assert refusal is None
    revocation = desk.sign(unsigned_of(desk.propose(111, "op.revoke", op_id=op_id)), "alice", role="operator")
    assert desk.desk.revoke(revocation) == (op_id, None)
    with capture_logs() as logs:
        held.set()
        desk.settle()
    refused = [e.get("reason") for e in logs if e.get("op_id") == op_id and e.get("reason")]
    in_journal = [r.reason for r in desk.records()
                  if isinstance(r, RefusalRecord) and r.op_id == op_id and r.kind != "op.revoke"]
    assert refused and set(refused) == {"OP_REVOKED"}, logs
    assert in_journal == ["OP_REVOKED"]
    assert "scsi1" in fakepve.vm(111).config


def test_a_threshold_refusal_is_logged_with_what_it_lacked(make_engine: Any, fakepve: Any, tmp_path: Path) -> None:
    """op_refused for THRESHOLD_NOT_MET names the guest, kind, op id, role, key ids, and have/need."""
    add_vm(fakepve, 109)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(unsigned_of(desk.propose(109, "config.disk_detach", set={}, delete=["scsi1"], force=False)),
                         "alice", role="destroyer")
    op_id = json.loads(envelope.payload)["op_id"]
    with capture_logs() as logs:
        assert desk.submit(envelope)[1] is not None
    (event,) = [e for e in logs if e["event"] == "op_refused"]
    assert {k: event.get(k) for k in ("reason", "vmid", "op_kind", "op_id", "role", "keyids", "have", "need")} == {
        "reason": "THRESHOLD_NOT_MET", "vmid": 109, "op_kind": "config.disk_detach", "op_id": op_id,
        "role": "destroyer", "keyids": [kid("alice")], "have": 1, "need": 2}


def test_propose_refuses_to_detach_a_disk_the_guest_lacks(fakepve: Any, fakepve_cafile: str,
                                                          planner: server.Running, tmp_path: Path) -> None:
    """A detach of a key the guest's config does not hold is refused at propose, naming the param (exit 1)."""
    add_vm(fakepve, 108)
    port = unused_port()
    with Daemon(run_command(fakepve, fakepve_cafile, planner.port, tmp_path), port) as daemon:
        daemon.wait_serving()
        (result,) = done(operator("op", "propose", "--vmid", "108", "config.disk_detach", "delete=scsi7",
                                  cwd=tmp_path, api=port))
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert "INVALID_ARGUMENT: MALFORMED: params.delete: guest 108 has no scsi7: nothing to detach" in result.stderr, \
        result.stderr
