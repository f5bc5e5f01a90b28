"""Hub documents: a cluster's desired state, versioned and signed, verified by each executor (docs/SAFETY.md §6.9).

A hub is a courier. The executor trusts a document because keys of its own trust store signed it, never
because the hub sent it: a hub that is broken into can withhold a new version, but cannot forge one
(signatures), replay an older one (the version floor the executor holds) or move a node from the document it
holds to another under the same version (``FORK``; the next version names the sha256 of the one it replaces).

What it can do: when the signers signed two documents under one version (a draft signed for review, the loser
of a race between two ``pve-hub apply``, which now reads the latest again right before it signs, or signers
who signed twice), both are valid, and a hub broken into can send one to some nodes and the other to the rest:
each node checks its own chain and nodes do not talk to each other, so each holds its own. The next version
names one of them: the nodes holding the other refuse it (``FORK``) and take the version after it (a skip), or,
sooner, the replacement the trust store names once the other is revoked (``[revoked].documents`` and
``[[floor_resets]]``). It does not go unseen: each node exports the pair it holds
(``pve_executor_hub_held_info{version,sha256}``, ``pve-executor whoami``), for a monitor that is not the hub to
compare. Signing one document per version is the signers' duty.

The envelope is signedop's DSSE profile with its own ``payloadType`` and larger size caps, so an op never
verifies as a document nor a document as an op: the type is inside every signature. The payload is strict
JSON (``safety.strictjson``); its ``desired`` field is the desired file's text, which the executor parses
with its own loader, so the hub and the file are one format. Nothing here reads or writes a file: the
executor keeps the held ``(version, sha256)`` on disk (``Held``) and passes it in.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from safety import opschema as s
from safety import signedop, strictjson, truststore
from safety.refusal import RefusalReason, Refused
from safety.signedop import Envelope
from safety.truststore import Role, TrustStore

PAYLOAD_TYPE = "application/vnd.pve-reconcile.desired.v1+json"
MAX_DESIRED = 4 << 20  # bytes of desired text: a 10,000-guest cluster fits with room to spare
MAX_LINE = 1024  # author and message
# JSON escapes at most double the text (newline, tab, CR, quote, backslash: the only escapes the text may need).
MAX_PAYLOAD = 2 * MAX_DESIRED + 64 * 1024
MAX_ENVELOPE = MAX_PAYLOAD * 4 // 3 + 64 * 1024  # base64, then four signatures and the JSON around them
CAPS = signedop.Caps(max_envelope=MAX_ENVELOPE, max_payload=MAX_PAYLOAD)
VERSION_MAX = truststore.VERSION_MAX  # 2**53: exact in every JSON reader
# The most a version may rise over the one held (0 included). A hub stores versions gap-free, one per apply, so
# an honest cluster never comes near; without a bound one threshold of signers (a stolen key) could sign
# VERSION_MAX and end every later version on every node at once. With it, pushing a floor to the end takes
# billions of signed steps, and a floor pushed up is reset by the trust store (``FloorReset``).
MAX_VERSION_JUMP = 1_000_000
TIME_MAX = 1 << 40
CLUSTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
FIELDS = ("cluster", "version", "role", "author", "message", "created", "previous_sha256", "desired")
# Tab, LF and CRLF are a text file's own; a CR alone is a YAML line break that `cat` overwrites with what follows.
_ASCII_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")
_NON_ASCII = re.compile("[^\x00-\x7f]")
# Control and format characters, and the line and paragraph separators: YAML breaks a line at U+2028/U+2029
# where a terminal or a diff shows none, so `vmid: 100  # keep running<U+2028>    state: stopped` reads as a
# comment to a reviewer and as `state: stopped` to the loader.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp"})


@dataclass(frozen=True, slots=True, kw_only=True)
class DesiredDocument:
    """One version of a cluster's desired state, as parsed from its verified bytes."""

    cluster: str
    version: int
    role: str  # the trust store role whose threshold the signers meet
    author: str
    message: str
    created: int  # unix time the author signed it (informational: a document does not expire)
    previous_sha256: str  # the sha256 of the document it replaces; "" for version 1
    desired: str  # the desired file's text


