"""The fleet view at the hub: StateReports in and out of the store, and each node's status line.

The store keeps each guest and op as the node sent it (hub.v1 bytes) beside the few columns it sorts and counts by
(vmid, sync state, approvals waiting; op id, fate, time); this module is where the messages meet those rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Mapping

from hub.store import GuestRow, InvalidArgumentError, NodeReport, NodeState, OpRow, StateIn
from hub.v1 import hub_pb2 as pb

DEFAULT_MAX_REPORT_BYTES = 8 << 20  # a StateReport over this is refused, nothing recorded
STALE_AFTER = 2  # report intervals (or, for a node that never sent a StateReport, heartbeats) without one: stale
_PREFIX = "SYNC_STATE_"
# A pending approval's words go into commands an operator pastes (`pve-hub pending`, the web page): a node sends
# them, so each must be a plain token, and the descriptor's sha256 must be the descriptor's.
_TOKEN = re.compile(r"[A-Za-z0-9_.:@-]{1,128}", re.ASCII)
_CLASSES = frozenset({"BENIGN", "APPROVAL", "DESTRUCTIVE"})
# A descriptor is signed into an op envelope of at most MAX_OP_ENVELOPE bytes (64 KiB) with its signatures and
# fields: a larger one can never be approved, and only fills the hub's answers.
MAX_DESCRIPTOR = 48 * 1024
PENDING_BUDGET = 6 << 20  # bytes of pending approvals one ListPending answer carries (under the 11.8 MiB message cap)


def state_name(value: int) -> str:
    """A SyncState as the CLI, the metrics and the store spell it (in_sync, pending_approval...); "" for unset."""
    if value == pb.SYNC_STATE_UNSPECIFIED or value not in pb.SyncState.values():
        return ""
    return pb.SyncState.Name(value).removeprefix(_PREFIX).lower()  # type: ignore[arg-type]


def state_value(name: str) -> pb.SyncState.ValueType:
    """The SyncState of a stored name."""
    return pb.SyncState.Value(_PREFIX + name.upper())


def to_state_in(request: pb.StateReport) -> StateIn:
    """The store's form of a StateReport; InvalidArgumentError naming a guest whose state is unset or unknown."""
    guests = []
    for index, guest in enumerate(request.guests):
        name = state_name(guest.state)
        if not name:
            raise InvalidArgumentError(f"guests[{index}].state", f"must be a SyncState, not {guest.state}")
        for number, item in enumerate(guest.pending):
            check_pending(f"guests[{index}].pending[{number}]", item, request.audience)
        guests.append(GuestRow(vmid=guest.vmid, state=name, pending=len(guest.pending),
                               body=guest.SerializeToString(deterministic=True)))
    ops = tuple(OpRow(op_id=op.op_id, payload_sha256=op.payload_sha256, fate=op.fate, at_ms=max(0, op.at_unix_ms),
                      body=op.SerializeToString(deterministic=True)) for op in request.ops)
    return StateIn(cluster=request.cluster, node=request.node, audience=request.audience, session=request.session,
                   seq=request.seq, base_seq=request.base_seq, full=request.full, guests=tuple(guests),
                   removed=tuple(request.removed_vmids), ops=ops, at_ms=request.at_unix_ms,
                   interval=request.interval_seconds, held_version=request.held_version,
                   tick_outcome=request.tick_outcome, tick_error=request.tick_error)


