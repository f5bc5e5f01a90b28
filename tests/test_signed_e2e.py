"""Signed operations end to end: an operator with two keys and the real executor daemon on fakepve over HTTPS.

The flow is the operator's, through the CLI as processes: ``keys generate``, a root-owned trust store,
``pve-executor run`` with ``--trust-store``, then ``op propose`` -> ``op sign`` -> ``op cosign`` ->
``op submit``, ``pending --json`` and ``op undo``. The attacks on that flow are built from the files those
commands wrote (an attacker has the envelope, not the keys). Further tests here run the remaining
operations through an in-process executor (``open_desk``) with the same payload builder.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.loop.engine import Engine
from executor.v1 import executor_pb2 as epb
from opctl.doc import Proposal, read_proposal
from opctl.keys import load_private
from opctl.sign import build_payload, read_envelope
from planner import server
from safety import signedop
from safety.refusal import Refused
from safety.signedop import Envelope
from tests.executor_helpers import cli, unused_port
from tests.signed_helpers import (
    Daemon,
    GiB,
    add_vm,
    api_submit,
    done,
    mutations,
    ok,
    open_desk,
    operator,
    spent,
    trust_toml,
)

Make = Callable[..., Engine]
DETACH = ("config.disk_detach", "delete=scsi1")
DESTROY = ("guest.destroy", "purge=false", "destroy_unreferenced_disks=false")


def sent(fakepve: Any, method: str, suffix: str) -> list[dict[str, str]]:
    """The form bodies of the ``method`` requests fakepve received for a path ending in ``suffix``."""
    return [dict(urllib.parse.parse_qsl(body.decode())) for m, path, body in fakepve.requests
            if m == method and path.endswith(suffix)]


def signed(path: Path, *keys: str, role: str = "destroyer", audience: str | None = None) -> Envelope:
    """The proposal at ``path`` signed in process with the operator's key files (``audience``: changed first)."""
    proposal = read_proposal(path.read_bytes(), str(path))
    if audience is not None:
        proposal = Proposal(action={**proposal.action, "audience": audience}, challenge=proposal.challenge)
    data = build_payload(proposal, role=role, ttl=900, reason="e2e", now=time.time())
    return Envelope(payload_type=signedop.PAYLOAD_TYPE, payload=data,
                    signatures=tuple(signedop.sign(data, load_private(str(path.parent / f"{k}.key"))) for k in keys))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


HUB_DESIRED = """guests:
  - {vmid: 110, state: stopped}
  - {vmid: 111, state: stopped}
  - {vmid: 112, state: stopped}
  - {vmid: 113, state: running}
  - vmid: 114
    config: {net0: "virtio=BC:24:11:00:00:02,bridge=vmbr0"}
"""


def test_an_operator_detaches_and_destroys_with_two_keys_and_nothing_else_gets_through(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """The Done-when flow: alice and bob (threshold 2) propose, sign, co-sign and submit a detach of scsi1
    and a destroy; each runs exactly once. Replaying either is NONCE_SPENT; one signature is
    THRESHOLD_NOT_MET; an op for another vmid edited to this one is SIGNATURE_INVALID, and refused
    DIGEST_STALE once its own guest changed (another digest); an op for another cluster or node is
    WRONG_AUDIENCE. ``op undo`` of the detach proposes the re-attach, which runs once signed.

    The same daemon reads a desired file others may write (a remote source) that stops 3 of its 5 guests:
    those stops are refused as too many at once and listed by ``pending --json``; signing one entry as
    operator (threshold 1) and submitting it runs that stop and no other. A MAC-changing net write from
    the same file is approved the same way."""
    for vmid in (100, 101, 102):
        add_vm(fakepve, vmid)
    for vmid in range(110, 114):
        add_vm(fakepve, vmid, disks=1, status="running")
    add_vm(fakepve, 114, disks=1, net0="virtio=BC:24:11:00:00:01,bridge=vmbr0")
    work = tmp_path / "operator"
    work.mkdir()
    entries = ok(*(operator("keys", "generate", "--out", f"{name}.key", "--owner", f"{name}@example.org", cwd=work)
                   for name in ("alice", "bob")))
    trust = tmp_path / "trust.toml"
    trust.write_text(trust_toml(dict(zip(("alice", "bob"), entries, strict=True))), encoding="utf-8")
    trust.chmod(0o644)  # root-owned (these tests run as root), not writable by group or others
    desired = tmp_path / "desired.yaml"
    desired.write_text(HUB_DESIRED, encoding="utf-8")
    desired.chmod(0o666)  # writable by others: a remote source, however local the path
    port = unused_port()
    command = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path,
                  "run", "--trust-store", str(trust), "--state-dir", str(tmp_path / "state"),
                  "--desired", str(desired), "--interval", "1")
    with Daemon(command, port) as daemon:
        daemon.wait_serving()
        _detach_and_destroy(fakepve, daemon, work)
        _approve_pending(fakepve, daemon, work)
        assert daemon.stop() == 0