@dataclass(frozen=True, slots=True, kw_only=True)
class Held:
    """The version an executor holds: what it passes to ``verify_document`` and keeps on disk after each apply."""

    version: int = 0
    sha256: str = ""

    def to_text(self) -> str:
        """One line, ``VERSION SHA256``: the on-disk form."""
        return f"{self.version} {self.sha256}\n"

    @classmethod
    def from_text(cls, text: str) -> Held:
        """The on-disk form back; ValueError when it is not one (the caller must then refuse, not start at 0)."""
        words = text.split()
        if len(words) != 2 or not words[0].isdigit() or not SHA256.fullmatch(words[1]) or int(words[0]) < 1:
            raise ValueError("not 'VERSION SHA256'")
        return cls(version=int(words[0]), sha256=words[1])


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedDocument:
    """A document that verified: its payload, its sha256 (what the next version names), the keys counted.

    ``unchanged`` is True for the version already held, sent again with identical bytes: not an error, nothing
    new to apply (the executor ACKs it again and keeps its floor).
    """

    document: DesiredDocument
    sha256: str
    signers: tuple[str, ...]
    unchanged: bool

    @property
    def held(self) -> Held:
        """What the executor holds once it took this document."""
        return Held(version=self.document.version, sha256=self.sha256)


def _line(path: str, value: object) -> str:
    # Control and format characters (bidi overrides, zero-width) could make a reviewer read another text.
    if not isinstance(value, str) or not 0 < len(value) <= MAX_LINE:
        raise s.malformed(path, f"must be a string of 1..{MAX_LINE} characters")
    bad = next((c for c in value if unicodedata.category(c) in _HIDDEN), None)
    if bad is not None:
        raise s.malformed(path, f"holds the control, format or separator character U+{ord(bad):04X}")
    return value


def _first_hidden(text: str) -> int | None:
    """The index of the first control, format or separator character but tab and line ends, or None (fast on ASCII)."""
    found = [match.start() for match in (_ASCII_CONTROL.search(text),) if match is not None]
    if not text.isascii():
        found += [next((m.start() for m in _NON_ASCII.finditer(text)
                        if unicodedata.category(m.group()) in _HIDDEN), len(text))]
    first = min(found, default=len(text))
    return first if first < len(text) else None


def _desired(path: str, value: object) -> str:
    """The desired file's text: at most MAX_DESIRED bytes; no control, format or separator character but tab and line
    ends."""
    if not isinstance(value, str):
        raise s.malformed(path, "must be the desired file's text")
    size = len(value.encode("utf-8"))
    if size > MAX_DESIRED:
        raise s.malformed(path, f"{size} bytes, more than {MAX_DESIRED}")
    index = _first_hidden(value)
    if index is not None:
        line = value.count("\n", 0, index) + 1
        raise s.malformed(path, f"line {line} holds the control, format or separator character "
                                f"U+{ord(value[index]):04X}")
    return value


def _previous(path: str, value: object) -> str:
    if not isinstance(value, str) or not (value == "" or SHA256.fullmatch(value)):
        raise s.malformed(path, "must be 64 lowercase hex (the sha256 of the version replaced), or \"\" for version 1")
    return value


_VALIDATORS: dict[str, s.Validator] = {
    "cluster": s.text(CLUSTER, "an ASCII cluster name"),
    "version": s.integer(1, VERSION_MAX),
    "role": s.text(s.ROLE, "an ASCII role name"),
    "author": _line,
    "message": _line,
    "created": s.integer(0, TIME_MAX),
    "previous_sha256": _previous,
    "desired": _desired,
}


