"""What the hub's store holds: versions of a cluster's desired-state document and each node's report."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime

from safety import desireddoc

CLUSTER = desireddoc.CLUSTER  # a cluster: what a signed desired document may name
# A node: its executor id (default NODE@CLUSTER) or a Proxmox node name; nothing a log line must quote.
NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}", re.ASCII)
_NAMES = {"cluster": CLUSTER, "node": NODE}
MAX_TEXT = 4096  # author, message and reason: a line or a paragraph, never a document
MAX_HISTORY = 1000  # rows one history() call returns at most
# Above the largest envelope a signed desired document may be (4 MiB of desired text, JSON-escaped at
# worst twice, base64'd, four signatures: ~10.8 MiB); a 10,000-guest cluster's is ~2.7 MB.
DEFAULT_MAX_ENVELOPE = 12 * 1024 * 1024
# --- deliveries (approvals through the hub) ---
# A signed op's envelope: safety.signedop.MAX_ENVELOPE (64 KiB) is the most a node's gate takes; the hub keeps none
# larger (refused, not stored).
MAX_OP_ENVELOPE = 64 * 1024
DECISIONS = frozenset({"accepted", "revoked", "refused"})  # a node's verdict on a delivery (DeliveryResult.decision)
OPEN_STATES = ("queued", "delivered")  # no verdict yet: re-sent on the node's next Watch stream
DELIVERY_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
MAX_AUDIENCE = 128
MAX_DELIVERIES = 200  # rows one deliveries() call returns at most


@dataclass(frozen=True)
class Version:
    """One stored version of a cluster's document: the signed envelope and who appended it, when."""

    cluster: str
    version: int
    envelope: bytes
    sha256: str
    author: str
    message: str
    created_at: datetime


@dataclass(frozen=True)
class Entry:
    """A history line: a version without its envelope (``size`` is the envelope's length in bytes)."""

    cluster: str
    version: int
    sha256: str
    size: int
    author: str
    message: str
    created_at: datetime


@dataclass(frozen=True)
class NodeReport:
    """A node's last report: the version it holds, the version it last ACKed or NACKed and why."""

    cluster: str
    node: str
    held: int  # the last version the node ACKed (0: none); a NACK leaves it as it was
    version: int  # the version of the last report
    ok: bool  # True: ACK; False: NACK
    reason: str
    last_seen: datetime


@dataclass(frozen=True)
class Delivery:
    """A signed envelope routed to one node: what the hub took, and what the node said of it.

    ``state``: queued (at the hub), delivered (sent on the node's stream, no verdict yet), or the node's first
    verdict (accepted, revoked, refused: never overwritten by a redelivery's). ``op_report``: the op's latest
    fate as the node reported it (a serialized hub.v1 OpReport; the store does not read it), empty before one.
    ``seq`` orders a cluster's deliveries (the feeds route those past the last they saw).
    """

    seq: int
    delivery_id: str
    cluster: str
    node: str
    envelope: bytes
    op_id: str
    kind: str
    state: str
    reason: str
    detail: str
    submitted_at: datetime
    op_report: bytes = b""


class StoreError(Exception):
    """Base of the store's refusals (bad input is a ValueError instead)."""


class StoreUnavailableError(StoreError):
    """The database could not be reached, or failed during the call (the hub's API: UNAVAILABLE).

    After an append fails so, its outcome is unknown: read the latest version (and its sha256) to see.
    """


class VersionConflict(StoreError):  # noqa: N818 (the name the hub issue and its API use)
    """An append expected another latest version: someone else appended first."""

    def __init__(self, cluster: str, expected: int, current: int) -> None:
        super().__init__(f"cluster {cluster}: expected version {expected}, but the latest is {current}")
        self.cluster, self.expected, self.current = cluster, expected, current


class DocumentTooLarge(StoreError):  # noqa: N818 (the name the hub issue and its API use)
    """An envelope over the store's size limit: refused, not stored."""

    def __init__(self, cluster: str, size: int, limit: int) -> None:
        super().__init__(f"cluster {cluster}: envelope of {size} bytes is over the limit of {limit} bytes")
        self.cluster, self.size, self.limit = cluster, size, limit


