"""Red team on the fleet view (issue 17): a hostile node's StateReports against what an operator reads and pastes
(`pve-hub status --node`, `pve-hub pending`, `pve-hub submit --wait`), and a hub that sends a node anything as a
delivery (docs/SAFETY.md §6.9, §12). Real hub over real gRPC on loopback, the CLI in subprocesses, the node's real
desk and HubDeliveries over fakepve."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from executor.api.deliveries import HubDeliveries
from executor.loop.desired import Declared
from hub import approvals
from hub.store import SqliteStore
from hub.v1 import hub_pb2 as pb
from safety import signedop
from safety.payload import action_of
from tests import signing
from tests.hub_helpers import Hub, running_hub
from tests.hub_helpers import envelope as desired_envelope
from tests.signed_helpers import AUDIENCE, add_vm, mutations, open_desk
from tests.test_hub_approvals import CONFIG_PATH, MAC_NEW, MAC_OLD, Make, pending_mac, pve_hub, wait_for

CLUSTER = "fakecluster"
ESC = "\x1b]0;pwned\x07\x1b[2J\x1b[1A"  # set the title, clear the screen, move up: a forged line follows
GOOD, EVIL = "pve1@fakecluster", "pve2@fakecluster"


@pytest.fixture(name="hub")
def _hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(SqliteStore.in_dir(tmp_path / "hub"), heartbeat=0.2) as hub:
        yield hub


def descriptor(audience: str, vmid: int = 105) -> bytes:
    """A well-formed pending descriptor (what a gate sends) for ``audience``."""
    action = action_of(audience=audience, vmid=vmid, guest_type="qemu", kind="snapshot.create",
                       params={"snapname": "s1"}, class_="APPROVAL", digest="0" * 40, run_state="running")
    return json.dumps(action, sort_keys=True, separators=(",", ":")).encode()


def pending(desc: bytes, audience: str) -> pb.PendingApproval:
    """A pending approval as a node's report carries it."""
    return pb.PendingApproval(node=audience, vmid=105, op_kind="snapshot.create", action_class="APPROVAL",
                              rule="snapshot.create", reasons=["r"], descriptor=desc,
                              descriptor_sha256=hashlib.sha256(desc).hexdigest(), audience=audience)


def report(node: str, *guests: pb.GuestState, **fields: Any) -> pb.StateReport:
    """A full StateReport from ``node`` (its audience: its name)."""
    return pb.StateReport(cluster=CLUSTER, node=node, audience=node, session="s1", seq=1, full=True,
                          interval_seconds=30, at_unix_ms=int(time.time() * 1000), guests=guests, **fields)


def collect(sent: list[pb.StateReport]) -> Callable[[pb.StateReport], bool]:
    """A node's report sender that keeps what it sends (the hub always takes it)."""
    def send(report: pb.StateReport) -> bool:
        sent.append(report)
        return True
    return send


# --- what a hostile node's report prints ---------------------------------------------------------------------------


def test_a_hostile_nodes_text_reaches_no_terminal_raw_in_status_node(hub: Hub) -> None:
    """A node's guest reason, tick outcome and op fate/outcome go through `pve-hub status --node` with every control
    character escaped: no escape sequence reaches the operator's terminal (it could clear it and forge lines).
    Failed before the fix: reason, tick_outcome, fate and outcome were printed raw (status.render_guest/_node)."""
    guest = pb.GuestState(vmid=105, state=pb.SYNC_STATE_REFUSED, reason=f"R{ESC}", detail=f"D{ESC}",
                          name=f"N{ESC}", diffs=[pb.KeyDiff(key=f"k{ESC}", declared=ESC, actual=ESC)])
    op = pb.OpReport(op_id="a" * 32, vmid=105, op_kind="stop", fate=f"ran{ESC}", outcome=f"ok{ESC}",
                     detail=f"d{ESC}", at_unix_ms=1)
    hub.stub.ReportState(report(EVIL, guest, ops=[op], tick_outcome=f"failed{ESC}", tick_error=ESC), timeout=10)
    for args in (("--node", EVIL), ()):
        done = pve_hub("status", "--hub", hub.address, "--cluster", CLUSTER, *args)
        assert done.returncode == 4, done.stderr
        assert "\x1b" not in done.stdout + done.stderr and "\x07" not in done.stdout + done.stderr
        assert "\\x1b]0;pwned" in done.stdout  # shown, escaped


