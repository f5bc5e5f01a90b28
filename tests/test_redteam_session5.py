"""Red team (session 5): ops keyed by (op id, payload sha256), per-op refusal keys, the journal's op-id reservation,
signed ops the hub delivers (executor.api.deliveries).

Real parts: fakepve over HTTPS, the in-process desk with its real journal (files, fsync), real journal files.
Each test pins a defence that holds or a hole (fixed, or open as a strict xfail).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.api.deliveries import HubDeliveries
from executor.gate.steps import refused_key
from hub.v1 import hub_pb2 as pb
from journal import Journal, JournalError, KeyInFlightError
from safety import signedop
from safety.payload import parse_payload, to_json
from safety.signedop import Envelope
from tests.signed_helpers import AUDIENCE, add_vm, mutations, open_desk, seal, unsigned_of

CLUSTER = "fakecluster"


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