class UnknownVersionError(StoreError):
    """A version past the cluster's latest (a watcher ahead of this hub: another hub, or a restored database)."""

    def __init__(self, cluster: str, version: int, latest: int) -> None:
        super().__init__(f"cluster {cluster}: version {version} is past the latest, {latest}")
        self.cluster, self.version, self.latest = cluster, version, latest


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer hub than this one; writing to it could lose what it added."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"database schema version {found} is newer than this hub's {known}: upgrade the hub")
        self.found, self.known = found, known


class InvalidArgumentError(ValueError):
    """Bad input to the store, naming the field (the hub's API answers INVALID_ARGUMENT with it)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def check_name(field: str, value: object) -> str:
    """``value`` if it is a valid ``field`` (cluster or node) name, else InvalidArgumentError naming ``field``."""
    if not isinstance(value, str):
        raise InvalidArgumentError(field, f"must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidArgumentError(field, "must not be empty")
    pattern = _NAMES[field]
    if not pattern.fullmatch(value):
        raise InvalidArgumentError(field, f"{value[:140]!r} does not match {pattern.pattern}")
    return value


def check_version(field: str, value: object, *, least: int = 0) -> int:
    """``value`` if it is an int >= ``least``, else InvalidArgumentError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(field, f"must be an integer, not {type(value).__name__}")
    if value < least:
        raise InvalidArgumentError(field, f"must be >= {least}, not {value}")
    return value


