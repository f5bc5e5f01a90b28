"""Journal records and their on-disk frames.

Frame: ``MAGIC (2) | crc32 of length+body (4, LE) | length (4, LE) | body``. The magic lets
recovery look for valid frames after a damaged one, which is how a torn tail (nothing valid after
it) is told from corruption in the middle (valid records after it).

Body: ``type (1) | at (8, double) | number (4) | fields``, each field a 4-byte length (0xFFFFFFFF
for none) and its bytes. Binary rather than JSON: reopening a million-record journal decodes a
million bodies, and JSON decoding alone costs more than the 5 s that may take. Payloads are kept
as canonical JSON bytes (sorted keys), so their hash needs no decoding either.

Types: ``B`` begun, ``T`` task, ``E`` ended, ``A`` applied (compaction's carry-over of a key, or a burn),
``R`` refused, ``H`` high-water mark (compaction's carry-over of the largest ``at`` seen). A
new type only ever adds a letter: the bodies of the older ones never change, so every journal an
older version wrote still opens.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

MAGIC = b"\xa5\x4a"
HEADER = struct.Struct("<2sII")  # magic, crc, length
MAX_BODY = 16 * 1024 * 1024
_FIXED = struct.Struct("<cdI")  # type, at, number (vmid or outcome code)
_LEN = struct.Struct("<I")
_NONE = 0xFFFFFFFF
BEGUN, TASK, ENDED, APPLIED, REFUSED, MARK = b"B", b"T", b"E", b"A", b"R", b"H"

# Named positions. A body is (type, at, number, fields); code that reads one unpacks it
# (``kind, at, number, fields = body``) or uses these, never a bare index.
# (Final, so mypy knows which element type each index yields.)
TYPE: Final = 0
AT: Final = 1
NUMBER: Final = 2
FIELDS: Final = 3
# Positions within ``fields``, per record type. Every type's first field is its op id.
OP: Final = 0
BEGUN_KIND: Final = 1
BEGUN_KEY: Final = 2
BEGUN_PAYLOAD: Final = 3
TASK_UPID: Final = 1
ENDED_ERROR: Final = 1
APPLIED_KEY: Final = 1
APPLIED_HASH: Final = 2
REFUSED_KIND: Final = 1
REFUSED_REASON: Final = 2
REFUSED_DETAIL: Final = 3
REFUSED_KEY: Final = 4


class Outcome(enum.Enum):
    """How an operation ended."""

    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


OUTCOME_CODES = {Outcome.OK: 1, Outcome.FAILED: 2, Outcome.UNKNOWN: 3}
OUTCOMES = {code: outcome for outcome, code in OUTCOME_CODES.items()}


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
    """Compaction's carry-over of a key whose operation ended ok or unknown (a burn key: any outcome); also a
    burn key spent with no operation (``Journal.burn``: a signed op refused for good, outcome FAILED)."""

    key: str
    payload_hash: bytes
    op_id: str
    outcome: Outcome
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RefusalRecord:
    """A step the executor refused (by policy or for want of approval): no operation, no in-flight state.

    ``key`` names the refusal for de-duplication (the gate's ``vmid:kind:descriptor``); ``op_id`` is
    the signed op refused, if any.
    """

    vmid: int
    kind: str
    reason: str
    detail: str
    op_id: str | None
    key: str | None
    at: float


Record = Begun | TaskStarted | Ended | Applied | RefusalRecord
Body = tuple[bytes, float, int, list[bytes | None]]  # type, at, number, fields


def canonical(payload: Mapping[str, Any]) -> bytes:
    """A payload's canonical JSON: the same payload gives the same bytes, whatever its key order."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def payload_hash(payload: Mapping[str, Any] | bytes) -> bytes:
    """SHA-256 of a payload's canonical JSON (given as a mapping or as those bytes)."""
    return hashlib.sha256(payload if isinstance(payload, bytes) else canonical(payload)).digest()


def _text(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def fields_of(record: Record) -> Body:
    """A record as (type, at, number, fields)."""
    match record:
        case Begun():
            return BEGUN, record.at, record.vmid, [record.op_id.encode(), record.kind.encode(), _text(record.key),
                                                    canonical(record.payload)]
        case TaskStarted():
            return TASK, record.at, 0, [record.op_id.encode(), record.upid.encode()]
        case Ended():
            return ENDED, record.at, OUTCOME_CODES[record.outcome], [record.op_id.encode(), record.error.encode()]
        case Applied():
            return APPLIED, record.at, OUTCOME_CODES[record.outcome], [record.op_id.encode(), record.key.encode(),
                                                                       record.payload_hash]
        case RefusalRecord():
            return REFUSED, record.at, record.vmid, [_text(record.op_id), record.kind.encode(), record.reason.encode(),
                                                     record.detail.encode(), _text(record.key)]


def mark(high_water: float) -> Body:
    """The high-water mark a compaction writes first, so the largest ``at`` survives it."""
    return MARK, high_water, 0, []


def _str(field: bytes | None) -> str:
    if field is None:
        raise ValueError("a required field is missing")
    return field.decode()


def _opt(field: bytes | None) -> str | None:
    return None if field is None else field.decode()


def _begun(at: float, number: int, fields: list[bytes | None]) -> Record:
    op, kind, key, payload = fields
    return Begun(op_id=_str(op), vmid=number, kind=_str(kind), key=_opt(key), at=at, payload=json.loads(_str(payload)))


def _task(at: float, _number: int, fields: list[bytes | None]) -> Record:
    op, upid = fields
    return TaskStarted(op_id=_str(op), upid=_str(upid), at=at)


def _ended(at: float, number: int, fields: list[bytes | None]) -> Record:
    op, error = fields
    return Ended(op_id=_str(op), outcome=OUTCOMES[number], error=_str(error), at=at)


def _applied(at: float, number: int, fields: list[bytes | None]) -> Record:
    op, key, digest = fields  # the digest is raw bytes: never decoded as text
    if digest is None:
        raise ValueError("an applied record without its payload hash")
    return Applied(op_id=_str(op), key=_str(key), payload_hash=digest, outcome=OUTCOMES[number], at=at)


def _refused(at: float, number: int, fields: list[bytes | None]) -> Record:
    op, kind, reason, detail, key = fields
    return RefusalRecord(op_id=_opt(op), vmid=number, kind=_str(kind), reason=_str(reason), detail=_str(detail),
                   key=_opt(key), at=at)


_DECODERS: dict[bytes, Callable[[float, int, list[bytes | None]], Record]] = {
    BEGUN: _begun, TASK: _task, ENDED: _ended, APPLIED: _applied, REFUSED: _refused,
}


def record_of(body: Body) -> Record:
    """The typed record of a decoded body (ValueError on a malformed one)."""
    kind, at, number, fields = body
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ValueError(f"no record type {kind!r}")
    try:
        return decoder(at, number, fields)
    except (ValueError, KeyError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"malformed record of type {kind!r}: {exc}") from exc


def encode(record: Record) -> bytes:
    """One frame holding ``record``."""
    return encode_body(fields_of(record))


def encode_body(body: Body) -> bytes:
    """One frame holding a record's body."""
    kind, at, number, fields = body
    parts = [_FIXED.pack(kind, at, number)]
    for field in fields:
        if field is None:
            parts.append(_LEN.pack(_NONE))
        else:
            parts += (_LEN.pack(len(field)), field)
    raw = b"".join(parts)
    framed = _LEN.pack(len(raw)) + raw
    return MAGIC + _LEN.pack(zlib.crc32(framed)) + framed


def decode_body(data: bytes, start: int, end: int) -> Body:
    """The body stored in ``data[start:end]`` (ValueError/struct.error when malformed)."""
    kind, at, number = _FIXED.unpack_from(data, start)
    fields: list[bytes | None] = []
    offset = start + _FIXED.size
    while offset < end:
        (length,) = _LEN.unpack_from(data, offset)
        offset += 4
        if length == _NONE:
            fields.append(None)
            continue
        if offset + length > end:
            raise ValueError("field runs past the record")
        fields.append(data[offset:offset + length])
        offset += length
    return kind, at, number, fields


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
    if length > MAX_BODY:
        return "impossible length"
    end: int = offset + HEADER.size + length
    if end > len(data):
        return "truncated body"
    if zlib.crc32(memoryview(data)[offset + 6:end]) != crc:
        return "checksum mismatch"
    return end


def scan(data: bytes, sink: Callable[[Body], None]) -> tuple[BadFrame | None, bool]:
    """Decode frames from the start into ``sink`` (streaming: nothing is kept); stop at the first bad one.

    Returns the bad frame (None when the data ended cleanly), and whether any valid frame exists
    after the bad one (True: corruption in the middle; False: a torn tail).
    """
    append, unpack, crc32, decode = sink, HEADER.unpack_from, zlib.crc32, decode_body
    view, size, offset = memoryview(data), len(data), 0
    while offset < size:
        # The common case inline (this loop runs once per record on reopen); _frame_at says why not.
        if size - offset >= HEADER.size:
            magic, crc, length = unpack(data, offset)
            end = offset + HEADER.size + length
            if magic == MAGIC and length <= MAX_BODY and end <= size and crc32(view[offset + 6:end]) == crc:
                try:
                    append(decode(data, offset + HEADER.size, end))
                except (ValueError, struct.error) as exc:
                    return BadFrame(offset, f"undecodable record: {exc}"), _valid_frame_after(data, end)
                offset = end
                continue
        reason = _frame_at(data, offset)
        assert isinstance(reason, str)
        return BadFrame(offset, reason), _valid_frame_after(data, offset + 1)
    return None, False


def _valid_frame_after(data: bytes, start: int) -> bool:
    """Whether a frame with a valid checksum starts anywhere at or after ``start``."""
    position = data.find(MAGIC, start)
    while position != -1:
        if not isinstance(_frame_at(data, position), str):
            return True
        position = data.find(MAGIC, position + 1)
    return False
