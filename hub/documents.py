"""Between the store and the wire: an applied envelope checked as a courier checks it, and rows as messages.

The hub never verifies a signature (executors do, against their own trust stores); it checks only what keeps its
sequence honest: the envelope parses, names the cluster it is applied to, is the next version, and names the
payload sha256 of the version it replaces. Each refusal says which field is at fault.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from hub.store import Entry, Version
from hub.v1 import hub_pb2 as pb
from safety import desireddoc
from safety.refusal import Refused


class HubRefusal(Exception):  # noqa: N818 (a refusal, carried to the gRPC status)
    """A call the hub refuses: the gRPC status and a message that names the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True, slots=True)
class Checked:
    """An envelope that parsed: its document and the sha256 of its payload."""

    document: desireddoc.DesiredDocument
    payload_sha256: str


def _invalid(message: str) -> HubRefusal:
    return HubRefusal(grpc.StatusCode.INVALID_ARGUMENT, message)


def parse(envelope: bytes, limit: int) -> Checked:
    """The document in ``envelope`` (no signature check); HubRefusal INVALID_ARGUMENT naming the field."""
    if not envelope:
        raise _invalid("envelope: must not be empty")
    if len(envelope) > limit:
        raise _invalid(f"envelope: {len(envelope)} bytes, over the limit of {limit} bytes; nothing stored")
    try:
        parsed = desireddoc.parse_envelope(envelope)
        if parsed.payload_type != desireddoc.PAYLOAD_TYPE:
            raise _invalid(f"envelope.payloadType: {parsed.payload_type[:80]!r} is not {desireddoc.PAYLOAD_TYPE}")
        document = desireddoc.parse_payload(parsed.payload)
    except Refused as exc:
        detail = exc.detail if exc.detail.startswith(("envelope", "document")) else f"envelope: {exc.detail}"
        raise _invalid(detail) from exc
    return Checked(document=document, payload_sha256=desireddoc.payload_sha256(parsed))


def check_next(checked: Checked, *, cluster: str, expected_version: int) -> None:
    """The document is for ``cluster`` and is ``expected_version + 1``; HubRefusal INVALID_ARGUMENT otherwise."""
    document = checked.document
    if document.cluster != cluster:
        raise _invalid(f"document.cluster: the document is for cluster {document.cluster}, applied to {cluster}")
    if document.version != expected_version + 1:
        raise _invalid(f"document.version: the document is version {document.version}, but expected_version "
                       f"{expected_version} makes this version {expected_version + 1}")


def check_previous(checked: Checked, latest: Version | None) -> None:
    """The document names the payload sha256 of the version it replaces; FAILED_PRECONDITION otherwise."""
    stored = payload_sha256(latest) if latest is not None else ""
    if checked.document.previous_sha256 != stored:
        what = f"version {latest.version} is {stored}" if latest is not None else "the cluster has no version yet"
        raise HubRefusal(grpc.StatusCode.FAILED_PRECONDITION,
                           f"document.previous_sha256: the document replaces "
                           f"{checked.document.previous_sha256 or 'nothing'}, but {what}")


# Stored versions never change: their payload sha256, once read, is kept (a few bytes each, bounded).
_PAYLOAD_SHA: dict[tuple[str, int, str], str] = {}
_PAYLOAD_SHA_MAX = 4096


def known_sha(cluster: str, version: int, envelope_sha: str) -> str | None:
    """The payload sha256 of a stored version if this process has read it (None: not yet)."""
    return _PAYLOAD_SHA.get((cluster, version, envelope_sha))


def remember(version: Version, payload_sha: str) -> None:
    """Keep a stored version's payload sha256 (Apply knows it already)."""
    if len(_PAYLOAD_SHA) >= _PAYLOAD_SHA_MAX:
        _PAYLOAD_SHA.clear()
    _PAYLOAD_SHA[(version.cluster, version.version, version.sha256)] = payload_sha


def payload_sha256(version: Version) -> str:
    """The payload sha256 of a stored envelope (the store hashes the whole envelope; documents name payloads)."""
    key = (version.cluster, version.version, version.sha256)
    known = _PAYLOAD_SHA.get(key)
    if known is not None:
        return known
    try:
        found = desireddoc.payload_sha256(desireddoc.parse_envelope(version.envelope))
    except Refused:
        return ""  # not stored by this hub's Apply (every envelope it stores parses): nothing to link to
    remember(version, found)
    return found


def millis(version: Version | Entry) -> int:
    """When the store kept it, Unix milliseconds."""
    return int(version.created_at.timestamp() * 1000)


def to_document(version: Version) -> pb.Document:
    """A stored version as the wire's Document."""
    return pb.Document(cluster=version.cluster, version=version.version, envelope=version.envelope,
                       payload_sha256=payload_sha256(version), author=version.author, message=version.message,
                       stored_unix_ms=millis(version))


def to_entry(entry: Entry, payload_sha: str) -> pb.HistoryEntry:
    """A history row as the wire's HistoryEntry (``payload_sha``: its payload's sha256, read by the caller)."""
    return pb.HistoryEntry(version=entry.version, payload_sha256=payload_sha, size=entry.size, author=entry.author,
                           message=entry.message, stored_unix_ms=millis(entry))
