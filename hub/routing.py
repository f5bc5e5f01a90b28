"""Approvals through the hub: a signed op read as a courier reads it, and deliveries as messages.

The hub reads of an envelope only what routes it (the payload's audience, kind and op id) and checks nothing that
would approve it: no signature, no trust store, no clock. The node it reaches verifies it as its own local API does
(docs/SAFETY.md §7), so an envelope the hub altered, an expired one or one for another audience is refused there,
with the reason it would get locally.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from hub.documents import HubRefusal
from hub.store import Delivery
from hub.store.model import MAX_OP_ENVELOPE
from hub.v1 import hub_pb2 as pb
from safety import signedop
from safety.payload import parse_payload
from safety.refusal import Refused

REVOKE = "op.revoke"


@dataclass(frozen=True, slots=True)
class Route:
    """Where an envelope goes and what it says it is (untrusted: read, never verified)."""

    audience: str
    kind: str
    op_id: str  # the op it carries; for an op.revoke, the op it names
    vmid: int


def _invalid(message: str) -> HubRefusal:
    return HubRefusal(grpc.StatusCode.INVALID_ARGUMENT, message)


def read(envelope: bytes) -> Route:
    """The route of ``envelope``; HubRefusal INVALID_ARGUMENT naming the field when it does not parse, or is over
    the size limit (then nothing is stored)."""
    if not envelope:
        raise _invalid("envelope: must not be empty")
    if len(envelope) > MAX_OP_ENVELOPE:
        raise _invalid(f"envelope: {len(envelope)} bytes, over the limit of {MAX_OP_ENVELOPE} bytes; nothing stored")
    try:
        parsed = signedop.parse_envelope_json(envelope)
        if parsed.payload_type != signedop.PAYLOAD_TYPE:
            raise _invalid(f"envelope.payloadType: {parsed.payload_type[:80]!r} is not {signedop.PAYLOAD_TYPE}")
        payload = parse_payload(parsed.payload)
    except Refused as exc:
        detail = exc.detail if exc.detail.startswith(("envelope", "payload")) else f"envelope: {exc.detail}"
        raise _invalid(detail) from exc
    op_id = str(payload.params.get("op_id", "")) if payload.kind == REVOKE else payload.op_id
    return Route(audience=payload.audience, kind=payload.kind, op_id=op_id, vmid=payload.vmid)


def to_delivery(delivery: Delivery) -> pb.Delivery:
    """The Watch stream's form of a delivery."""
    return pb.Delivery(delivery_id=delivery.delivery_id, envelope=delivery.envelope,
                       submitted_unix_ms=int(delivery.submitted_at.timestamp() * 1000))


def to_routed(delivery: Delivery) -> pb.RoutedOp:
    """GetOpStatus's form of a delivery: the hub's part, the node's verdict and the op's last reported fate."""
    routed = pb.RoutedOp(delivery_id=delivery.delivery_id, node=delivery.node, op_id=delivery.op_id,
                         op_kind=delivery.kind, state=delivery.state, reason=delivery.reason, detail=delivery.detail,
                         submitted_unix_ms=int(delivery.submitted_at.timestamp() * 1000))
    if delivery.op_report:
        routed.op.ParseFromString(delivery.op_report)
    return routed
