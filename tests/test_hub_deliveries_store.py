"""The hub store's deliveries (approvals through the hub), on SQLite and PostgreSQL: routing by audience, the queue a
node's Watch stream drains, the first verdict standing against a redelivery's, the size limit, wake-ups."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from hub.store import InvalidArgumentError, Store
from hub.store.model import MAX_OP_ENVELOPE
from tests.test_hub_store import Backend, _backend  # noqa: F401 (the fixture: one test per backend)

OP = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


def test_routing_queue_and_the_first_verdict(backend: Backend) -> None:
    """The node that said its audience gets the delivery; it stays open until a verdict; a redelivery's verdict
    does not replace the first, nor does another node's; the op's fate is kept on its deliveries."""
    store = backend.open()
    assert store.node_for_audience("c", "pve1@c") is None
    store.record_ack("c", "pve2@c", 1, True)  # reported under its own name, which is its audience
    assert store.node_for_audience("c", "pve2@c") == "pve2@c"
    store.record_audience("c", "node-a", "pve1@c")
    assert store.node_for_audience("c", "pve1@c") == "node-a" and store.node_for_audience("other", "pve1@c") is None
    store.record_audience("c", "rogue@c", "pve2@c")  # a later claim on a node's own name never takes its envelopes
    assert store.node_for_audience("c", "pve2@c") == "pve2@c"

    first = store.add_delivery("c", "node-a", b'{"envelope": 1}', OP, "config.disk_detach")
    second = store.add_delivery("c", "node-a", b'{"envelope": 2}', "", "op.revoke")
    elsewhere = store.add_delivery("c", "pve2@c", b'{"envelope": 3}', OTHER, "stop")
    assert first.state == "queued" and len({first.delivery_id, second.delivery_id}) == 2
    assert first.seq < second.seq < elsewhere.seq
    assert [d.delivery_id for d in store.open_deliveries("c", "node-a")] == [first.delivery_id, second.delivery_id]
    assert store.delivery_head("c") == elsewhere.seq and store.delivery_head("nowhere") == 0
    assert [d.delivery_id for d in store.deliveries_after("c", first.seq)] == [second.delivery_id,
                                                                               elsewhere.delivery_id]
    store.mark_delivered(first.delivery_id)
    (got,) = store.deliveries("c", first.delivery_id)
    assert (got.state, got.envelope, got.node, got.kind) == ("delivered", b'{"envelope": 1}', "node-a",
                                                             "config.disk_detach")

    assert not store.record_verdict("c", "pve2@c", first.delivery_id, "refused", op_id=OP, reason="WRONG_AUDIENCE",
                                    detail="not mine")
    assert store.record_verdict("c", "node-a", first.delivery_id, "accepted", op_id=OP)
    assert not store.record_verdict("c", "node-a", first.delivery_id, "refused", op_id=OP, reason="NONCE_SPENT",
                                    detail="again")
    store.mark_delivered(first.delivery_id)  # a redelivery keeps the verdict
    (got,) = store.deliveries("c", OP)
    assert (got.state, got.reason) == ("accepted", "")
    assert [d.delivery_id for d in store.open_deliveries("c", "node-a")] == [second.delivery_id]

    assert store.record_verdict("c", "node-a", second.delivery_id, "revoked", op_id=OP)
    assert [d.delivery_id for d in store.deliveries("c", OP)] == [first.delivery_id, second.delivery_id]
    assert store.record_op_reports("c", "node-a", [(OP, b"ran ok"), (OTHER, b"not routed to node-a")]) == 2
    assert {d.op_report for d in store.deliveries("c", OP)} == {b"ran ok"}
    assert [d.delivery_id for d in store.deliveries("c", limit=2)] == [second.delivery_id, elsewhere.delivery_id]
    assert backend.open().deliveries("c", elsewhere.delivery_id)[0].state == "queued"  # another replica sees it


def test_an_envelope_over_the_limit_is_refused_and_not_stored(backend: Backend) -> None:
    """Over MAX_OP_ENVELOPE bytes: InvalidArgumentError naming the envelope; nothing queued."""
    store = backend.open()
    with pytest.raises(InvalidArgumentError, match=rf"^envelope: {MAX_OP_ENVELOPE + 1} bytes, over the limit"):
        store.add_delivery("c", "n", b"x" * (MAX_OP_ENVELOPE + 1), OP, "stop")
    assert store.deliveries("c") == [] and store.delivery_head("c") == 0


BAD: list[tuple[str, Callable[[Store], object]]] = [
    ("audience", lambda s: s.record_audience("c", "n", "two words")),
    ("audience", lambda s: s.node_for_audience("c", "")),
    ("envelope", lambda s: s.add_delivery("c", "n", b"", OP, "stop")),
    ("op_id", lambda s: s.add_delivery("c", "n", b"x", "NOT-HEX", "stop")),
    ("delivery_id", lambda s: s.mark_delivered("x")),
    ("decision", lambda s: s.record_verdict("c", "n", OP, "maybe", op_id=OP)),
    ("reason", lambda s: s.record_verdict("c", "n", OP, "refused", op_id=OP)),
    ("id", lambda s: s.deliveries("c", "short")),
    ("after_seq", lambda s: s.wait_for_deliveries("c", -1, 1)),
]


def test_bad_input_names_the_field(backend: Backend) -> None:
    """Bad input raises InvalidArgumentError naming the field."""
    store = backend.open()
    for field, call in BAD:
        with pytest.raises(InvalidArgumentError, match=rf"^{field}: "):
            call(store)


def test_a_delivery_wakes_the_waiters_of_another_replica(backend: Backend) -> None:
    """A waiter on one store is woken within a second by a delivery queued through another."""
    waiter, writer = backend.open(), backend.open()
    result: list[tuple[bool, float]] = []
    thread = threading.Thread(target=lambda: result.append((waiter.wait_for_deliveries("c", 0, 10),
                                                            time.monotonic())))
    thread.start()
    time.sleep(0.3)
    queued = time.monotonic()
    writer.add_delivery("c", "n", b"x", OP, "stop")
    thread.join(15)
    (woken, at), = result
    assert woken and at - queued < 1.0, f"woken after {at - queued:.2f} s"
    assert waiter.wait_for_deliveries("c", 1, 0.2) is False
