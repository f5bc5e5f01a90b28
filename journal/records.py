"""Journal records and their on-disk frames.

Frame: ``MAGIC (2) | crc32 of length+payload (4, LE) | length (4, LE) | payload``; the payload
is compact JSON. The journal folds the decoded JSON objects directly (typed records are built only
for callers), which keeps reopening a million-record journal within seconds. The magic lets
recovery look for valid frames after a damaged one, which is how a
torn tail (nothing valid after it) is told from corruption in the middle (valid records after it).
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAGIC = b"\xa5\x4a"
HEADER = struct.Struct("<2sII")  # magic, crc, length
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
    return encode_obj(to_json(record))


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # one encoder: json.dumps builds one a call
_LENGTH = struct.Struct("<I")


def encode_obj(obj: dict[str, Any]) -> bytes:
    """One frame holding a record's JSON object."""
    payload = _ENCODER.encode(obj).encode()
    body = _LENGTH.pack(len(payload)) + payload
    return MAGIC + _LENGTH.pack(zlib.crc32(body)) + body


@dataclass(frozen=True, slots=True)
class BadFrame:
    """Where scanning stopped, and why."""

    offset: int
    reason: str


def _frame_at(data: bytes, offset: int) -> int | str:
    """The end offset of the valid frame at ``offset``, or why there is none."""
    if len(data) - offset < HEADER.size:
        return "truncated header"
    magic, crc, length = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        return "bad magic"
    if length > MAX_PAYLOAD:
        return "impossible length"
    end: int = offset + HEADER.size + length
    if end > len(data):
        return "truncated payload"
    if zlib.crc32(memoryview(data)[offset + 6:end]) != crc:
        return "checksum mismatch"
    return end


def scan(data: bytes) -> tuple[list[dict[str, Any]], BadFrame | None, bool]:
    """Decode frames from the start into JSON objects; stop at the first bad one.

    Returns the objects, the bad frame (None when the data ended cleanly), and whether any valid
    frame exists after the bad one (True: corruption in the middle; False: a torn tail).
    """
    objects: list[dict[str, Any]] = []
    append, loads, unpack, crc32 = objects.append, json.loads, HEADER.unpack_from, zlib.crc32
    view, size, offset = memoryview(data), len(data), 0
    while offset < size:
        # The common case inline (this loop runs once per record on reopen); _frame_at says why not.
        if size - offset >= HEADER.size:
            magic, crc, length = unpack(data, offset)
            end = offset + HEADER.size + length
            if magic == MAGIC and length <= MAX_PAYLOAD and end <= size and crc32(view[offset + 6:end]) == crc:
                try:
                    obj = loads(data[offset + HEADER.size:end])
                    obj["t"]
                except (ValueError, KeyError, TypeError) as exc:
                    return objects, BadFrame(offset, f"undecodable record: {exc}"), _valid_frame_after(data, end)
                append(obj)
                offset = end
                continue
        reason = _frame_at(data, offset)
        assert isinstance(reason, str)
        return objects, BadFrame(offset, reason), _valid_frame_after(data, offset + 1)
    return objects, None, False


def _valid_frame_after(data: bytes, start: int) -> bool:
    """Whether a frame with a valid checksum starts anywhere at or after ``start``."""
    position = data.find(MAGIC, start)
    while position != -1:
        if not isinstance(_frame_at(data, position), str):
            return True
        position = data.find(MAGIC, position + 1)
    return False