def test_a_hostile_nodes_verdict_reaches_no_terminal_raw_in_submit_wait(hub: Hub) -> None:
    """`pve-hub submit --wait` prints the node's verdict and the op's fate: a node's reason, detail, fate, outcome and
    UPID are escaped. Failed before the fix (approvals.lines printed them raw)."""
    hub.stub.ReportState(report(EVIL), timeout=10)
    envelope = signedop.envelope_to_json(signing.seal(signing.encode(signing.approval_op(audience=EVIL,
                                                                                        op_id="b" * 32)), "alice"))
    answer = hub.stub.SubmitOp(pb.SubmitOpRequest(cluster=CLUSTER, envelope=envelope), timeout=10)
    hub.stub.ReportState(pb.StateReport(cluster=CLUSTER, node=EVIL, audience=EVIL, deliveries=[
        pb.DeliveryResult(delivery_id=answer.delivery_id, decision="refused", reason=f"X{ESC}", detail=f"Y{ESC}",
                          op_id="b" * 32)]), timeout=10)
    (routed,) = hub.stub.GetOpStatus(pb.GetOpStatusRequest(cluster=CLUSTER, id=answer.delivery_id), timeout=10).ops
    shown = "\n".join(approvals.lines(routed))
    assert "X" in shown and "\x1b" not in shown and "\x07" not in shown
    routed.state, routed.op.fate, routed.op.outcome, routed.op.detail, routed.op.upid = \
        "accepted", f"ran{ESC}", f"ok{ESC}", ESC, ESC
    shown = "\n".join(approvals.lines(routed))
    assert "\x1b" not in shown and "\x07" not in shown


def test_a_pending_approval_for_another_nodes_guest_is_not_listed_under_the_reporter(hub: Hub) -> None:
    """A hostile pve2 reports a pending approval whose descriptor names pve1's guest: listed as "node pve2", its
    sign command makes the operator sign an op that the hub routes to pve1 (the descriptor's audience). The hub
    refuses a pending entry whose descriptor's audience is not the reporting node's."""
    hub.stub.ReportState(report(GOOD), timeout=10)
    guest = pb.GuestState(vmid=105, state=pb.SYNC_STATE_PENDING_APPROVAL, pending=[pending(descriptor(GOOD), EVIL)])
    try:
        hub.stub.ReportState(report(EVIL, guest), timeout=10)
    except Exception as exc:  # refused: INVALID_ARGUMENT naming the field
        assert "descriptor" in str(exc) and "audience" in str(exc)
    listed = pve_hub("pending", "--hub", hub.address, "--cluster", CLUSTER)
    assert listed.returncode == 0, listed.stderr
    assert GOOD not in listed.stdout, listed.stdout


def test_one_nodes_unparsable_descriptor_does_not_hide_every_other_approval(hub: Hub) -> None:
    """A node's descriptor `pve-hub pending` cannot read (a gate's "still shown, never signable" descriptor, or a
    hostile node's) costs that entry only: the other nodes' approvals are still listed."""
    good = pb.GuestState(vmid=105, state=pb.SYNC_STATE_PENDING_APPROVAL, pending=[pending(descriptor(GOOD), GOOD)])
    hub.stub.ReportState(report(GOOD, good), timeout=10)
    unreadable = pending(b'{"audience": "pve2@fakecluster", "kind": "x"}', EVIL)
    bad = pb.GuestState(vmid=106, state=pb.SYNC_STATE_PENDING_APPROVAL, pending=[unreadable])
    hub.stub.ReportState(report(EVIL, bad), timeout=10)
    listed = pve_hub("pending", "--hub", hub.address, "--cluster", CLUSTER)
    assert listed.returncode == 0 and "left out node pve2@fakecluster guest 105" in listed.stderr, listed.stderr
    assert "TAKE A SNAPSHOT of guest 105 (qemu) on pve1@fakecluster" in listed.stdout, listed.stdout + listed.stderr


# --- what a hub may send a node as a delivery --------------------------------------------------------------------


