"""Approvals through the hub, end to end: a real hub (SQLite) on loopback, a node (real engine, gate, journal and op
desk over fakepve, its hub provider watching with HubDeliveries), ``pve-hub submit`` as a subprocess.

A change refused for approval waits on the node (a NIC's MAC: config.nic_identity; declared disk changes are never
planned, so no DESTRUCTIVE entry can wait from a desired state); signed with the test keys and submitted through the
hub it runs once; a tampered envelope is refused by the node with the reason its local API gives, and Proxmox receives
nothing; a redelivery after a hub restart runs nothing twice and keeps the first verdict; a revocation travels the
same way. What fakepve received is counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from executor.api.deliveries import HubDeliveries
from executor.app.report import ReporterSettings, StateReporter, ops_of
from executor.loop.desired import Declared
from executor.loop.engine import Engine
from executor.loop.hub import HubProvider, HubSettings
from executor.loop.hubheld import HeldFiles
from executor.metrics import ExecutorMetrics
from hub.store import SqliteStore
from hub.store.model import MAX_OP_ENVELOPE
from hub.v1 import hub_pb2 as pb
from opctl.doc import Proposal
from safety import signedop
from safety.signedop import Envelope
from tests.executor_helpers import ROOT
from tests.hub_helpers import Hub, running_hub
from tests.signed_helpers import AUDIENCE, Desk, HeldRequest, add_vm, hold_lane, mutations, open_desk
from tests.signing import private

Make = Callable[..., Engine]
CLUSTER = "fakecluster"
PVE_HUB = [sys.executable, "-c", "import sys; from hub.cli import main; sys.exit(main(sys.argv[1:]))"]
CONFIG_PATH = "/api2/json/nodes/pve1/qemu/100/config"
MAC_OLD, MAC_NEW = "BC:24:11:00:00:01", "BC:24:11:00:00:02"


def pve_hub(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``pve-hub ARGS`` in a subprocess, from this tree."""
    return subprocess.run([*PVE_HUB, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=timeout, check=False)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


@dataclass
class Node:
    """The executor of pve1: its desk, its hub provider with the deliveries it hands to that desk, its reporter."""

    desk: Desk
    provider: HubProvider
    deliveries: HubDeliveries
    reporter: StateReporter

    def close(self) -> None:
        """Stop reporting, watching and the deliveries' thread."""
        self.reporter.close()
        self.provider.close()
        self.deliveries.close()


def start_node(desk: Desk, address: str, tmp_path: Path) -> Node:
    """pve1's hub provider over ``address`` (not its desired source: the engine keeps its static one) and its state
    reporter, wired to the desk and the engine as the daemon wires them (``executor.app.wiring.build``)."""
    state = tmp_path / "node-hub"
    state.mkdir(exist_ok=True)
    provider = HubProvider(HubSettings(target=address, cluster=CLUSTER, heartbeat=0.2, backoff_base=0.05,
                                       backoff_cap=0.3),
                           files=HeldFiles(state), trust=desk.desk.trust, audience=lambda: AUDIENCE,
                           metrics=ExecutorMetrics())
    deliveries = HubDeliveries(desk.desk, desk.engine, provider.report_state, desk.engine.gate.audience)
    provider.deliveries = deliveries
    records = desk.engine.gate.records
    reporter = StateReporter(provider.channel, ReporterSettings(interval=30.0), identity=provider.identity,
                             held_version=lambda: provider.held.version,
                             ops=ops_of(records.recent, desk.desk.waiting, desk.engine.queue.busy),
                             deliveries=deliveries.drain)
    desk.engine.after_tick.append(reporter.offer)
    deliveries.start()
    provider.start()
    reporter.start()
    return Node(desk, provider, deliveries, reporter)


@pytest.fixture(name="hub")
def _hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(SqliteStore.in_dir(tmp_path / "hub"), heartbeat=0.2) as hub:
        yield hub


@pytest.fixture(name="node")
def _node(fakepve: Any, make_engine: Make, tmp_path: Path, hub: Hub) -> Iterator[Node]:
    add_vm(fakepve, 100, net0=f"virtio={MAC_OLD},bridge=vmbr0")
    desk = open_desk(make_engine, tmp_path, [Declared(vmid=100, config={"net0": f"virtio={MAC_NEW},bridge=vmbr0"})])
    node = start_node(desk, hub.address, tmp_path)
    wait_for(lambda: hub.store.node_for_audience(CLUSTER, AUDIENCE) == AUDIENCE, "the node's audience at the hub")
    yield node
    node.close()


def pending_mac(desk: Desk) -> Proposal:
    """The tick refuses the MAC change for approval; its pending entry, as an operator signs it."""
    desk.engine.tick(wait=True)
    (entry,) = desk.engine.gate.pending()
    assert (entry.vmid, entry.op_kind, entry.cls.name) == (100, "config.nic_identity", "APPROVAL")
    return Proposal(action=json.loads(entry.descriptor), challenge=entry.challenge or None)


def key_file(tmp_path: Path, name: str) -> str:
    """The test key ``name`` as the PEM file ``op sign --key`` reads."""
    path = tmp_path / f"{name}.key"
    path.write_bytes(private(name).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    path.chmod(0o600)
    return str(path)


def write(path: Path, envelope: Envelope | bytes) -> str:
    """The envelope file ``op sign`` writes."""
    path.write_bytes(envelope if isinstance(envelope, bytes) else signedop.envelope_to_json(envelope))
    return str(path)


def routed(hub: Hub, ident: str) -> list[pb.RoutedOp]:
    """GetOpStatus by delivery or op id."""
    return list(hub.stub.GetOpStatus(pb.GetOpStatusRequest(cluster=CLUSTER, id=ident), timeout=10).ops)


def test_a_pending_change_signed_and_submitted_through_the_hub_runs_once(node: Node, hub: Hub, fakepve: Any,
                                                                         tmp_path: Path) -> None:
    """The MAC change waits on pve1 and ``pve-hub pending`` shows it (node, guest, kind, class, the commands that
    sign it); run as printed with alice's key (``pve-hub pending --descriptor --json``, ``pve-executor op sign``),
    ``pve-hub submit --wait`` routes it over the node's own Watch stream: it runs once, and the command exits 0
    with the op RAN ok. Before it, the same envelope with one byte changed is refused by the node as
    SIGNATURE_INVALID, exactly as the local desk refuses it, and Proxmox receives nothing."""
    desk = node.desk
    pending_mac(desk)  # the tick's summary goes to the node's StateReporter, which reports it to the hub
    wait_for(lambda: bool(hub.stub.ListPending(pb.ListPendingRequest(cluster=CLUSTER), timeout=10).pending),
             "the node's report of its pending approval")
    listed = pve_hub("pending", "--cluster", CLUSTER, "--hub", hub.address)
    assert listed.returncode == 0, listed.stderr
    (entry,) = desk.engine.gate.pending()
    short = entry.descriptor_sha256[:12]
    assert listed.stdout.startswith(f"[1] node {AUDIENCE}: ") and "APPROVAL" in listed.stdout
    assert f"kind config.nic_identity; rule {entry.rule}; descriptor {short}" in listed.stdout
    # The printed commands reach the hub `pending` was asked (its --hub, not the default address).
    command = (f"sign it: pve-hub pending --cluster {CLUSTER} --hub {hub.address} --descriptor {short} --json > "
               f"pending-{short}.json && pve-executor op sign --key KEYFILE --role ROLE --out op-{short}.json "
               f"pending-{short}.json && pve-hub submit op-{short}.json --cluster {CLUSTER} --hub {hub.address} --wait")
    assert command in listed.stdout
    chosen = pve_hub("pending", "--cluster", CLUSTER, "--hub", hub.address, "--descriptor", short, "--json")
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout)["node"] == AUDIENCE
    (tmp_path / "pending.json").write_text(chosen.stdout, encoding="utf-8")
    sign = subprocess.run([sys.executable, "-m", "executor", "op", "sign", "--key", key_file(tmp_path, "alice"),
                           "--role", "operator", "--yes", "--out", str(tmp_path / "op.json"),
                           str(tmp_path / "pending.json")], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert sign.returncode == 0, sign.stderr
    envelope = signedop.parse_envelope_json((tmp_path / "op.json").read_bytes())
    good = signedop.envelope_to_json(envelope)
    position = good.index(b'"sig": "') + 20  # a byte inside the first signature: the envelope still parses
    tampered = good[:position] + (b"B" if good[position:position + 1] == b"A" else b"A") + good[position + 1:]
    before = len(fakepve.requests)

    refused = pve_hub("submit", write(tmp_path / "tampered.json", tampered), "--cluster", CLUSTER, "--hub",
                      hub.address, "--wait", "--timeout", "30", "--json")
    assert refused.returncode == 1, refused.stderr
    outcome = json.loads(refused.stdout)
    local = desk.submit(signedop.parse_envelope_json(tampered))[1]
    assert local is not None
    assert (outcome["state"], outcome["reason"], outcome["detail"]) == ("refused", local.reason, local.detail)
    assert outcome["reason"] == "SIGNATURE_INVALID" and mutations(fakepve, before) == []

    ran = pve_hub("submit", str(tmp_path / "op.json"), "--cluster", CLUSTER, "--hub", hub.address, "--wait",
                  "--timeout", "60")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "RAN ok" in ran.stdout and "queued: delivery" in ran.stderr
    assert [path for _, path in mutations(fakepve, before)] == [CONFIG_PATH]
    assert MAC_NEW in fakepve.vm(100).config["net0"].upper()
    (one,) = [r for r in routed(hub, json.loads(envelope.payload)["op_id"]) if r.state != "refused"]
    assert (one.state, one.node, one.op.fate, one.op.outcome) == ("accepted", AUDIENCE, "ran", "ok")


def test_a_redelivery_after_a_hub_restart_runs_nothing_twice(node: Node, hub: Hub, fakepve: Any,
                                                            tmp_path: Path) -> None:
    """The node takes a delivery and is held reading the guest (its verdict not sent yet); the hub restarts on its
    database and port and sends the delivery again on the node's new stream. Released, the op runs once; the
    second copy is answered with the first verdict, never submitted again; the hub keeps that verdict."""
    desk = node.desk
    envelope = desk.sign(pending_mac(desk), "alice", role="operator")
    held = HeldRequest(fakepve, "GET", "/qemu/100/config")
    before = len(fakepve.requests)
    answer = hub.stub.SubmitOp(pb.SubmitOpRequest(cluster=CLUSTER, envelope=signedop.envelope_to_json(envelope)),
                               timeout=10)
    assert held.seen.wait(20), "the node never read the guest"
    port = hub.running.port
    hub.channel.close()
    from hub import server  # noqa: PLC0415

    server.stop(hub.running, 0.2)
    hub.store.close()
    with capture_logs() as logs, \
            running_hub(SqliteStore.in_dir(tmp_path / "hub"), heartbeat=0.2, listen=f"127.0.0.1:{port}") as again:
        wait_for(lambda: bool(again.running.servicer.feeds.watching()), "the node watching the new hub")
        time.sleep(0.5)  # the new stream's copy of the delivery is on its way to the node
        held.release()
        wait_for(lambda: routed(again, answer.delivery_id)[0].op.fate == "ran", "the op's fate at the hub", 30)
        desk.settle()
        time.sleep(0.5)  # the second copy answered
        (one,) = routed(again, answer.delivery_id)
        assert (one.state, one.op.outcome) == ("accepted", "ok")
    events = [(e["event"], e.get("decision")) for e in logs
              if e["event"] in ("op_submitted", "hub_delivery_repeated", "hub.delivery_sent")]
    assert events.count(("hub.delivery_sent", None)) == 1  # the new hub's copy (the first went before the restart)
    assert events.count(("op_submitted", "accepted")) == 1  # the desk saw it once
    assert events.count(("hub_delivery_repeated", "accepted")) == 1  # the copy answered with the first verdict
    writes = [m for m in mutations(fakepve, before) if m[1] == CONFIG_PATH]
    assert len(writes) == 1, writes

    # The executor restarted too (nothing remembered): its desk refuses the copy (the nonce is spent) and the node
    # answers with the acceptance it was; nothing reaches Proxmox.
    sent: list[pb.StateReport] = []

    def send(report: pb.StateReport) -> bool:
        sent.append(report)
        return True

    fresh = HubDeliveries(desk.desk, desk.engine, send, lambda: AUDIENCE)
    fresh.take(pb.Delivery(delivery_id=answer.delivery_id, envelope=signedop.envelope_to_json(envelope)), CLUSTER,
               AUDIENCE)
    fresh.start()
    try:
        wait_for(lambda: any(report.deliveries for report in sent), "the restarted node's verdict")
    finally:
        fresh.close()
    (verdict,) = [result for report in sent for result in report.deliveries]
    assert (verdict.decision, verdict.reason) == ("accepted", "")
    assert verdict.detail.startswith("accepted before (a redelivery): ")
    assert [m for m in mutations(fakepve, before) if m[1] == CONFIG_PATH] == writes


def test_a_revocation_through_the_hub_vetoes_a_waiting_op(node: Node, hub: Hub, fakepve: Any,
                                                          tmp_path: Path) -> None:
    """An accepted MAC change waits behind a busy lane; alice's op.revoke, submitted through the hub, is revoked by the
    node (``pve-hub submit --wait`` exits 0); the lane freed, the op never runs: Proxmox receives no write and
    the op's delivery shows it REVOKED."""
    desk = node.desk
    envelope = desk.sign(pending_mac(desk), "alice", role="operator")
    op_id = json.loads(envelope.payload)["op_id"]
    gate = hold_lane(desk, 100)
    before = len(fakepve.requests)
    first = hub.stub.SubmitOp(pb.SubmitOpRequest(cluster=CLUSTER, envelope=signedop.envelope_to_json(envelope)),
                              timeout=10)
    wait_for(lambda: routed(hub, first.delivery_id)[0].state == "accepted", "the change accepted")
    revocation = desk.sign(desk.propose(100, "op.revoke", op_id=op_id), "alice", role="operator")
    revoked = pve_hub("submit", write(tmp_path / "revoke.json", revocation), "--cluster", CLUSTER, "--hub",
                      hub.address, "--wait", "--timeout", "30")
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert "REVOKED" in revoked.stdout
    gate.set()
    desk.settle()
    wait_for(lambda: routed(hub, first.delivery_id)[0].op.fate == "revoked", "the op's fate REVOKED at the hub")
    assert [m for m in mutations(fakepve, before) if m[1] == CONFIG_PATH] == []
    assert [r.op_kind for r in routed(hub, op_id)] == ["config.nic_identity", "op.revoke"]


def test_a_delivery_queued_on_one_replica_reaches_the_node_watching_another(pg_server: Any) -> None:
    """Two hubs on one PostgreSQL: a node watching B (saying its audience) gets, within a second, an envelope
    submitted to A; on a new stream it gets it again, until it answers."""
    conninfo = pg_server.create_database(f"hub_deliveries_{os.getpid()}")
    from hub.store import PostgresStore  # noqa: PLC0415

    with running_hub(PostgresStore(conninfo), heartbeat=0.2) as a, running_hub(PostgresStore(conninfo),
                                                                                  heartbeat=0.2) as b:
        watching = b.stub.Watch(pb.WatchRequest(cluster=CLUSTER, node="n1", audience=AUDIENCE))
        next(iter(watching))  # the first event: the stream is up and the audience recorded
        from tests.signed_helpers import seal  # noqa: PLC0415

        envelope = signedop.envelope_to_json(seal(json.dumps(_payload(AUDIENCE)).encode(), "alice"))
        submitted = time.monotonic()
        answer = a.stub.SubmitOp(pb.SubmitOpRequest(cluster=CLUSTER, envelope=envelope), timeout=10)
        assert answer.node == "n1"
        event = next(e for e in watching if e.HasField("delivery"))
        arrived = time.monotonic()
        watching.cancel()
        assert (event.delivery.delivery_id, event.delivery.envelope) == (answer.delivery_id, envelope)
        assert arrived - submitted < 1.0, f"{arrived - submitted:.3f}s"
        again = b.stub.Watch(pb.WatchRequest(cluster=CLUSTER, node="n1", audience=AUDIENCE))
        first, second = next(again), next(again)  # a new stream: a heartbeat, then the delivery again (no verdict)
        again.cancel()
        assert first.HasField("heartbeat") and second.delivery.delivery_id == answer.delivery_id


def _payload(audience: str) -> dict[str, object]:
    """A stop's payload for ``audience`` (the hub reads it, never verifies it)."""
    return {"v": 1, "op_id": "ab" * 16, "audience": audience, "vmid": 100, "guest_type": "qemu", "kind": "stop",
            "params": {}, "class": "APPROVAL", "precondition": {"digest": "0" * 40, "run_state": "running"},
            "challenge": None, "role": "operator", "not_before": 1, "not_after": 2, "reason": "x"}


def test_bad_submissions_are_refused_naming_the_field(hub: Hub) -> None:
    """Not an envelope, over the size limit, no node with the audience: INVALID_ARGUMENT naming the field, or
    NOT_FOUND; nothing queued. An unknown id is NOT_FOUND; a bad one INVALID_ARGUMENT."""
    def refused(envelope: bytes) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as error:
            hub.stub.SubmitOp(pb.SubmitOpRequest(cluster=CLUSTER, envelope=envelope), timeout=10)
        return error.value.code(), error.value.details()

    assert refused(b"{}")[0] == grpc.StatusCode.INVALID_ARGUMENT and refused(b"{}")[1].startswith("envelope")
    code, details = refused(b" " * (MAX_OP_ENVELOPE + 1))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                               f"envelope: {MAX_OP_ENVELOPE + 1} bytes, over the limit of {MAX_OP_ENVELOPE} bytes; "
                               "nothing stored")
    from tests.signed_helpers import seal  # noqa: PLC0415

    nobody = signedop.envelope_to_json(seal(json.dumps(_payload("pve9@fakecluster")).encode(), "alice"))
    assert refused(nobody) == (grpc.StatusCode.NOT_FOUND, "payload.audience: no node of cluster fakecluster has "
                                                          "reported audience pve9@fakecluster")
    assert hub.store.deliveries(CLUSTER) == []
    for ident, code in (("ab" * 16, grpc.StatusCode.NOT_FOUND), ("nope", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as error:
            routed(hub, ident)
        assert error.value.code() == code


def test_pve_hub_submit_names_a_bad_file_and_an_unreachable_hub(tmp_path: Path) -> None:
    """A file that is not an envelope: exit 2 naming it (nothing sent); a hub that cannot be reached: exit 1."""
    bad = tmp_path / "op.json"
    bad.write_text('{"payloadType": "x"}\n', encoding="utf-8")
    usage = pve_hub("submit", str(bad), "--cluster", CLUSTER, "--hub", "127.0.0.1:9")
    assert usage.returncode == 2 and usage.stderr.startswith(f"pve-hub submit: ENVELOPE {bad}: MALFORMED: "), usage
    from tests.signed_helpers import seal  # noqa: PLC0415

    write(bad, seal(json.dumps(_payload(AUDIENCE)).encode(), "alice"))
    down = pve_hub("submit", str(bad), "--cluster", CLUSTER, "--hub", "127.0.0.1:9")
    # the flag to check named once, after the command (not "pve-hub submit: submit: ...")
    assert down.returncode == 1, down
    assert down.stderr.startswith("pve-hub submit: --hub 127.0.0.1:9: the hub is unavailable"), down.stderr


def test_a_daemon_watching_the_hub_takes_an_approval_through_it(fakepve: Any, fakepve_cafile: str, planner: Any,
                                                                  tmp_path: Path) -> None:
    """``pve-executor run --hub``: the daemon's own wiring. It takes the cluster's document from the hub, refuses
    the MAC change it declares for approval and reports it; the entry listed by ListPending, signed by alice and
    submitted with ``pve-hub submit --wait``, runs once (exit 0, RAN ok)."""
    from tests.executor_helpers import cli, unused_port  # noqa: PLC0415
    from tests.signed_helpers import Daemon, roles, signed_by  # noqa: PLC0415
    from tests.signing import key_entry, write_store  # noqa: PLC0415
    from tests.test_hub_provider import document  # noqa: PLC0415

    add_vm(fakepve, 100, net0=f"virtio={MAC_OLD},bridge=vmbr0")
    publisher = {"name": "publisher", "kinds": ["desired.apply"], "classes": ["APPROVAL"], "max_ttl": "1h",
                 "audiences": [AUDIENCE], "threshold": 1}
    trust = write_store(tmp_path, {"version": 1, "roles": [*roles(), publisher],
                                   "keys": [key_entry("alice", ["destroyer", "operator", "publisher"])]})
    desired = f"guests:\n  - vmid: 100\n    config:\n      net0: 'virtio={MAC_NEW},bridge=vmbr0'\n"
    with running_hub(SqliteStore.in_dir(tmp_path / "hub"), heartbeat=0.5) as hub:
        hub.stub.Apply(pb.ApplyRequest(cluster=CLUSTER, expected_version=0,
                                       envelope=document(1, desired=desired, cluster=CLUSTER)), timeout=10)
        command = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path,
                      "run", "--trust-store", str(trust), "--state-dir", str(tmp_path / "state"), "--hub",
                      hub.address, "--interval", "1")
        with Daemon(command, unused_port()) as daemon:
            daemon.wait_serving()
            wait_for(lambda: bool(hub.stub.ListPending(pb.ListPendingRequest(cluster=CLUSTER), timeout=10).pending),
                     "the daemon's report of its pending approval", 30)
            (item,) = hub.stub.ListPending(pb.ListPendingRequest(cluster=CLUSTER), timeout=10).pending
            assert (item.node, item.vmid, item.op_kind) == (AUDIENCE, 100, "config.nic_identity")
            proposal = Proposal(action=json.loads(item.descriptor), challenge=item.challenge or None)
            before = len(fakepve.requests)
            ran = pve_hub("submit", write(tmp_path / "op.json", signed_by(proposal, "alice", role="operator")),
                          "--cluster", CLUSTER, "--hub", hub.address, "--wait", "--timeout", "60")
            assert ran.returncode == 0, ran.stdout + ran.stderr
            assert "RAN ok" in ran.stdout
            assert [path for _, path in mutations(fakepve, before) if path == CONFIG_PATH] == [CONFIG_PATH]
            assert daemon.stop() == 0
