"""Journal records and their on-disk frames.

Frame: ``MAGIC (2) | length (4, LE) | crc32 of length+payload (4, LE) | payload``; the payload is
compact JSON. The magic lets recovery look for valid frames after a damaged one, which is how a
torn tail (nothing valid after it) is told from corruption in the middle (valid records after it).
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

MAGIC = b"\xa5\x4a"
HEADER = struct.Struct("<2sII")
MAX_PAYLOAD = 16 * 1024 * 1024


class Outcome(enum.Enum):
    """How an operation ended."""

    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True, kw_only=True)
class Begun:
    """Written before the Proxmox call."""

    op_id: str
    vmid: int
    kind: str
    payload: Mapping[str, Any]
    key: str | None
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStarted:
    """Written right after the call returned a UPID."""

    op_id: str
    upid: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Ended:
    """Written when the operation is done."""

    op_id: str
    outcome: Outcome
    error: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    """Compaction's carry-over of an idempotency key whose operation ended ok or unknown."""

    key: str
    payload_hash: str
    op_id: str
    outcome: Outcome
    at: float


Record = Begun | TaskStarted | Ended | Applied


def payload_hash(payload: Mapping[str, Any]) -> str:
    """Hash of a payload's canonical JSON: the same payload, whatever its key order."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def to_json(record: Record) -> dict[str, Any]:
    """The JSON object of a record."""
    match record:
        case Begun():
            return {"t": "begun", "op": record.op_id, "vmid": record.vmid, "kind": record.kind,
                    "payload": dict(record.payload), "key": record.key, "at": record.at}
        case TaskStarted():
            return {"t": "task", "op": record.op_id, "upid": record.upid, "at": record.at}
        case Ended():
            return {"t": "ended", "op": record.op_id, "outcome": record.outcome.value, "error": record.error,
                    "at": record.at}
        case Applied():
            return {"t": "applied", "key": record.key, "hash": record.payload_hash, "op": record.op_id,
                    "outcome": record.outcome.value, "at": record.at}


def from_json(obj: dict[str, Any]) -> Record:
    """A record from its JSON object (KeyError/ValueError on a malformed one)."""
    kind = obj["t"]
    if kind == "begun":
        return Begun(op_id=obj["op"], vmid=obj["vmid"], kind=obj["kind"], payload=obj["payload"], key=obj["key"],
                     at=obj["at"])
    if kind == "task":
        return TaskStarted(op_id=obj["op"], upid=obj["upid"], at=obj["at"])
    if kind == "ended":
        return Ended(op_id=obj["op"], outcome=Outcome(obj["outcome"]), error=obj["error"], at=obj["at"])
    if kind == "applied":
        return Applied(key=obj["key"], payload_hash=obj["hash"], op_id=obj["op"], outcome=Outcome(obj["outcome"]),
                       at=obj["at"])
    raise ValueError(f"unknown record type {kind!r}")


def encode(record: Record) -> bytes:
    """One frame holding ``record``."""
    payload = json.dumps(to_json(record), separators=(",", ":"), ensure_ascii=False).encode()
    length = struct.pack("<I", len(payload))
    return MAGIC + length + struct.pack("<I", zlib.crc32(payload, zlib.crc32(length))) + payload


@dataclass(frozen=True, slots=True)
class BadFrame:
    """Where scanning stopped, and why."""

    offset: int
    reason: str


def _frame_at(data: bytes | memoryview, offset: int) -> tuple[bytes, int] | str:
    """The payload of the frame at ``offset`` and the next offset, or why there is no valid frame."""
    if len(data) - offset < HEADER.size:
        return "truncated header"
    magic, length, crc = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        return "bad magic"
    if length > MAX_PAYLOAD:
        return "impossible length"
    end = offset + HEADER.size + length
    if end > len(data):
        return "truncated payload"
    payload = bytes(data[offset + HEADER.size:end])
    if zlib.crc32(payload, zlib.crc32(data[offset + 2:offset + 6])) != crc:
        return "checksum mismatch"
    return payload, end


def scan(data: bytes) -> tuple[list[Record], BadFrame | None, bool]:
    """Decode frames from the start; stop at the first bad one.

    Returns the records, the bad frame (None when the data ended cleanly), and whether any valid
    frame exists after the bad one (True: corruption in the middle; False: a torn tail).
    """
    records: list[Record] = []
    offset, view = 0, memoryview(data)
    loads = json.loads
    while offset < len(data):
        found = _frame_at(view, offset)
        if isinstance(found, str):
            return records, BadFrame(offset, found), _valid_frame_after(view, offset + 1)
        payload, end = found
        try:
            records.append(from_json(loads(payload)))
        except (ValueError, KeyError, TypeError) as exc:
            return records, BadFrame(offset, f"undecodable record: {exc}"), _valid_frame_after(view, end)
        offset = end
    return records, None, False


def _valid_frame_after(view: memoryview, start: int) -> bool:
    """Whether a frame with a valid checksum starts anywhere at or after ``start``."""
    data = view.obj
    assert isinstance(data, bytes)
    position = data.find(MAGIC, start)
    while position != -1:
        if not isinstance(_frame_at(view, position), str):
            return True
        position = data.find(MAGIC, position + 1)
    return False


def frames(records: list[Record]) -> Iterator[bytes]:
    """Frames for several records."""
    return (encode(r) for r in records)