def test_nothing_a_hub_sends_as_a_delivery_runs_and_a_signed_op_runs_once(fakepve: Any, make_engine: Make,
                                                                           tmp_path: Path) -> None:
    """A compromised hub hands the node's HubDeliveries: a desired document, garbage, an empty envelope, a huge one,
    the real op with a byte changed, and then the real op three times under three delivery ids while the operator
    also submits it locally. Each non-op is refused with a typed reason; the op runs once; Proxmox gets one write."""
    add_vm(fakepve, 100, net0=f"virtio={MAC_OLD},bridge=vmbr0")
    desk = open_desk(make_engine, tmp_path, [Declared(vmid=100, config={"net0": f"virtio={MAC_NEW},bridge=vmbr0"})])
    good = signedop.envelope_to_json(desk.sign(pending_mac(desk), "alice", role="operator"))
    at = good.index(b'"sig": "') + 20
    tampered = good[:at] + (b"B" if good[at:at + 1] == b"A" else b"A") + good[at + 1:]
    sent: list[pb.StateReport] = []
    deliveries = HubDeliveries(desk.desk, desk.engine, collect(sent), lambda: AUDIENCE)
    hostile = {"doc": desired_envelope("guests: []\n", 1), "junk": b"\xff\x00not json", "empty": b"",
               "huge": b'{"payload": "' + b"A" * (1 << 20) + b'", "signatures": []}', "tampered": tampered}
    before = len(fakepve.requests)
    for ident, body in hostile.items():
        deliveries.take(pb.Delivery(delivery_id=ident, envelope=body), CLUSTER, AUDIENCE)
    deliveries.start()
    try:
        for ident in ("d1", "d2", "d1"):
            deliveries.take(pb.Delivery(delivery_id=ident, envelope=good), CLUSTER, AUDIENCE)
        local = desk.submit(signedop.parse_envelope_json(good))
        wait_for(lambda: len({r.delivery_id for s in sent for r in s.deliveries}) == len(hostile) + 2, "verdicts")
        desk.settle()
    finally:
        deliveries.close()
    verdicts = {r.delivery_id: r for s in sent for r in s.deliveries}
    for ident in hostile:
        assert verdicts[ident].decision == "refused" and verdicts[ident].reason, verdicts[ident]
    assert verdicts["tampered"].reason == "SIGNATURE_INVALID"
    accepted = [v for v in verdicts.values() if v.decision == "accepted"]
    assert {v.delivery_id for v in accepted} <= {"d1", "d2"} and all(v.op_id == accepted[0].op_id for v in accepted)
    assert local[1] is None or local[1].reason in ("NONCE_SPENT", "NONCE_IN_FLIGHT"), local
    assert [path for _, path in mutations(fakepve, before)] == [CONFIG_PATH]


# --- the web page ------------------------------------------------------------------------------------------------