def parse_payload(data: bytes) -> DesiredDocument:
    """The document in ``data``, strictly; Refused(MALFORMED) names the field at fault."""
    raw = strictjson.loads(data, what="document")
    values = s.checked_fields(raw, FIELDS, _VALIDATORS, "document")
    if (values["version"] == 1) != (values["previous_sha256"] == ""):
        raise s.malformed("document.previous_sha256", "must be \"\" for version 1 and only for version 1")
    return DesiredDocument(**values)


def to_json(document: DesiredDocument) -> bytes:
    """The payload bytes of ``document`` (sorted keys, compact, UTF-8): what is signed."""
    fields = {name: getattr(document, name) for name in FIELDS}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def build_payload(*, cluster: str, version: int, role: str, author: str, message: str, created: int,
                  previous_sha256: str, desired: str) -> bytes:
    """The payload to sign, proven valid by the verifier's own parser; Refused(MALFORMED) names the field."""
    data = to_json(DesiredDocument(cluster=cluster, version=version, role=role, author=author, message=message,
                                   created=created, previous_sha256=previous_sha256, desired=desired))
    if to_json(parse_payload(data)) != data:  # one encoding per document, whichever tool writes it
        raise s.malformed("document", "does not round-trip to its canonical form")
    return data


def seal(payload: bytes, *keys: Ed25519PrivateKey) -> Envelope:
    """A document envelope over ``payload``, one signature per key (distinct keys: a threshold counts keys)."""
    envelope = Envelope(payload_type=PAYLOAD_TYPE, payload=payload, signatures=())
    for key in keys:
        envelope = cosign(envelope, key)
    return envelope


def cosign(envelope: Envelope, key: Ed25519PrivateKey) -> Envelope:
    """One more signature over the same payload bytes; ValueError for a key that signed already or a full envelope."""
    if envelope.payload_type != PAYLOAD_TYPE:
        raise ValueError(f"payloadType {envelope.payload_type[:80]!r} is not {PAYLOAD_TYPE}")
    signature = signedop.sign(envelope.payload, key, PAYLOAD_TYPE)
    if any(other.keyid == signature.keyid for other in envelope.signatures):
        raise ValueError(f"key {signature.keyid} already signed this document: a threshold counts distinct keys")
    if len(envelope.signatures) >= CAPS.max_signatures:
        raise ValueError(f"the envelope already carries {CAPS.max_signatures} signatures, the most it may")
    return Envelope(payload_type=PAYLOAD_TYPE, payload=envelope.payload, signatures=(*envelope.signatures, signature))


def to_bytes(envelope: Envelope) -> bytes:
    """The envelope's one canonical byte form: what a hub stores and sends unchanged."""
    return signedop.envelope_to_json(envelope)


def parse_envelope(data: bytes) -> Envelope:
    """The envelope in ``data``: size caps first, strict JSON, canonical base64 and the canonical byte form."""
    envelope = signedop.parse_envelope_json(data, CAPS)
    if to_bytes(envelope) != data:
        # One spelling per document: whitespace or key order changed in transit is refused, not normalized.
        raise Refused(RefusalReason.MALFORMED, "envelope: not in its canonical form (sorted keys, one-space indent)")
    return envelope


def payload_sha256(envelope: Envelope) -> str:
    """The document's sha256: of its signed payload bytes, so a cosignature or a re-send does not change it."""
    return hashlib.sha256(envelope.payload).hexdigest()


def _role(document: DesiredDocument, store: TrustStore, audience: str) -> Role:
    role = store.roles.get(document.role)
    if role is None:
        raise Refused(RefusalReason.ROLE_DENIES, f"role {document.role!r} is not in trust store v{store.version}")
    if s.DESIRED_APPLY not in role.kinds:
        raise Refused(RefusalReason.ROLE_DENIES, f"role {role.name} does not allow kind {s.DESIRED_APPLY}")
    if not role.allows_audience(audience):
        raise Refused(RefusalReason.ROLE_DENIES, f"role {role.name} does not allow audience {audience}")
    return role