def check_pending(field: str, item: pb.PendingApproval, audience: str) -> None:
    """InvalidArgumentError naming the field of a pending approval a command could not carry as it stands, or whose
    action is not the reporting node's own (``audience``): listed under this node, its sign command would make the
    operator sign an op the hub routes to another node."""
    if len(item.descriptor) > MAX_DESCRIPTOR:
        raise InvalidArgumentError(f"{field}.descriptor", f"{len(item.descriptor)} bytes, over the limit of "
                                                          f"{MAX_DESCRIPTOR}: no signed op could carry it")
    if item.descriptor_sha256 != hashlib.sha256(item.descriptor).hexdigest():
        raise InvalidArgumentError(f"{field}.descriptor_sha256", "must be the sha256 (lowercase hex) of descriptor")
    if item.action_class not in _CLASSES:
        raise InvalidArgumentError(f"{field}.action_class", "must be BENIGN, APPROVAL or DESTRUCTIVE")
    for name in ("op_kind", "rule"):
        if not _TOKEN.fullmatch(getattr(item, name)):
            raise InvalidArgumentError(f"{field}.{name}", "must be 1 to 128 of A-Z a-z 0-9 _ . : @ -")
    if item.audience and not _TOKEN.fullmatch(item.audience):
        raise InvalidArgumentError(f"{field}.audience", "must be 1 to 128 of A-Z a-z 0-9 _ . : @ -")
    if item.audience and item.audience != audience:
        raise InvalidArgumentError(f"{field}.audience", "names another audience than the report's")
    if _audience_of(item.descriptor, audience) != audience:
        raise InvalidArgumentError(f"{field}.descriptor", "names another audience than the report's")


def _audience_of(descriptor: bytes, default: str) -> object:
    """The audience a descriptor names; ``default`` when it names none (then no command can sign it: `pve-hub
    pending` reads it strictly, and strictly it has no action)."""
    try:
        parsed = json.loads(descriptor)
    except ValueError:
        return default
    return parsed.get("audience", default) if isinstance(parsed, dict) else default


def fair_share(by_node: Mapping[str, list[pb.PendingApproval]],
               budget: int = PENDING_BUDGET) -> tuple[list[pb.PendingApproval], int]:
    """Pending approvals taken one per node in turn until ``budget`` bytes, then sorted by node (each node's in its
    order): one node's flood never hides another's. Returns them and how many were left out."""
    nodes = sorted(by_node)
    taken: dict[str, list[pb.PendingApproval]] = {node: [] for node in nodes}
    used, omitted = 0, 0
    for turn in itertools.zip_longest(*(by_node[node] for node in nodes)):
        for node, item in zip(nodes, turn, strict=True):
            if item is None:
                continue
            size = item.ByteSize()
            if used + size > budget:
                omitted += 1
            else:
                used += size
                taken[node].append(item)
    return [item for node in nodes for item in taken[node]], omitted


def guest_of(row: GuestRow) -> pb.GuestState:
    """A stored guest as the node sent it."""
    return pb.GuestState.FromString(row.body)


def op_of(row: OpRow) -> pb.OpReport:
    """A stored op as the node sent it."""
    return pb.OpReport.FromString(row.body)


def node_status(node: str, ack: NodeReport | None, state: NodeState | None, seen: float | None, *,
                heartbeat: float, now: float | None = None) -> pb.NodeStatus:
    """One node's status line from its last ACK/NACK, its last StateReport and its Watch activity on this replica.

    Stale: no StateReport for STALE_AFTER of its intervals; a node that never sent one, no ACK/NACK or Watch activity
    for STALE_AFTER heartbeats.
    """
    now = time.time() if now is None else now
    status = pb.NodeStatus(node=node)
    if ack is not None:
        status.held_version, status.reported_version, status.ok, status.reason = ack.held, ack.version, ack.ok, \
            ack.reason
        status.last_seen_unix_ms = int(ack.last_seen.timestamp() * 1000)
    if seen is not None:
        status.last_seen_unix_ms = max(status.last_seen_unix_ms, int(seen * 1000))
    if state is None:
        quiet = now - status.last_seen_unix_ms / 1000
        status.stale = bool(status.last_seen_unix_ms) and quiet > STALE_AFTER * heartbeat
        return status
    received = state.received.timestamp()
    status.audience, status.report_interval_seconds = state.audience, state.interval
    status.last_report_unix_ms = int(received * 1000)
    status.last_seen_unix_ms = max(status.last_seen_unix_ms, status.last_report_unix_ms)
    status.stale = now - received > STALE_AFTER * state.interval
    status.tick_outcome, status.tick_error = state.tick_outcome, state.tick_error
    status.held_version = status.held_version or state.held_version
    status.guests.extend(_counts(state.counts))
    return status


def _counts(counts: Mapping[str, int]) -> list[pb.SyncCount]:
    return [pb.SyncCount(state=state_value(name), count=count)
            for name, count in sorted(counts.items(), key=lambda item: state_value(item[0])) if count]