@pytest.fixture(name="web")
def _web(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(SqliteStore.in_dir(tmp_path / "web"), web_listen="127.0.0.1:0") as hub:
        yield hub


def raw_http(port: int, request: bytes) -> bytes:
    """``request`` as sent on one connection, the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_web_page_serves_no_file_and_answers_no_other_host_or_forged_header(web: Hub) -> None:
    """Held: the only file served is the built-in style sheet (no traversal to anything else, however spelled); a
    DNS-rebinding Host is 421; a CR/LF in the path reaches no header; every answer carries the CSP."""
    assert web.running.web_endpoint is not None
    port = web.running.web_endpoint.port
    host = f"Host: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    for path in (b"/../../../../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd", b"/style.css/../../../etc/passwd",
                 b"/..%2f..%2fetc%2fpasswd", b"/static/style.css/..%2f..%2f__init__.py", b"//etc/passwd",
                 b"/clusters/x%0d%0aSet-Cookie:%20a=b"):
        answer = raw_http(port, b"GET " + path + b" HTTP/1.1\r\n" + host)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"root:" not in body and b"import" not in body, path
        assert b"Set-Cookie" not in head and b"Content-Security-Policy: default-src 'none'" in head, head
    answer = raw_http(port, b"GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 421") or answer.startswith(b"HTTP/1.1 421"), answer[:80]


def test_an_idle_connection_does_not_hold_a_web_thread_for_ever(web: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that connects and sends nothing (or half a request) is cut off after the web's request timeout:
    many such clients cannot pin one thread each in the hub's process for ever. Failed before the fix (the handler
    had no timeout: the connection stayed open)."""
    assert web.running.web_endpoint is not None
    handler: Any = web.running.web_endpoint.server.RequestHandlerClass
    assert handler.timeout is not None and 0 < handler.timeout <= 60, handler.timeout
    monkeypatch.setattr(handler, "timeout", 0.5)  # shorter than shipped (web.server.REQUEST_TIMEOUT), for the test
    with socket.create_connection(("127.0.0.1", web.running.web_endpoint.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")  # half a request, then nothing
        started = time.monotonic()
        sock.settimeout(5)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
    assert closed and time.monotonic() - started < 5


def test_a_revocation_delivered_before_its_op_still_vetoes_it(fakepve: Any, make_engine: Make,
                                                               tmp_path: Path) -> None:
    """Held: a hub that reorders delivers alice's op.revoke first, then the op it names (twice): the op is refused
    (it was revoked before it arrived) and Proxmox gets no write."""
    add_vm(fakepve, 100, net0=f"virtio={MAC_OLD},bridge=vmbr0")
    desk = open_desk(make_engine, tmp_path, [Declared(vmid=100, config={"net0": f"virtio={MAC_NEW},bridge=vmbr0"})])
    envelope = desk.sign(pending_mac(desk), "alice", role="operator")
    op_id = json.loads(envelope.payload)["op_id"]
    revocation = desk.sign(desk.propose(100, "op.revoke", op_id=op_id), "alice", role="operator")
    sent: list[pb.StateReport] = []
    deliveries = HubDeliveries(desk.desk, desk.engine, collect(sent), lambda: AUDIENCE)
    before = len(fakepve.requests)
    for ident, body in (("r", revocation), ("o1", envelope), ("o2", envelope)):
        deliveries.take(pb.Delivery(delivery_id=ident, envelope=signedop.envelope_to_json(body)), CLUSTER, AUDIENCE)
    deliveries.start()
    try:
        wait_for(lambda: len({r.delivery_id for s in sent for r in s.deliveries}) == 3, "three verdicts")
        desk.settle()
    finally:
        deliveries.close()
    verdicts = {r.delivery_id: (r.decision, r.reason) for s in sent for r in s.deliveries}
    assert verdicts["r"][0] == "revoked" and verdicts["o1"][0] == verdicts["o2"][0] == "refused", verdicts
    assert [m for m in mutations(fakepve, before) if m[1] == CONFIG_PATH] == []


def test_two_nodes_pending_floods_do_not_hide_every_approval_from_pve_hub_pending(hub: Hub) -> None:
    """A hostile node (or two) fills its report with pending approvals under every limit the hub has; the cluster's
    other approvals must still be listed by `pve-hub pending` (taken in turn from each node, the rest counted), and a
    descriptor no signed op could carry is refused at ReportState."""
    good = pb.GuestState(vmid=105, state=pb.SYNC_STATE_PENDING_APPROVAL, pending=[pending(descriptor(GOOD), GOOD)])
    hub.stub.ReportState(report(GOOD, good), timeout=10)
    huge = json.dumps({"audience": "pve2@fakecluster", "pad": "A" * (64 << 10)}).encode()
    with pytest.raises(grpc.RpcError) as refused:
        hub.stub.ReportState(report("pve2@fakecluster", pb.GuestState(
            vmid=200, state=pb.SYNC_STATE_PENDING_APPROVAL, pending=[pending(huge, "pve2@fakecluster")])), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "guests[0].pending[0].descriptor: " in str(refused.value.details())
    for name in ("pve2@fakecluster", "pve3@fakecluster"):
        pad = json.dumps({"audience": name, "pad": "A" * (47 << 10)}).encode()
        flood = [pb.GuestState(vmid=200 + i, state=pb.SYNC_STATE_PENDING_APPROVAL, pending=[pending(pad, name)])
                 for i in range(160)]
        hub.stub.ReportState(report(name, *flood), timeout=30)
    listed = pve_hub("pending", "--hub", hub.address, "--cluster", CLUSTER)
    assert "TAKE A SNAPSHOT of guest 105 (qemu) on pve1@fakecluster" in listed.stdout, listed.stderr[-300:]
    assert "more left out (the answer reached its size limit" in listed.stderr