def _check_version(document: DesiredDocument, sha256: str, held: Held) -> bool:
    """The version rule against the one held; True when it is that very document again."""
    version = document.version
    if version > held.version + MAX_VERSION_JUMP:
        raise Refused(RefusalReason.VERSION_JUMP, f"version {version} is more than {MAX_VERSION_JUMP} above "
                                                  f"version {held.version}, held here (a hub stores versions one "
                                                  f"by one)")
    if version < held.version:
        raise Refused(RefusalReason.ROLLBACK, f"version {version} is lower than version {held.version}, held here")
    if version == held.version:
        if sha256 != held.sha256:
            raise Refused(RefusalReason.FORK, f"version {version} is held here as sha256 {held.sha256}; "
                                              f"this is another document ({sha256}) under the same version")
        return True
    if version == held.version + 1 and held.version and document.previous_sha256 != held.sha256:
        raise Refused(RefusalReason.FORK, f"version {version} replaces sha256 {document.previous_sha256}, "
                                          f"but version {held.version} held here is {held.sha256}")
    # A skip (held+2 or later, or a first document) cannot be linked to what is held: each version is signed
    # whole by the threshold, so a skip loses nothing but the link to versions never seen here.
    return False


def verify_document(data: bytes, store: TrustStore, *, cluster: str, audience: str, held_version: int,
                    held_sha256: str, now: float) -> VerifiedDocument:
    """The checks of docs/SAFETY.md §6.9 on the envelope bytes ``data``; raises Refused with the first that fails.

    ``cluster`` and ``audience`` (node@cluster) are this executor's; ``held_version``/``held_sha256`` the
    document it holds (0 and "" for none); ``now`` its clock, for key expiry. Reads and writes nothing.
    """
    held = Held(version=held_version, sha256=held_sha256)
    if held_version < 0 or (held_version == 0) != (held_sha256 == "") or (held_sha256 and not SHA256.fullmatch(
            held_sha256)):
        raise ValueError("held: version 0 with sha256 \"\", or a version >= 1 with its 64-hex sha256")
    envelope = parse_envelope(data)
    if envelope.payload_type != PAYLOAD_TYPE:
        raise Refused(RefusalReason.PAYLOAD_TYPE, f"payloadType {envelope.payload_type[:80]!r} is not {PAYLOAD_TYPE}")
    keys = signedop.verified_keys(envelope, store)
    sha256 = payload_sha256(envelope)
    if sha256 in store.revoked_documents:  # after the signature: an unsigned envelope learns nothing of the store
        raise Refused(RefusalReason.DOCUMENT_REVOKED, f"document sha256 {sha256} is revoked in trust store "
                                                      f"v{store.version}")
    document = parse_payload(envelope.payload)
    if document.cluster != cluster:
        raise Refused(RefusalReason.WRONG_AUDIENCE, f"document is for cluster {document.cluster}, "
                                                    f"this executor is in {cluster}")
    role = _role(document, store, audience)
    signedop.check_signer_keys(keys, store, now)
    counted = signedop.holders(role, keys)
    if len(counted) < role.threshold:
        raise Refused(RefusalReason.THRESHOLD_NOT_MET, f"role {role.name} needs {role.threshold} distinct keys "
                      f"holding it; {len(counted)} of {len(keys)} verified signers do")
    if document.created > now + signedop.MAX_SKEW:
        # The node reports the held version's age from ``created``: one signed ahead would read as new for years,
        # and a hub withholding every later version would go unseen.
        raise Refused(RefusalReason.NOT_YET_VALID, f"created {document.created} is later than the executor clock "
                                                   f"{now:.0f} plus {signedop.MAX_SKEW:.0f}s")
    unchanged = _check_version(document, sha256, held)
    return VerifiedDocument(document=document, sha256=sha256, signers=counted, unchanged=unchanged)