def check_text(field: str, value: object, *, required: bool) -> str:
    """``value`` if it is a string of at most MAX_TEXT characters (non-empty when ``required``)."""
    if not isinstance(value, str):
        raise InvalidArgumentError(field, f"must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise InvalidArgumentError(field, "must not be empty")
    if len(value) > MAX_TEXT:
        raise InvalidArgumentError(field, f"is {len(value)} characters, over {MAX_TEXT}")
    if "\x00" in value:
        raise InvalidArgumentError(field, "must not contain NUL")
    return value


def check_envelope(value: object) -> bytes:
    """``value`` as bytes if it is non-empty bytes (the store does not read it: it is opaque)."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidArgumentError("envelope", f"must be bytes, not {type(value).__name__}")
    data = bytes(value)
    if not data:
        raise InvalidArgumentError("envelope", "must not be empty")
    return data


def check_timeout(value: object) -> float:
    """``value`` as seconds if it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise InvalidArgumentError("timeout", f"must be a finite number of seconds >= 0, not {value!r}")
    return float(value)



def check_delivery_id(value: object, field: str = "delivery_id") -> str:
    """``value`` if it is 32 lowercase hex (a delivery or op id)."""
    if not isinstance(value, str) or not DELIVERY_ID.fullmatch(value):
        raise InvalidArgumentError(field, f"must be 32 lowercase hex, not {str(value)[:40]!r}")
    return value


def check_audience(value: object) -> str:
    """``value`` if it is an audience (NODE@CLUSTER): 1-128 characters a node name may hold."""
    if not isinstance(value, str) or not value or len(value) > MAX_AUDIENCE or not NODE.fullmatch(value):
        raise InvalidArgumentError("audience", f"{str(value)[:140]!r} does not match {NODE.pattern}")
    return value


def check_op_envelope(value: object) -> bytes:
    """``value`` as bytes if it is a non-empty envelope of at most MAX_OP_ENVELOPE bytes."""
    data = check_envelope(value)
    if len(data) > MAX_OP_ENVELOPE:
        raise InvalidArgumentError("envelope", f"{len(data)} bytes, over the limit of {MAX_OP_ENVELOPE}; "
                                               "nothing stored")
    return data


def check_verdict(decision: object, op_id: object, reason: object, detail: object) -> None:
    """InvalidArgumentError naming the first bad field of a node's verdict on a delivery."""
    if decision not in DECISIONS:
        raise InvalidArgumentError("decision", f"must be one of {', '.join(sorted(DECISIONS))}, not "
                                               f"{str(decision)[:40]!r}")
    if op_id:
        check_delivery_id(op_id, "op_id")
    check_text("reason", reason, required=decision == "refused")
    check_text("detail", detail, required=False)


def check_page(limit: object, before: object) -> None:
    """InvalidArgumentError unless 1 <= limit <= MAX_HISTORY and before is None or >= 1."""
    check_version("limit", limit, least=1)
    if isinstance(limit, int) and limit > MAX_HISTORY:
        raise InvalidArgumentError("limit", f"must be <= {MAX_HISTORY}, not {limit}")
    if before is not None:
        check_version("before", before, least=1)


def check_report(cluster: object, node: object, version: object, ok: object, reason: object) -> None:
    """InvalidArgumentError naming the first bad field of an ACK/NACK (a NACK must say why)."""
    check_name("cluster", cluster)
    check_name("node", node)
    check_version("version", version)
    if not isinstance(ok, bool):
        raise InvalidArgumentError("ok", f"must be a bool, not {type(ok).__name__}")
    check_text("reason", reason, required=not ok)


# --- the fleet view: each node's state after its ticks (StateReport) -----------------------------------------------

# Where a guest stands against the document: hub.v1's SyncState names, lower-case (as the CLI and metrics show them).
SYNC_STATES = ("in_sync", "drifted", "staged", "refused", "pending_approval", "elsewhere", "skipped", "failed")
SESSION = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
MAX_GUESTS = 100_000  # guests one report may carry (a 10,000-guest cluster's node holds far fewer)
MAX_OPS_KEPT = 200  # each node's most recent signed ops the hub keeps; older ones are dropped
MAX_OPS = 1000  # ops one report may carry
MAX_BODY = 1 << 20  # one guest's or op's body: its diffs and descriptors, never a document
OP_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
SHA256 = re.compile(r"(?:[0-9a-f]{64})?", re.ASCII)
VMID_MAX = 999_999_999


@dataclass(frozen=True)
class GuestRow:
    """One guest as its node last reported it: its sync state, how many approvals wait on it, and ``body``, the node's
    whole record of it (hub.v1 ``GuestState``, serialized; the store never reads it)."""

    vmid: int
    state: str  # one of SYNC_STATES
    body: bytes
    pending: int = 0  # approvals waiting on this guest
    node: str = ""  # filled when read from the store


@dataclass(frozen=True)
class OpRow:
    """One signed op on a node as its journal told: ``body`` is hub.v1 ``OpReport``, serialized (opaque here)."""

    op_id: str
    payload_sha256: str  # "" until the node reports it; two ops under one id are two rows
    fate: str
    at_ms: int
    body: bytes


@dataclass(frozen=True)
class StateIn:
    """A node's StateReport as the store records it: a full one replaces what is held, a delta applies on top of
    ``base_seq``."""

    cluster: str
    node: str
    audience: str
    session: str  # one per executor process: seq counts within it
    seq: int
    base_seq: int  # a delta's base (the seq the hub holds); 0 with full
    full: bool
    guests: tuple[GuestRow, ...] = ()
    removed: tuple[int, ...] = ()
    ops: tuple[OpRow, ...] = ()
    at_ms: int = 0  # when the tick ended, the node's clock
    interval: float = 0.0  # the node's tick interval, seconds
    held_version: int = 0
    tick_outcome: str = ""
    tick_error: str = ""


@dataclass(frozen=True)
class Recorded:
    """What ``record_state`` did: ``applied`` False when a delta's base is not what the store holds (send a full one);
    ``seq`` the seq the store holds for the node now (0: none)."""

    applied: bool
    seq: int


@dataclass(frozen=True)
class NodeState:
    """A node's last StateReport (without its guests and ops), with its guests counted by sync state."""

    cluster: str
    node: str
    audience: str
    session: str
    seq: int
    received: datetime  # when the store recorded it: the hub's clock (the database's, on PostgreSQL)
    at_ms: int
    interval: float
    held_version: int
    tick_outcome: str
    tick_error: str
    counts: dict[str, int]  # sync state -> guests (only states with guests)
    pending: int  # approvals waiting, over all its guests


def check_state(report: StateIn) -> StateIn:
    """``report`` if every field is well formed, else InvalidArgumentError naming the first bad one."""
    check_name("cluster", report.cluster)
    check_name("node", report.node)
    check_text("audience", report.audience, required=False)
    if len(report.audience) > 256:
        raise InvalidArgumentError("audience", f"is {len(report.audience)} characters, over 256")
    if not isinstance(report.session, str) or not SESSION.fullmatch(report.session):
        raise InvalidArgumentError("session", f"{str(report.session)[:80]!r} does not match {SESSION.pattern}")
    check_version("seq", report.seq, least=1)
    check_version("base_seq", report.base_seq)
    if report.full and report.base_seq:
        raise InvalidArgumentError("base_seq", f"must be 0 in a full report, not {report.base_seq}")
    if not report.full and report.base_seq >= report.seq:
        raise InvalidArgumentError("base_seq", f"must be below seq ({report.seq}), not {report.base_seq}")
    if not isinstance(report.interval, int | float) or not math.isfinite(report.interval) or report.interval <= 0:
        raise InvalidArgumentError("interval_seconds",
                                   f"must be a finite number of seconds > 0, not {report.interval!r}")
    check_version("held_version", report.held_version)
    check_text("tick_outcome", report.tick_outcome, required=False)
    check_text("tick_error", report.tick_error, required=False)
    _check_guests(report)
    _check_ops(report.ops)
    return report


def _check_guests(report: StateIn) -> None:
    if len(report.guests) > MAX_GUESTS:
        raise InvalidArgumentError("guests", f"{len(report.guests)} guests, over {MAX_GUESTS}")
    seen: set[int] = set()
    for index, guest in enumerate(report.guests):
        where = f"guests[{index}]"
        if isinstance(guest.vmid, bool) or not isinstance(guest.vmid, int) or not 1 <= guest.vmid <= VMID_MAX:
            raise InvalidArgumentError(f"{where}.vmid", f"must be 1..{VMID_MAX}, not {guest.vmid!r}")
        if guest.vmid in seen:
            raise InvalidArgumentError(f"{where}.vmid", f"{guest.vmid} is given twice")
        seen.add(guest.vmid)
        if guest.state not in SYNC_STATES:
            raise InvalidArgumentError(f"{where}.state",
                                       f"must be one of {', '.join(SYNC_STATES)}, not {guest.state!r}")
        check_version(f"{where}.pending", guest.pending)
        _check_body(f"{where}", guest.body)
    for index, vmid in enumerate(report.removed):
        if isinstance(vmid, bool) or not isinstance(vmid, int) or not 1 <= vmid <= VMID_MAX:
            raise InvalidArgumentError(f"removed_vmids[{index}]", f"must be 1..{VMID_MAX}, not {vmid!r}")
    if report.full and report.removed:
        raise InvalidArgumentError("removed_vmids", "must be empty in a full report (it names every guest)")


def _check_ops(ops: tuple[OpRow, ...]) -> None:
    if len(ops) > MAX_OPS:
        raise InvalidArgumentError("ops", f"{len(ops)} ops, over {MAX_OPS}")
    for index, op in enumerate(ops):
        where = f"ops[{index}]"
        if not isinstance(op.op_id, str) or not OP_ID.fullmatch(op.op_id):
            raise InvalidArgumentError(f"{where}.op_id", "must be 32 lowercase hex")
        if not isinstance(op.payload_sha256, str) or not SHA256.fullmatch(op.payload_sha256):
            raise InvalidArgumentError(f"{where}.payload_sha256", "must be empty or 64 lowercase hex")
        check_text(f"{where}.fate", op.fate, required=True)
        check_version(f"{where}.at_unix_ms", op.at_ms)
        _check_body(where, op.body)


def _check_body(where: str, body: object) -> None:
    if not isinstance(body, bytes):
        raise InvalidArgumentError(where, f"must be bytes, not {type(body).__name__}")
    if len(body) > MAX_BODY:
        raise InvalidArgumentError(where, f"is {len(body)} bytes, over {MAX_BODY}")