def _detach_and_destroy(fakepve: Any, daemon: Daemon, work: Path) -> None:
    port = daemon.port
    for name, text in zip("dxy", ok(operator("op", "propose", "--vmid", "100", *DETACH, cwd=work, api=port),
                                    operator("op", "propose", "--vmid", "102", *DESTROY, cwd=work, api=port),
                                    operator("op", "propose", "--vmid", "101", *DETACH, cwd=work, api=port)),
                          strict=True):
        (work / f"{name}.json").write_text(text, encoding="utf-8")
    ok(*(operator("op", "sign", "--key", "alice.key", "--role", "destroyer", "--yes", "--out", f"{n}1.op",
                  f"{n}.json", cwd=work) for n in "dx"))
    ok(*(operator("op", "cosign", "--key", "bob.key", "--yes", "--out", f"{n}.op", f"{n}1.op", cwd=work)
         for n in "dx"))
    outputs = ok(*(operator("op", "submit", f"{n}.op", cwd=work, api=port) for n in "dx"))
    assert all(out.startswith("accepted: ") for out in outputs), outputs
    wait_for(lambda: fakepve.vm(102) is None and "scsi1" not in fakepve.vm(100).config, "the detach and the destroy")
    replays = done(*(operator("op", "submit", f"{n}.op", cwd=work, api=port) for n in "dx"))
    assert [(r.returncode, "NONCE_SPENT" in r.stdout) for r in replays] == [(1, True), (1, True)], replays
    assert [b.get("delete") for b in sent(fakepve, "POST", "/qemu/100/config")] == ["scsi1"]
    assert sent(fakepve, "DELETE", "/qemu/102") == [{}]
    assert [t["id"] for t in fakepve.tasklog if t["type"] == "qmdestroy"] == ["102"]

    assert api_submit(daemon.api, read_envelope(str(work / "d1.op"))) == ("refused", "THRESHOLD_NOT_MET")
    y = signed(work / "y.json", "alice", "bob")
    assert api_submit(daemon.api, signed(work / "y.json", "alice")) == ("refused", "THRESHOLD_NOT_MET")
    to_100 = Envelope(payload_type=y.payload_type, payload=y.payload.replace(b'"vmid":101', b'"vmid":100'),
                      signatures=y.signatures)
    assert to_100.payload != y.payload and api_submit(daemon.api, to_100) == ("refused", "SIGNATURE_INVALID")
    for audience in ("pve1@othercluster", "pve2@fakecluster"):
        elsewhere = signed(work / "y.json", "alice", "bob", audience=audience)
        assert api_submit(daemon.api, elsewhere) == ("refused", "WRONG_AUDIENCE")
    fakepve.vm(101).config["cores"] = 4  # an administrator's edit after signing: another digest
    assert api_submit(daemon.api, y) == ("refused", "DIGEST_STALE")
    assert "scsi1" in fakepve.vm(101).config

    detach_id = outputs[0].split()[1]
    undo = json.loads(ok(operator("op", "undo", detach_id, cwd=work, api=port))[0])
    assert (undo["action"]["kind"], undo["action"]["params"]["set"]) == (
        "config.disk_attach", {"scsi1": "local-lvm:vm-100-disk-1,size=4G"})
    (work / "u.json").write_text(json.dumps(undo), encoding="utf-8")
    assert api_submit(daemon.api, signed(work / "u.json", "alice", role="operator")) == ("accepted", "UNSPECIFIED")
    wait_for(lambda: fakepve.vm(100).config.get("scsi1") == "local-lvm:vm-100-disk-1,size=4G", "the undo")


