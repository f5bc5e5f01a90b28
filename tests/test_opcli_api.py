"""The operator's API commands against a stand-in executor.v1 server (real gRPC on loopback, canned answers).

The stand-in records every request, so each test checks both what the command sent and what it printed.
The end-to-end run against the real gate is the lead's test; this one pins the CLI's side of the contract.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from google.protobuf.message import Message

from common import grpcserver
from executor import cli
from executor.v1 import executor_pb2 as pb
from executor.v1 import executor_pb2_grpc as pb_grpc
from safety import challenge, signedop
from safety.payload import action_of, parse_payload
from tests.certs import make_pki
from tests.executor_helpers import unused_port
from tests.signing import AUDIENCE, DIGEST, SECRET, private

OP_ID = "00112233445566778899aabbccddeeff"
Answer = Message | Callable[[Any], Message] | tuple[grpc.StatusCode, str]


@dataclass
class StandIn(pb_grpc.ExecutorServiceServicer):
    """Canned answers per method (a message, a function of the request, or a status to abort with)."""

    answers: dict[str, Answer] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def _answer(self, name: str, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls.append((name, request))
        answer = self.answers[name]
        if isinstance(answer, tuple):
            context.abort(*answer)
        return answer(request) if callable(answer) else answer

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Canned."""
        return self._answer("GetStatus", request, context)

    def Reconcile(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Canned."""
        return self._answer("Reconcile", request, context)

    def ListPending(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Canned."""
        return self._answer("ListPending", request, context)

    def ProposeOp(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Canned."""
        return self._answer("ProposeOp", request, context)

    def SubmitOp(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Canned."""
        return self._answer("SubmitOp", request, context)

    def RevokeOp(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Canned."""
        return self._answer("RevokeOp", request, context)

    def ListOperations(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Canned."""
        return self._answer("ListOperations", request, context)

    def GetOpStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Canned."""
        return self._answer("GetOpStatus", request, context)


@dataclass(frozen=True, slots=True)
class Api:
    """A running stand-in and the flags that reach it."""

    servicer: StandIn
    flags: tuple[str, ...]

    def sent(self, name: str) -> list[Any]:
        """The requests ``name`` received."""
        return [request for called, request in self.servicer.calls if called == name]


def _serve(servicer: StandIn, tls: grpcserver.ServerTls | None = None) -> grpcserver.Running:
    return grpcserver.start("127.0.0.1:0", lambda s: pb_grpc.add_ExecutorServiceServicer_to_server(servicer, s),
                            ["executor.v1.ExecutorService"], tls=tls)


@pytest.fixture(name="api")
def _api() -> Iterator[Api]:
    servicer = StandIn()
    running = _serve(servicer)
    try:
        yield Api(servicer=servicer, flags=("--api", f"127.0.0.1:{running.port}", "--timeout", "10"))
    finally:
        running.stop(0)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``pve-executor ARGS`` in this process: exit status, stdout, stderr."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def action(kind: str = "guest.destroy", params: dict[str, Any] | None = None, cls: str = "DESTRUCTIVE",
           digest: str = DIGEST) -> dict[str, object]:
    """An action part as the executor builds it."""
    return action_of(audience=AUDIENCE, vmid=105, guest_type="qemu", kind=kind,
                     params={"purge": False, "destroy_unreferenced_disks": False} if params is None else params,
                     class_=cls, digest=digest, run_state="stopped")


def canonical(body: object) -> bytes:
    """The executor's canonical JSON."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def key_file(tmp_path: Path, name: str) -> str:
    """The named test key as a 0600 PEM file."""
    path = tmp_path / f"{name}.key"
    path.write_bytes(private(name).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    path.chmod(0o600)
    return str(path)


def test_propose_sends_the_params_and_prints_a_signable_proposal(api: Api, capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path) -> None:
    """op propose sends kind and typed params; its output is the proposal document op sign accepts."""
    proposed = action(params={"purge": True, "destroy_unreferenced_disks": False})
    api.servicer.answers["ProposeOp"] = pb.ProposeOpResponse(
        action=canonical(proposed), challenge=challenge.issue(SECRET, proposed, now=time.time()),
        action_class=pb.ACTION_CLASS_DESTRUCTIVE, rule="kind:guest.destroy", reasons=["guest.destroy: destroys"],
        before={"name": "scratch", "scsi0": "local-lvm:vm-105-disk-0"})
    code, out, err = run(capsys, "op", "propose", *api.flags, "--vmid", "105", "guest.destroy", "purge=yes",
                         "destroy_unreferenced_disks=false")
    assert code == 0, err
    (request,) = api.sent("ProposeOp")
    assert (request.vmid, request.kind) == (105, "guest.destroy")
    assert json.loads(request.params_json) == {"purge": True, "destroy_unreferenced_disks": False}
    document = json.loads(out)
    assert document == {"action": proposed, "challenge": document["challenge"], "class": "DESTRUCTIVE",
                        "rule": "kind:guest.destroy", "reasons": ["guest.destroy: destroys"],
                        "before": {"name": "scratch", "scsi0": "local-lvm:vm-105-disk-0"}}
    (tmp_path / "d.json").write_text(out, encoding="utf-8")
    code, out, err = run(capsys, "op", "sign", "--key", key_file(tmp_path, "alice"), "--role", "destroyer", "--yes",
                         str(tmp_path / "d.json"))
    assert code == 0, err
    payload = parse_payload(signedop.parse_envelope_json(out.encode()).payload)
    assert (payload.kind, dict(payload.params), payload.challenge) == (
        "guest.destroy", {"purge": True, "destroy_unreferenced_disks": False}, document["challenge"])


@pytest.mark.parametrize(("args", "message"), [
    (("disk.resize", "disk=scsi0", "size=-1G"), "params.size: must be an integer"),
    (("guest.destroy", "purge=yes"), "params.destroy_unreferenced_disks: is required"),
    (("snapshot.create", "name"), "parameters are KEY=VALUE"),
    (("no.such", "x=1"), "kind 'no.such' is not a signable op kind"),
])
def test_propose_refuses_bad_params_before_calling(api: Api, capsys: pytest.CaptureFixture[str],
                                                   args: tuple[str, ...], message: str) -> None:
    """Params the kind's schema refuses are reported locally (exit 2), naming the field; nothing is sent."""
    code, _, err = run(capsys, "op", "propose", *api.flags, "--vmid", "105", *args)
    assert code == 2 and message in err
    assert api.servicer.calls == []


def test_propose_typing_sizes_and_config_writes(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """size=64G is bytes for disk.resize; set.KEY=VALUE writes a config key; delete= lists keys sorted."""
    api.servicer.answers["ProposeOp"] = (grpc.StatusCode.FAILED_PRECONDITION, "guest 105 is locked (backup)")
    run(capsys, "op", "propose", *api.flags, "--vmid", "105", "disk.resize", "disk=scsi0", "size=64G")
    code, _, err = run(capsys, "op", "propose", *api.flags, "--vmid", "105", "config.nic_identity",
                       "set.net0=virtio=BC:24:11:00:00:01,bridge=vmbr0", "delete=net2,net1")
    first, second = api.sent("ProposeOp")
    assert json.loads(first.params_json) == {"disk": "scsi0", "size": 64 << 30}
    assert json.loads(second.params_json) == {"set": {"net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"},
                                              "delete": ["net1", "net2"]}
    assert code == 1
    assert "executor API: FAILED_PRECONDITION: guest 105 is locked (backup)" in err


def test_pending_entries_are_documents_op_sign_accepts(api: Api, capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    """pending --json lists each refused action as a proposal-shaped entry; op sign signs one as it is."""
    detach = action("config.disk_detach", {"set": {}, "delete": ["scsi1"]})
    api.servicer.answers["ListPending"] = pb.ListPendingResponse(pending=[pb.PendingApproval(
        vmid=105, op_kind="config.disk_detach", action_class=pb.ACTION_CLASS_DESTRUCTIVE,
        rule="kind:config.disk_detach", reasons=["config.disk_detach: detaches a disk"], source="local_file",
        descriptor=canonical(detach), descriptor_sha256="ab" * 32, reason=pb.REFUSAL_REASON_APPROVAL_REQUIRED,
        first_seen_unix_ms=1_764_240_000_000, challenge=challenge.issue(SECRET, detach, now=time.time()))])
    code, out, err = run(capsys, "pending", *api.flags, "--json")
    assert code == 0, err
    (entry,) = json.loads(out)
    assert entry["action"] == detach and entry["class"] == "DESTRUCTIVE" and entry["refusal"] == "APPROVAL_REQUIRED"
    (tmp_path / "p.json").write_text(json.dumps(entry), encoding="utf-8")
    code, out, err = run(capsys, "op", "sign", "--key", key_file(tmp_path, "alice"), "--role", "destroyer",
                         "--yes", str(tmp_path / "p.json"))
    assert code == 0, err
    assert json.loads(signedop.parse_envelope_json(out.encode()).payload)["params"] == detach["params"]
    code, out, _ = run(capsys, "pending", *api.flags)
    assert out.splitlines()[:3] == ["[1] DETACH DISKS of guest 105 (qemu) on pve1@cluster-a  DESTRUCTIVE",
                                    "      scsi1 -> <absent>", "      force: NO"]
    assert "refused APPROVAL_REQUIRED; from local_file; first seen 2025-11-27 10:40 UTC" in out


def _pending_config(vmid: int, values: dict[str, str], delete: list[str]) -> tuple[dict[str, object],
                                                                                   pb.PendingApproval]:
    write = action("config.nic_identity", {"set": values, "delete": delete}, cls="APPROVAL")
    write["vmid"] = vmid
    return write, pb.PendingApproval(
        vmid=vmid, op_kind="config.nic_identity", action_class=pb.ACTION_CLASS_APPROVAL, rule="nic_identity",
        reasons=["net0: changes the MAC"], source="hub", descriptor=canonical(write), descriptor_sha256="cd" * 32,
        reason=pb.REFUSAL_REASON_APPROVAL_REQUIRED, first_seen_unix_ms=1_764_240_000_000)


def test_pending_separates_keys_and_values(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """One line per key, values quoted: a value's commas and spaces never run into the next key."""
    _, item = _pending_config(100, {"net0": "virtio=BC:24:11:00:00:02,bridge=vmbr0", "name": "a b; c=d"},
                              ["tags"])
    api.servicer.answers["ListPending"] = pb.ListPendingResponse(pending=[item])
    code, out, err = run(capsys, "pending", *api.flags)
    assert code == 0, err
    assert out.splitlines() == [
        "[1] CHANGE THE CONFIG (config.nic_identity) of guest 100 (qemu) on pve1@cluster-a  APPROVAL",
        "      name -> 'a b; c=d'",
        "      net0 -> 'virtio=BC:24:11:00:00:02,bridge=vmbr0'",
        "      tags -> <absent>",
        "    rule nic_identity; refused APPROVAL_REQUIRED; from hub; first seen 2025-11-27 10:40 UTC; "
        "descriptor cdcdcdcdcdcd",
        "    - net0: changes the MAC",
        "    sign it: pve-executor op sign --pending 1 --key KEYFILE --role ROLE"]


@pytest.mark.parametrize("choice", [("--pending", "2"), ("--vmid", "101")])
def test_sign_takes_a_pending_entry_by_index_or_vmid(api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     choice: tuple[str, str]) -> None:
    """`op sign --pending N` or `--vmid VMID` asks ListPending for the entry and signs exactly its action."""
    first, one = _pending_config(100, {"net0": "virtio=BC:24:11:00:00:02"}, [])
    second, two = _pending_config(101, {"net0": "virtio=BC:24:11:00:00:03"}, [])
    api.servicer.answers["ListPending"] = pb.ListPendingResponse(pending=[one, two])
    code, out, err = run(capsys, "op", "sign", *choice, *api.flags, "--key", key_file(tmp_path, "alice"),
                         "--role", "netadmin", "--yes")
    assert code == 0, err
    payload = json.loads(signedop.parse_envelope_json(out.encode()).payload)
    assert (payload["vmid"], payload["params"]["set"]) == (101, second["params"]["set"])  # type: ignore[index]
    assert first != second and len(api.sent("ListPending")) == 1


@pytest.mark.parametrize(("args", "message"), [
    (("--pending", "3"), "--pending 3: there are 2 pending entries (see pve-executor pending)"),
    (("--vmid", "100"), "--vmid 100: 2 pending entries; give one of --pending 1 (config.nic_identity), "
                        "--pending 2 (config.nic_identity)"),
    (("--vmid", "555"), "--vmid 555: no pending entry for this guest"),
    (("--vmid", "100", "p.json"), "give one of PROPOSAL (a file, - for stdin), --pending N or --vmid VMID, "
                                  "not PROPOSAL and --vmid"),
    ((), "give one of PROPOSAL (a file, - for stdin), --pending N or --vmid VMID"),
])
def test_sign_names_the_entry_it_cannot_pick(api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                             args: tuple[str, ...], message: str) -> None:
    """An index past the list, a guest with two entries or none, two sources at once: exit 2, nothing signed."""
    _, one = _pending_config(100, {"net0": "virtio=BC:24:11:00:00:02"}, [])
    _, two = _pending_config(100, {"net0": "virtio=BC:24:11:00:00:03"}, ["tags"])
    api.servicer.answers["ListPending"] = pb.ListPendingResponse(pending=[one, two])
    code, out, err = run(capsys, "op", "sign", *args, *api.flags, "--key", key_file(tmp_path, "alice"),
                         "--role", "netadmin", "--yes")
    assert (code, out) == (2, "")
    assert message in err


def _envelope(tmp_path: Path) -> tuple[Path, bytes]:
    payload = json.dumps({**action(), "v": 1, "op_id": OP_ID, "challenge": None, "role": "destroyer",
                          "not_before": 1, "not_after": 2, "reason": "r"}).encode()
    envelope = signedop.Envelope(payload_type=signedop.PAYLOAD_TYPE, payload=payload,
                                 signatures=(signedop.sign(payload, private("alice")),
                                             signedop.sign(payload, private("bob"))))
    path = tmp_path / "d.op"
    path.write_bytes(signedop.envelope_to_json(envelope))
    return path, payload


def test_submit_sends_the_bytes_as_signed(api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """op submit sends the payload bytes and signatures untouched; accepted exits 0, a refusal 1 with its reason."""
    seen: set[bytes] = set()

    def decide(request: pb.SubmitOpRequest) -> pb.SubmitOpResponse:
        if request.op.payload in seen:
            return pb.SubmitOpResponse(op_id=OP_ID, decision="refused", refusal=pb.Refusal(
                reason=pb.REFUSAL_REASON_NONCE_SPENT, detail="this signed op was already used", op_id=OP_ID))
        seen.add(request.op.payload)
        return pb.SubmitOpResponse(op_id=OP_ID, decision="accepted")

    api.servicer.answers["SubmitOp"] = decide
    path, payload = _envelope(tmp_path)
    assert run(capsys, "op", "submit", *api.flags, str(path)) == (
        0, f"accepted: {OP_ID} (queued; see `pve-executor op status {OP_ID} --wait`)\n", "")
    code, out, err = run(capsys, "op", "submit", *api.flags, str(path))
    assert (code, out) == (1, f"refused op {OP_ID}: NONCE_SPENT: this signed op was already used\n")
    assert "what to do: this signed op was already used: an op runs once" in err
    api.servicer.answers["SubmitOp"] = pb.SubmitOpResponse(decision="refused", refusal=pb.Refusal(
        reason=pb.REFUSAL_REASON_THRESHOLD_NOT_MET, detail="role destroyer needs 2 distinct keys holding it"))
    code, out, err = run(capsys, "op", "submit", *api.flags, str(path))  # refused before a signature held
    assert (code, out) == (1, f"refused op {OP_ID}: THRESHOLD_NOT_MET: role destroyer needs 2 distinct keys "
                              "holding it\n")
    assert "what to do: more distinct keys holding the role must sign: op cosign with another key" in err
    sent = api.sent("SubmitOp")[0].op
    assert (sent.payload_type, sent.payload) == (signedop.PAYLOAD_TYPE, payload)
    assert [s.keyid for s in sent.signatures] == [signedop.sign(payload, private(n)).keyid for n in ("alice", "bob")]


def test_submit_refuses_a_malformed_envelope_locally(api: Api, capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    """An envelope the gate would call MALFORMED (an extra alg field) is not sent."""
    path, _ = _envelope(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), "alg": "none"}), encoding="utf-8")
    code, _, err = run(capsys, "op", "submit", *api.flags, str(path))
    assert code == 2 and "MALFORMED: envelope.alg" in err
    assert api.servicer.calls == []


@pytest.mark.parametrize("ask", [True, False])
def test_revoke_signs_an_op_revoke(api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path, ask: bool) -> None:
    """op revoke signs kind op.revoke naming OP_ID (APPROVAL), from the executor's proposal or --audience."""
    proposed = action("op.revoke", {"op_id": OP_ID}, "APPROVAL", digest="0" * 40)
    api.servicer.answers["ProposeOp"] = pb.ProposeOpResponse(action=canonical(proposed),
                                                            action_class=pb.ACTION_CLASS_APPROVAL)
    api.servicer.answers["RevokeOp"] = pb.RevokeOpResponse(op_id=OP_ID, decision="revoked")
    where = () if ask else ("--audience", AUDIENCE)
    code, out, err = run(capsys, "op", "revoke", OP_ID, *api.flags, "--key", key_file(tmp_path, "alice"),
                         "--role", "operator", "--vmid", "105", *where)
    assert (code, out) == (0, f"revoked op {OP_ID}\n"), err
    assert len(api.sent("ProposeOp")) == (1 if ask else 0)
    sent = api.sent("RevokeOp")[0].revocation
    payload = parse_payload(sent.payload)
    assert (payload.kind, dict(payload.params), payload.class_, payload.vmid, payload.audience) == (
        "op.revoke", {"op_id": OP_ID}, "APPROVAL", 105, AUDIENCE)
    assert payload.precondition.digest == "0" * 40 and payload.role == "operator"
    private("alice").public_key().verify(sent.signatures[0].sig, signedop.pae(sent.payload_type, sent.payload))


def _begun(body: dict[str, Any], kind: str) -> pb.ListOperationsResponse:
    return pb.ListOperationsResponse(operations=[
        pb.Operation(op_id="j1", vmid=105, kind="set_config", record="begun", op_kind=kind,
                     payload_json=json.dumps({**body, "op": {"id": OP_ID, "kind": kind}})),
        pb.Operation(op_id="j1", record="ended", outcome="ok")])


@pytest.mark.parametrize(("kind", "body", "inverse", "params"), [
    ("config.nic_identity", {"type": "qemu", "set": {"net0": "virtio=BC:24:11:00:00:02", "tags": "x"},
                             "delete": ["net1"], "before": {"net0": "virtio=BC:24:11:00:00:01", "tags": None,
                                                            "net1": "e1000,bridge=vmbr1"}},
     "config.nic_identity", {"set": {"net0": "virtio=BC:24:11:00:00:01", "net1": "e1000,bridge=vmbr1"},
                             "delete": ["tags"]}),
    ("snapshot.create", {"type": "qemu", "params": {"snapname": "before_upgrade", "vmstate": False},
                         "before": {}}, "snapshot.delete", {"snapname": "before_upgrade", "force": False}),
])
def test_undo_proposes_the_inverse(api: Api, capsys: pytest.CaptureFixture[str], kind: str, body: dict[str, Any],
                                   inverse: str, params: dict[str, Any]) -> None:
    """op undo writes back the before values and deletes added keys, or deletes the snapshot taken, via ProposeOp."""
    api.servicer.answers["ListOperations"] = _begun(body, kind)
    proposed = action(inverse, params, "APPROVAL")
    api.servicer.answers["ProposeOp"] = pb.ProposeOpResponse(action=canonical(proposed),
                                                            action_class=pb.ACTION_CLASS_APPROVAL)
    code, out, err = run(capsys, "op", "undo", OP_ID, *api.flags)
    assert code == 0, err
    (request,) = api.sent("ProposeOp")
    assert (request.vmid, request.kind, json.loads(request.params_json)) == (105, inverse, params)
    assert json.loads(out)["action"] == proposed


@pytest.mark.parametrize(("kind", "body", "message"), [
    ("guest.destroy", {"params": {"purge": True}}, "guest.destroy has no undo: the guest, its volumes"),
    ("config.disk_detach", {"set": {}, "delete": ["scsi1"], "params": {"force": True}, "before": {"scsi1": "v"}},
     "force=true, which destroyed the volume"),
    ("disk.resize", {"params": {"disk": "scsi0", "size": 1}}, "PVE only grows disks"),
])
def test_undo_says_why_there_is_none(api: Api, capsys: pytest.CaptureFixture[str], kind: str,
                                     body: dict[str, Any], message: str) -> None:
    """An op without an inverse is named with the reason; nothing is proposed."""
    api.servicer.answers["ListOperations"] = _begun(body, kind)
    code, _, err = run(capsys, "op", "undo", OP_ID, *api.flags)
    assert code == 2 and message in err
    assert api.sent("ProposeOp") == []


def test_undo_of_an_unknown_op(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """An op id with no begun record in the journal is reported, not guessed at."""
    api.servicer.answers["ListOperations"] = pb.ListOperationsResponse()
    code, _, err = run(capsys, "op", "undo", "ff" * 16, *api.flags)
    assert code == 2 and f"no begun record of op {'ff' * 16}" in err
    assert api.sent("ListOperations")[0].limit == 1000


def test_unreachable_api_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """No executor listening: the gRPC status is printed and the exit status is 1."""
    port = unused_port()  # no listener, and no other test of this run takes it
    code, _, err = run(capsys, "pending", "--api", f"127.0.0.1:{port}", "--timeout", "3")
    assert code == 1 and "executor API: UNAVAILABLE" in err


def test_mutual_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--api-ca/--api-client-cert/--api-client-key reach an API that requires client certificates (so do the old
    --api-cert/--api-key); without them it fails."""
    pki = make_pki(tmp_path)
    servicer = StandIn(answers={"ListPending": pb.ListPendingResponse()})
    running = _serve(servicer, grpcserver.ServerTls(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca))
    try:
        target = ("--api", f"127.0.0.1:{running.port}", "--timeout", "5")
        for cert, key in (("--api-client-cert", "--api-client-key"), ("--api-cert", "--api-key")):
            assert run(capsys, "pending", *target, "--api-ca", pki.ca, cert, pki.client_cert,
                       key, pki.client_key)[:2] == (0, "nothing pending\n")
        code, _, err = run(capsys, "pending", *target, "--api-ca", pki.ca)
        assert code == 1 and "executor API: UNAVAILABLE" in err
    finally:
        running.stop(0)


def test_config_names_the_api_as_the_daemon_reads_it(api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--config FILE (the daemon's executor.toml) gives the address: listen (a wildcard host dialled on
    loopback); the daemon's other keys are left alone; --api and PVE_EXECUTOR_API still win over it."""
    monkeypatch.delenv("PVE_EXECUTOR_API", raising=False)
    api.servicer.answers["ListPending"] = pb.ListPendingResponse()
    port = api.flags[1].rsplit(":", 1)[1]
    config = tmp_path / "executor.toml"
    for host in ("127.0.0.1", "0.0.0.0"):
        config.write_text(f'node = "pve1"\nlisten = "{host}:{port}"\ninterval = 5.0\n', encoding="utf-8")
        assert run(capsys, "pending", "--config", str(config), "--timeout", "5")[:2] == (0, "nothing pending\n")
    assert len(api.sent("ListPending")) == 2
    code, _, err = run(capsys, "pending", "--config", str(config), "--api", "unix:/nonexistent/x.sock",
                       "--timeout", "3")
    assert code == 1 and len(api.sent("ListPending")) == 2
    config.write_text("listen = 50052\n", encoding="utf-8")
    code, _, err = run(capsys, "op", "status", "--config", str(config))
    assert code == 2 and "config: listen: must be str, got 50052" in err and str(config) in err
    code, _, err = run(capsys, "op", "undo", "ab" * 16, "--config", str(tmp_path / "absent.toml"))
    assert code == 2 and "cannot read" in err


def test_config_with_tls_needs_the_client_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An executor.toml whose API requires client certificates (tls_client_ca): without --api-client-cert the
    command says which flags to give (exit 2); with them (and --api-ca) it reaches the API at listen."""
    monkeypatch.delenv("PVE_EXECUTOR_API", raising=False)
    pki = make_pki(tmp_path)
    running = _serve(StandIn(answers={"ListPending": pb.ListPendingResponse()}),
                     grpcserver.ServerTls(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca))
    try:
        config = tmp_path / "executor.toml"
        config.write_text(f'listen = "127.0.0.1:{running.port}"\ntls_cert = "{pki.server_cert}"\n'
                          f'tls_key = "{pki.server_key}"\ntls_client_ca = "{pki.ca}"\n', encoding="utf-8")
        code, _, err = run(capsys, "pending", "--config", str(config))
        assert code == 2 and "give --api-client-cert and --api-client-key" in err
        assert run(capsys, "pending", "--config", str(config), "--api-ca", pki.ca, "--api-client-cert",
                   pki.client_cert, "--api-client-key", pki.client_key, "--timeout", "5")[:2] == (
            0, "nothing pending\n")
    finally:
        running.stop(0)


def test_undo_warns_of_later_changes(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """A key changed again since the op ran is named: the undo would overwrite that later change too."""
    body = {"type": "qemu", "set": {"net0": "virtio=BC:24:11:00:00:02", "tags": "x"}, "delete": [],
            "before": {"net0": "virtio=BC:24:11:00:00:01", "tags": None}}
    api.servicer.answers["ListOperations"] = _begun(body, "config.nic_identity")
    proposed = action("config.nic_identity", {"set": {"net0": "virtio=BC:24:11:00:00:01"}, "delete": ["tags"]},
                      "APPROVAL")
    api.servicer.answers["ProposeOp"] = pb.ProposeOpResponse(
        action=canonical(proposed), action_class=pb.ACTION_CLASS_APPROVAL,
        before={"net0": "virtio=BC:24:11:00:00:02", "tags": "y"})
    code, _, err = run(capsys, "op", "undo", OP_ID, *api.flags)
    assert code == 0, err
    assert f"warning: since op {OP_ID} ran, tags is now y, not the op's x" in err
    assert "net0 is now" not in err
