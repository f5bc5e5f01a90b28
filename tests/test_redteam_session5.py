"""Red team (session 5): ops keyed by (op id, payload sha256), per-op refusal keys, the journal's op-id reservation,
signed ops the hub delivers (executor.api.deliveries).

Real parts: fakepve over HTTPS, the in-process desk with its real journal (files, fsync), real journal files.
Each test pins a defence that holds or a hole (fixed, or open as a strict xfail).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.api.deliveries import HubDeliveries
from executor.loop.hub import HubProvider
from executor.loop.hubheld import PASSED_FILE
from executor.signed.trust import TrustKeeper
from hub.v1 import hub_pb2 as pb
from journal import Journal, KeyInFlightError, NonceSpentError, Outcome
from safety import desireddoc, signedop
from safety.desireddoc import Held
from safety.payload import parse_payload, to_json
from safety.signedop import Envelope
from tests.executor_helpers import ROOT
from tests.signed_helpers import AUDIENCE, add_vm, mutations, open_desk, seal, unsigned_of
from tests.signing import key_entry, kid, write_store
from tests.test_hub_provider import (  # noqa: F401  (fixtures)
    CLUSTER,
    DESIRED,
    Served,
    _served,
    document,
    make_provider,
    reports,
    sha,
    wait_for,
)
from tests.test_hub_provider import store_doc as hub_store_doc


def _with_op_id(envelope: Envelope, op_id: str, *signers: str) -> Envelope:
    """The same signed action under a chosen op id."""
    payload = dataclasses.replace(parse_payload(envelope.payload), op_id=op_id)
    return seal(to_json(payload), *signers)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


# --- deliveries: a redelivery's "accepted before" must be this op's, not another op's under its id --------------

def test_a_refused_op_redelivered_is_not_reported_accepted_because_another_op_shares_its_id(
        make_engine: Any, fakepve: Any, tmp_path: Path) -> None:
    """Op B (a snapshot of guest 107) is refused DIGEST_STALE (the guest changed after signing), which spends it.
    Op A (a snapshot of guest 108) signed under B's op id runs. The hub delivers B (again, or for the first time
    to this process): the desk refuses it NONCE_SPENT, and the node reported it "accepted before (a redelivery)"
    because *an* op under that id ran: the hub and its operator are told a refused op was accepted (its fate
    then read as A's RAN). The redelivery's acceptance must be the op's own: matched by payload sha256 too."""
    add_vm(fakepve, 107)
    add_vm(fakepve, 108)
    desk = open_desk(make_engine, tmp_path)
    stale = desk.sign(unsigned_of(desk.propose(107, "snapshot.create", snapname="sb")), "alice", role="operator")
    fakepve.vm(107).config["description"] = "changed after signing"
    op_id, refusal = desk.run(stale)
    assert refusal is not None and refusal.reason == "DIGEST_STALE", refusal
    other = _with_op_id(desk.sign(unsigned_of(desk.propose(108, "snapshot.create", snapname="sa")), "alice",
                                  role="operator"), op_id, "alice")
    assert desk.run(other)[1] is None and "sa" in fakepve.vm(108).snapshots
    before = len(fakepve.requests)

    sent: list[pb.StateReport] = []

    def send(report: pb.StateReport) -> bool:
        sent.append(report)
        return True

    deliveries = HubDeliveries(desk.desk, desk.engine, send, lambda: AUDIENCE)
    deliveries.take(pb.Delivery(delivery_id="d-b", envelope=signedop.envelope_to_json(stale)), CLUSTER, AUDIENCE)
    deliveries.start()
    try:
        _wait_for(lambda: any(report.deliveries for report in sent), "the node's verdict")
    finally:
        deliveries.close()
    (verdict,) = [result for report in sent for result in report.deliveries]
    assert (verdict.decision, verdict.reason) == ("refused", "NONCE_SPENT"), verdict
    assert mutations(fakepve, before) == []
    assert "sb" not in fakepve.vm(107).snapshots


# --- a floor reset left in the trust store from an earlier incident ----------------------------------------------

def _publishers_store(version: int, *, revoked: list[str], resets: list[dict[str, Any]]) -> dict[str, Any]:
    """alice, bob and carol publish (threshold 1); ``revoked`` names whose keys are revoked."""
    doc = hub_store_doc()
    doc["version"] = version
    doc["keys"] = [key_entry("alice", ["publisher", "operator"]), key_entry("carol", ["publisher", "operator"]),
                   key_entry("bob", ["publisher"])]
    doc["revoked"] = {"keys": [kid(name) for name in revoked]}
    doc["floor_resets"] = resets
    return doc


def test_a_stale_floor_reset_lets_a_broken_hub_roll_a_node_back_after_a_later_revocation(
        served: Served, tmp_path: Path, providers: list[HubProvider]) -> None:
    """Incident 1: alice's key revoked, bob's version 2 named as cluster-a's floor reset. Life goes on: carol signs
    version 3, bob version 4; the node holds 4. Incident 2: bob's key is revoked (trust store v3), the operators
    meaning the node to keep its floor (4) until carol signs version 5; the incident-1 reset is still in the store
    (nothing says to remove it). The node's version 4 no longer verifies, so the stale reset lowered its floor to
    2, and a broken hub replaying carol's version 3 (old, still validly signed) had the node take it and manage
    from it, a rollback the version floor exists to stop (docs/SAFETY.md §6.9: "nothing a hub sends lowers a
    floor"). Fixed: a reset is recorded passed (durably) before a version above it is saved, never applied again."""
    state = tmp_path / "state"
    state.mkdir()
    v2 = document(2, sha(document(1)), signers=("bob",))  # version 1 was alice's (revoked)
    reset = [{"cluster": CLUSTER, "version": 2, "sha256": sha(v2), "replaces": [sha(document(1))]}]
    keeper = TrustKeeper(str(write_store(tmp_path, _publishers_store(2, revoked=["alice"], resets=reset))),
                         str(state))
    provider = make_provider(providers, served.port, keeper, state)
    served.hub.push(v2)
    wait_for(lambda: provider.held.version == 2, "bob's version 2")
    v3 = document(3, sha(v2), signers=("carol",), desired=DESIRED.replace("4096", "2048"))
    served.hub.push(v3)
    wait_for(lambda: provider.held.version == 3, "carol's version 3")
    v4 = document(4, sha(v3), signers=("bob",), desired=DESIRED.replace("4096", "1024"))
    served.hub.push(v4)
    wait_for(lambda: provider.held.version == 4, "bob's version 4")
    write_store(tmp_path, _publishers_store(3, revoked=["alice", "bob"], resets=reset))
    keeper.reload()
    assert provider.desired() == []  # bob's version 4 no longer verifies: nothing managed from it
    assert provider.held.version == 4, provider.held  # the stale reset once lowered it to 2 here
    provider.close()  # a restart under the same store: the reset stays passed (state_dir/hub-resets-passed)
    again = make_provider(providers, served.port, keeper, state)
    wait_for(lambda: len(served.hub.watches) >= 2, "the restarted node watching")
    assert again.desired() == [] and again.held.version == 4, again.held
    seen = len(served.hub.reports)
    served.hub.push(v3)  # the broken hub replays carol's older version
    served.hub.push(document(5, sha(v4), signers=("carol",), desired=DESIRED.replace("4096", "512")))
    wait_for(lambda: [g.config for g in again.desired()] == [{"memory": "512"}], "carol's version 5")
    assert (3, True, "") not in reports(served.hub)[seen:], reports(served.hub)


def _verdicts(desk: Any, delivery: pb.Delivery) -> list[pb.DeliveryResult]:
    """The verdict a freshly started HubDeliveries (an executor just restarted: nothing remembered) sends."""
    sent: list[pb.StateReport] = []

    def send(report: pb.StateReport) -> bool:
        sent.append(report)
        return True

    deliveries = HubDeliveries(desk.desk, desk.engine, send, lambda: AUDIENCE)
    deliveries.take(delivery, CLUSTER, AUDIENCE)
    deliveries.start()
    try:
        _wait_for(lambda: any(report.deliveries for report in sent), "the node's verdict")
    finally:
        deliveries.close()
    return [result for report in sent for result in report.deliveries]


def test_a_revocation_redelivered_after_a_restart_is_reported_revoked_not_refused(
        make_engine: Any, fakepve: Any, tmp_path: Path) -> None:
    """The hub delivers alice's op.revoke of a snapshot waiting for its guest's lock; the node journals the veto
    and is killed before its verdict reached the hub. Restarted, it is sent the same delivery again: the desk
    refuses it (OP_REVOKED, "already revoked by these keys"), and the node told the hub the revocation was
    refused, while it stands: an operator reading ``pve-hub submit --wait`` (exit 1) would think the op may still
    run. As a redelivered op is "accepted", a redelivered revocation the journal holds is "revoked"."""
    add_vm(fakepve, 107)
    desk = open_desk(make_engine, tmp_path)
    fakepve.vm(107).lock = "backup"
    op_id, refusal = desk.run(desk.sign(unsigned_of(desk.propose(107, "snapshot.create", snapname="s1")), "alice",
                                        role="operator"))
    assert refusal is None, refusal
    revocation = desk.sign(desk.propose(107, "op.revoke", op_id=op_id), "alice", role="operator")
    delivery = pb.Delivery(delivery_id="d-revoke", envelope=signedop.envelope_to_json(revocation))
    (first,) = _verdicts(desk, delivery)
    assert (first.decision, first.op_id) == ("revoked", op_id), first
    (again,) = _verdicts(desk, delivery)  # the restarted node's answer to the same delivery
    assert (again.decision, again.op_id) == ("revoked", op_id), again
    fakepve.vm(107).lock = None
    desk.settle()
    assert "s1" not in fakepve.vm(107).snapshots


# --- the journal's op-id reservation under kill -9 -----------------------------------------------------------------

_TORN = """
import os, sys, time
from journal import Journal, segments

def torn(self, data):
    end = self.size + len(data)
    if end > self.capacity:
        self._extend(end)
    segments._pwrite_all(self.fd, data[: len(data) // 2], self.size)
    os.fdatasync(self.fd)
    print("torn", flush=True)
    time.sleep(60)

journal = Journal.open(sys.argv[1])
journal.begin(vmid=100, kind="detach", payload={"k": 1}, key="op:a:1", op_id="a" * 32)
segments.ActiveSegment.append = torn
journal.begin(vmid=101, kind="detach", payload={"k": 2}, key="op:b:2", op_id="b" * 32)
"""


def test_kill_9_while_an_op_id_is_reserved_leaves_it_free_and_the_journal_whole(tmp_path: Path) -> None:
    """A process reserves op id b (and its nonce) and is SIGKILLed with half of b's begun record on disk. Reopened:
    a is in flight (its record was durable), b is not and its id and nonce are free (begin takes them), a second
    begin under a's id is refused in flight; records written after the torn tail survive the next reopen."""
    path = tmp_path / "journal"
    child = subprocess.Popen([sys.executable, "-c", _TORN, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "torn"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    with Journal.open(path) as journal:
        assert [f.op_id for f in journal.in_flight()] == ["a" * 32]
        with pytest.raises(KeyInFlightError):
            journal.begin(vmid=102, kind="detach", payload={"k": 3}, key="op:a:3", op_id="a" * 32)
        journal.check_key("op:a:3")  # the refused begin reserved nothing
        assert journal.begin(vmid=101, kind="detach", payload={"k": 2}, key="op:b:2", op_id="b" * 32) == "b" * 32
        journal.end("b" * 32, Outcome.OK)
        journal.end("a" * 32, Outcome.FAILED)
    with Journal.open(path) as journal:
        assert journal.in_flight() == [] and sorted(journal.keys_of("b" * 32)) == ["op:b:2"]
        with pytest.raises(NonceSpentError):
            journal.check_key("op:b:2")
        with pytest.raises(NonceSpentError):
            journal.check_key("op:a:1")


def test_a_floor_reset_for_another_cluster_or_naming_no_signed_document_lowers_nothing_a_hub_can_use(
        served: Served, tmp_path: Path, providers: list[HubProvider]) -> None:
    """bob's version 3 is held; bob's key is revoked. A reset of cluster-b (another cluster) leaves the floor at 3: a
    broken hub's replay of carol's version 2 is refused. Then a reset of cluster-a whose sha256 names a document
    nobody signed: the floor is (2, that sha256), and carol's real version 2 is a FORK, her version 3 (linked to her
    2, not to the floor) too; only a version two above the floor (a skip) is taken."""
    state = tmp_path / "state"
    state.mkdir()
    keeper = TrustKeeper(str(write_store(tmp_path, _publishers_store(1, revoked=[], resets=[]))), str(state))
    provider = make_provider(providers, served.port, keeper, state)
    v1 = document(1, signers=("carol",))
    v2 = document(2, sha(v1), signers=("carol",), desired=DESIRED.replace("4096", "2048"))
    v3 = document(3, sha(v2), signers=("bob",), desired=DESIRED.replace("4096", "1024"))
    for envelope in (v1, v2, v3):
        served.hub.push(envelope)
    wait_for(lambda: provider.held.version == 3, "bob's version 3")
    other = [{"cluster": "cluster-b", "version": 2, "sha256": sha(v2), "replaces": [sha(v3)]}]
    write_store(tmp_path, _publishers_store(2, revoked=["bob"], resets=other))
    keeper.reload()
    assert provider.desired() == [] and provider.held.version == 3
    bogus = [{"cluster": CLUSTER, "version": 2, "sha256": "0" * 64, "replaces": [sha(v3)]}]
    watches = len(served.hub.watches)
    write_store(tmp_path, _publishers_store(3, revoked=["bob"], resets=bogus))
    keeper.reload()
    assert provider.desired() == []
    wait_for(lambda: provider.held.version == 2 and provider.held.sha256 == "0" * 64, "the floor reset")
    # The reset reopens the stream; pushed before it is open, the versions below would never be sent to this node
    # (a new stream starts at the hub's latest), and nothing would be refused.
    wait_for(lambda: len(served.hub.watches) > watches, "the stream reopened after the reset")
    seen = len(served.hub.reports)
    served.hub.push(v2)
    served.hub.push(document(3, sha(v2), signers=("carol",), desired=DESIRED.replace("4096", "512")))
    served.hub.push(document(4, sha(v3), signers=("carol",), desired=DESIRED.replace("4096", "256")))
    wait_for(lambda: [g.config for g in provider.desired()] == [{"memory": "256"}], "carol's version 4 (a skip)")
    answered = [r for r in reports(served.hub)[seen:] if r[0] in (2, 3)]
    assert {(2, False, "FORK"), (3, False, "FORK")} <= set(answered) and not any(ok for _, ok, _ in answered), answered


def test_a_reset_meant_for_another_nodes_floor_never_lowers_this_one(
        served: Served, tmp_path: Path, providers: list[HubProvider]) -> None:
    """This node holds bob's version 4 (bob 2, carol 3, bob 4), taken before any reset. The store then names bob's
    version 2 as cluster-a's reset, replacing the floor alice's stolen key pushed another node to; nothing changes
    here (version 4 is trusted). Later bob's key is revoked and the reset is still there: this node's version 4 no
    longer verifies, but the reset does not name its floor, so the floor stays at 4 and a broken hub's replay of
    carol's version 3 is a ROLLBACK (session 5's open row: the reset lowered it to 2 and version 3 was taken).
    Carol's version 5 is taken as usual."""
    state = tmp_path / "state"
    state.mkdir()
    keeper = TrustKeeper(str(write_store(tmp_path, _publishers_store(1, revoked=[], resets=[]))), str(state))
    provider = make_provider(providers, served.port, keeper, state)
    v2 = document(2, sha(document(1)), signers=("bob",))
    v3 = document(3, sha(v2), signers=("carol",), desired=DESIRED.replace("4096", "2048"))
    v4 = document(4, sha(v3), signers=("bob",), desired=DESIRED.replace("4096", "1024"))
    for envelope in (v2, v3, v4):
        served.hub.push(envelope)
    wait_for(lambda: provider.held.version == 4, "bob's version 4")
    alices = document(1 + desireddoc.MAX_VERSION_JUMP, sha(document(1)), desired=DESIRED.replace("4096", "512"))
    reset = [{"cluster": CLUSTER, "version": 2, "sha256": sha(v2), "replaces": [sha(alices)]}]
    write_store(tmp_path, _publishers_store(2, revoked=["alice"], resets=reset))
    keeper.reload()
    assert len(provider.desired()) == 1 and provider.held.version == 4
    watches = len(served.hub.watches)
    write_store(tmp_path, _publishers_store(3, revoked=["alice", "bob"], resets=reset))
    keeper.reload()
    assert provider.desired() == []
    assert provider.held == Held(version=4, sha256=sha(v4)), provider.held
    assert not (state / PASSED_FILE).exists()  # kept by the reset's replaces, not by a passed record
    wait_for(lambda: len(served.hub.watches) > watches, "the stream reopened from the version before the held one")
    seen = len(served.hub.reports)
    served.hub.push(v3)  # the broken hub replays carol's older version
    wait_for(lambda: (3, False, "ROLLBACK") in reports(served.hub)[seen:], "carol's version 3 refused")
    assert provider.desired() == [] and provider.held.version == 4
    served.hub.push(document(5, sha(v4), signers=("carol",), desired=DESIRED.replace("4096", "256")))
    wait_for(lambda: [g.config for g in provider.desired()] == [{"memory": "256"}], "carol's version 5")