def _approve_pending(fakepve: Any, daemon: Daemon, work: Path) -> None:
    port = daemon.port
    pending = json.loads(ok(operator("pending", "--json", cwd=work, api=port))[0])
    listed = sorted((e["action"]["vmid"], e["action"]["kind"], e["refusal"]) for e in pending)
    assert listed == [(110, "stop", "APPROVAL_REQUIRED"), (111, "stop", "APPROVAL_REQUIRED"),
                      (112, "stop", "APPROVAL_REQUIRED"), (114, "config.nic_identity", "APPROVAL_REQUIRED")], listed
    assert all(fakepve.vm(v).status == "running" for v in range(110, 114))
    for entry in pending:
        if entry["action"]["vmid"] in (111, 114):
            (work / f"p{entry['action']['vmid']}.json").write_text(json.dumps(entry), encoding="utf-8")
    ok(*(operator("op", "sign", "--key", "alice.key", "--role", "operator", "--yes", "--out", f"p{v}.op",
                  f"p{v}.json", cwd=work) for v in (111, 114)))
    before = len(fakepve.requests)
    outputs = ok(*(operator("op", "submit", f"p{v}.op", cwd=work, api=port) for v in (111, 114)))
    assert all(out.startswith("accepted: ") for out in outputs), outputs
    wait_for(lambda: fakepve.vm(111).status == "stopped"
             and fakepve.vm(114).config["net0"].upper().startswith("VIRTIO=BC:24:11:00:00:02"), "both approvals")
    daemon.api.Reconcile(epb.ReconcileRequest(), timeout=30)  # a tick after: the other stops are still refused
    stops = [p for m, p, _ in fakepve.requests[before:] if m == "POST" and ("/status/shutdown" in p
                                                                            or "/status/stop" in p)]
    assert stops == ["/api2/json/nodes/pve1/qemu/111/status/shutdown"]
    assert [fakepve.vm(v).status for v in range(110, 114)] == ["running", "stopped", "running", "running"]
    still = daemon.api.ListPending(epb.ListPendingRequest(), timeout=10).pending
    assert [(p.vmid, p.op_kind) for p in still] == [(110, "stop"), (112, "stop")]


def test_snapshots_and_a_disk_grow_of_a_container_go_through_propose_sign_submit(
        fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """On a container (fakepve models LXC's resize; QEMU's it only synthesizes): a snapshot taken (APPROVAL,
    one operator key), the config changed, rolled back to it (DESTRUCTIVE, two keys), the rootfs grown from
    8 to 12 GiB (APPROVAL; a shrink is refused MALFORMED at propose, before anything is signed), and the
    snapshot deleted (DESTRUCTIVE). Each runs once."""
    fakepve.add_ct(105, "box", config={"cores": 1, "memory": 512})
    desk = open_desk(make_engine, tmp_path)
    ct = fakepve.guest(105)

    def run(kind: str, *keys: str, **params: Any) -> None:
        role = "destroyer" if len(keys) == 2 else "operator"
        op_id, refusal = desk.run(desk.sign(desk.propose(105, kind, **params), *keys, role=role))
        assert refusal is None and spent(desk, op_id), (kind, refusal)

    run("snapshot.create", "alice", snapname="before")
    assert list(ct.snapshots) == ["before"]
    ct.config["memory"] = 2048  # changed after the snapshot
    run("snapshot.rollback", "alice", "bob", snapname="before")
    assert str(ct.config["memory"]) == "512"
    run("disk.resize", "alice", disk="rootfs", size=12 * GiB)
    assert "size=12G" in ct.config["rootfs"]
    with pytest.raises(Refused) as shrink:
        desk.propose(105, "disk.resize", disk="rootfs", size=4 * GiB)
    assert shrink.value.reason.value == "MALFORMED" and "shrink" in shrink.value.detail
    run("snapshot.delete", "alice", "bob", snapname="before")
    assert list(ct.snapshots) == []
    writes = [(m, p.removeprefix("/api2/json/nodes/pve1/lxc/105")) for m, p in mutations(fakepve)]
    assert writes == [("POST", "/snapshot"), ("POST", "/snapshot/before/rollback"), ("PUT", "/resize"),
                      ("DELETE", "/snapshot/before")]
