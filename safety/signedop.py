"""Signed operations: a DSSE v1 envelope profile and verification steps 1-11 (docs/SAFETY.md §6.1, §7).

The signature covers ``PAE(payloadType, payload)``, so the type is inside it and there is no algorithm
field anywhere (Ed25519 only). The payload's exact received bytes are verified and only then parsed;
nothing is ever re-serialized to verify. The keyid is a lookup hint: the key it names must verify the
signature, no other key is tried. Thresholds count distinct public keys. Checks run cheapest and
unauthenticated first, and nothing here writes anything: the nonce (step 12) and the binding against the
live guest (step 13, ``check_binding``) are the gate's.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from safety import challenge as challenges
from safety import strictjson
from safety.opschema import DESTRUCTIVE, TTL_CEILING
from safety.payload import OpPayload, Precondition, action_of, action_part, check_binding, parse_payload, to_json
from safety.refusal import RefusalReason, Refused
from safety.truststore import KEY_ID, Role, TrustKey, TrustStore, key_id

__all__ = ["OP_CAPS", "PAYLOAD_TYPE", "Caps", "Envelope", "OpPayload", "Precondition", "Signature", "VerifiedOp",
           "action_of", "action_part", "check_binding", "check_caps", "check_signer_keys", "envelope_to_json",
           "holders", "pae", "parse_envelope_json", "parse_payload", "sign", "to_json", "verified_keys", "verify"]

PAYLOAD_TYPE = "application/vnd.pve-reconcile.op.v1+json"
MAX_ENVELOPE = 64 * 1024
MAX_PAYLOAD = 16 * 1024
MAX_SIGNATURES = 4
SIGNATURE_BYTES = 64
MAX_SKEW = 300.0
SIGNER_BACKDATE = 60  # ``op sign`` puts not_before this far in the past (a gate whose clock runs behind)
_ENVELOPE_FIELDS = frozenset({"payloadType", "payload", "signatures"})
_SIGNATURE_FIELDS = frozenset({"keyid", "sig"})


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: ``DSSEv1 SP len(type) SP type SP len(body) SP body`` (byte lengths)."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


@dataclass(frozen=True, slots=True, kw_only=True)
class Caps:
    """Size caps checked before anything is parsed: an envelope profile (ops, hub documents) sets its own."""

    max_envelope: int
    max_payload: int
    max_signatures: int = MAX_SIGNATURES


OP_CAPS = Caps(max_envelope=MAX_ENVELOPE, max_payload=MAX_PAYLOAD)


@dataclass(frozen=True, slots=True, kw_only=True)
class Signature:
    """One signature: the signing key's id (a lookup hint only) and 64 Ed25519 bytes over the PAE."""

    keyid: str
    sig: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """A DSSE envelope: the payload type, the payload's exact bytes and 1-4 signatures."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedOp:
    """An op that passed steps 1-11: its payload, the ids of the keys counted towards the threshold."""

    payload: OpPayload
    signers: tuple[str, ...]
    envelope_sha256: str
    payload_sha256: str


def _malformed(detail: str) -> Refused:
    return Refused(RefusalReason.MALFORMED, detail)


def b64decode(value: object, field: str) -> bytes:
    """Standard, padded base64 and nothing else: re-encoding must give the same text (no stray trailing bits)."""
    if not isinstance(value, str) or not value.isascii():
        raise _malformed(f"{field}: must be an ASCII base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _malformed(f"{field}: not standard padded base64") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise _malformed(f"{field}: not canonical base64 (non-zero trailing bits)")
    return raw


def check_caps(env: Envelope, caps: Caps = OP_CAPS) -> None:
    """Step 1 (and step 2's keyid form for envelopes that arrive as protobuf)."""
    size = len(env.payload_type) + len(env.payload) + sum(len(s.keyid) + len(s.sig) for s in env.signatures)
    if size > caps.max_envelope:
        raise _malformed(f"envelope larger than {caps.max_envelope} bytes")
    if len(env.payload) > caps.max_payload:
        raise _malformed(f"payload of {len(env.payload)} bytes is larger than {caps.max_payload}")
    if not 1 <= len(env.signatures) <= caps.max_signatures:
        raise _malformed(f"{len(env.signatures)} signatures; an envelope carries 1..{caps.max_signatures}")
    for i, signature in enumerate(env.signatures):
        if not KEY_ID.fullmatch(signature.keyid):
            raise _malformed(f"signatures[{i}].keyid: must be sha256:<64 hex>")


def parse_envelope_json(data: bytes, caps: Caps = OP_CAPS) -> Envelope:
    """The JSON file form, strictly: size caps first, no unknown fields (an ``alg`` is MALFORMED), canonical base64."""
    if len(data) > caps.max_envelope:
        raise _malformed(f"envelope of {len(data)} bytes is larger than {caps.max_envelope}")
    raw = strictjson.loads(data, what="envelope")
    if set(raw) != _ENVELOPE_FIELDS:
        extra = sorted(set(raw) - _ENVELOPE_FIELDS) or sorted(_ENVELOPE_FIELDS - set(raw))
        raise _malformed(f"envelope.{extra[0]}: the envelope has exactly payloadType, payload and signatures")
    if not isinstance(raw["payloadType"], str):
        raise _malformed("envelope.payloadType: must be a string")
    if not isinstance(raw["signatures"], list) or not 1 <= len(raw["signatures"]) <= caps.max_signatures:
        raise _malformed(f"envelope.signatures: must be a list of 1..{caps.max_signatures} signatures")
    signatures = []
    for i, item in enumerate(raw["signatures"]):
        if not isinstance(item, dict) or set(item) != _SIGNATURE_FIELDS or not isinstance(item["keyid"], str):
            raise _malformed(f"envelope.signatures[{i}]: must be exactly {{\"keyid\": str, \"sig\": base64}}")
        signatures.append(Signature(keyid=item["keyid"], sig=b64decode(item["sig"], f"envelope.signatures[{i}].sig")))
    env = Envelope(payload_type=raw["payloadType"], payload=b64decode(raw["payload"], "envelope.payload"),
                   signatures=tuple(signatures))
    check_caps(env, caps)
    return env


def envelope_to_json(env: Envelope) -> bytes:
    """The JSON file form of ``env`` (standard padded base64, sorted keys)."""
    document = {"payloadType": env.payload_type, "payload": base64.b64encode(env.payload).decode("ascii"),
                "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                               for s in env.signatures]}
    return json.dumps(document, sort_keys=True, indent=1).encode("ascii") + b"\n"


def public_raw(key: Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of a public key (what key ids hash)."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(payload: bytes, key: Ed25519PrivateKey, payload_type: str = PAYLOAD_TYPE) -> Signature:
    """``key``'s signature over ``PAE(payload_type, payload)`` (an op's type unless told), with its key id."""
    return Signature(keyid=key_id(public_raw(key.public_key())), sig=key.sign(pae(payload_type, payload)))


def verified_keys(env: Envelope, store: TrustStore) -> list[TrustKey]:
    """Step 4: every signature verifies under the key its keyid names; the distinct keys, in envelope order."""
    message = pae(env.payload_type, env.payload)
    keys: dict[bytes, TrustKey] = {}
    for i, signature in enumerate(env.signatures):
        key = store.keys.get(signature.keyid)
        if key is None:
            raise Refused(RefusalReason.UNKNOWN_KEY,
                          f"signatures[{i}]: key {signature.keyid} is not in trust store v{store.version}")
        if len(signature.sig) != SIGNATURE_BYTES:
            raise Refused(RefusalReason.SIGNATURE_INVALID, f"signatures[{i}]: {len(signature.sig)} bytes, not 64")
        try:
            key.public.verify(signature.sig, message)
        except InvalidSignature:
            raise Refused(RefusalReason.SIGNATURE_INVALID,
                          f"signatures[{i}]: does not verify under {signature.keyid}") from None
        keys.setdefault(key.public_raw, key)
    return list(keys.values())


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def _check_time(payload: OpPayload, store: TrustStore, now: float, skew: float) -> Role:
    """Step 7: the validity window (no leeway on not_after), the class TTL ceiling and the role's max_ttl."""
    clocks = f"executor clock {now:.0f} ({_iso(now)})"
    if payload.not_before > now + skew:
        raise Refused(RefusalReason.NOT_YET_VALID, f"not_before {payload.not_before} "
                      f"({_iso(payload.not_before)}) is later than the {clocks} plus {skew:.0f}s skew")
    if now >= payload.not_after:
        raise Refused(RefusalReason.EXPIRED, f"not_after {payload.not_after} ({_iso(payload.not_after)}) "
                      f"is not later than the {clocks}")
    ttl = payload.not_after - payload.not_before
    if ttl > TTL_CEILING[payload.class_]:
        raise Refused(RefusalReason.TTL_TOO_LONG,
                      f"lifetime {ttl}s exceeds the {TTL_CEILING[payload.class_]}s ceiling for {payload.class_}")
    role = store.roles.get(payload.role)
    if role is None:
        raise Refused(RefusalReason.ROLE_DENIES, f"role {payload.role!r} is not in trust store v{store.version}")
    if ttl > role.max_ttl:
        raise Refused(RefusalReason.TTL_TOO_LONG, f"lifetime {ttl}s exceeds role {role.name}'s max_ttl {role.max_ttl}s")
    return role


def _check_role(payload: OpPayload, role: Role) -> None:
    """Step 8: the role's scope names the kind, the class, the audience and the vmid (empty lists name nothing)."""
    denials = ((payload.kind not in role.kinds, f"kind {payload.kind}"),
               (payload.class_ not in role.classes, f"class {payload.class_}"),
               (not role.allows_audience(payload.audience), f"audience {payload.audience}"),
               (not role.allows_vmid(payload.vmid), f"vmid {payload.vmid}"))
    for denied, what in denials:
        if denied:
            raise Refused(RefusalReason.ROLE_DENIES, f"role {role.name} does not allow {what}")


def check_signer_keys(keys: list[TrustKey], store: TrustStore, now: float) -> None:
    """No signer revoked in ``store`` or past its ``not_after`` at ``now`` (KEY_REVOKED, KEY_EXPIRED)."""
    for key in keys:
        if key.id in store.revoked_keys:
            raise Refused(RefusalReason.KEY_REVOKED, f"key {key.id} ({key.owner}) is revoked")
        if now >= key.not_after:
            raise Refused(RefusalReason.KEY_EXPIRED,
                          f"key {key.id} ({key.owner}) expired at {_iso(key.not_after)}; executor clock {_iso(now)}")


def holders(role: Role, keys: list[TrustKey]) -> tuple[str, ...]:
    """The ids of the distinct verified keys that hold ``role``: what its threshold counts (rows 32, 33)."""
    return tuple(key.id for key in keys if role.name in key.roles)


def _check_signers(role: Role, keys: list[TrustKey], store: TrustStore, now: float) -> tuple[str, ...]:
    """Step 9: no signer revoked or expired; distinct keys holding the role meet its threshold."""
    check_signer_keys(keys, store, now)
    counted = holders(role, keys)
    if len(counted) < role.threshold:
        raise Refused(RefusalReason.THRESHOLD_NOT_MET, f"role {role.name} needs {role.threshold} distinct keys "
                      f"holding it; {len(counted)} of {len(keys)} verified signers do")
    return counted


def verify(env: Envelope, store: TrustStore, *, now: float, audience: str, challenge_key: bytes | None,
           skew: float = 120.0, check_challenge: bool = True) -> VerifiedOp:
    """Steps 1-11 of docs/SAFETY.md §7 for ``env`` at ``now`` on the executor named ``audience``; raises Refused.

    ``challenge_key`` is the gate secret; without it no DESTRUCTIVE op verifies. Reads nothing, writes nothing.
    ``check_challenge=False`` skips step 11: only for offline review without the secret (``op verify``,
    which says so), never for the gate.
    """
    if not 0 <= skew <= MAX_SKEW:
        raise ValueError(f"skew must be 0..{MAX_SKEW:.0f} seconds")
    check_caps(env)
    if env.payload_type != PAYLOAD_TYPE:
        raise Refused(RefusalReason.PAYLOAD_TYPE, f"payloadType {env.payload_type[:80]!r} is not {PAYLOAD_TYPE}")
    keys = verified_keys(env, store)
    payload = parse_payload(env.payload)
    if payload.audience != audience:
        raise Refused(RefusalReason.WRONG_AUDIENCE, f"op is for {payload.audience}, this executor is {audience}")
    role = _check_time(payload, store, now, skew)
    _check_role(payload, role)
    signers = _check_signers(role, keys, store, now)
    if payload.op_id in store.revoked_ops:
        raise Refused(RefusalReason.OP_REVOKED, f"op {payload.op_id} is revoked in trust store v{store.version}")
    if payload.class_ == DESTRUCTIVE and check_challenge:
        if payload.challenge is None or challenge_key is None:
            raise Refused(RefusalReason.CHALLENGE_INVALID, "a DESTRUCTIVE op needs a challenge from this executor")
        challenges.verify(challenge_key, payload.challenge, action_part(payload), now=now)
    return VerifiedOp(payload=payload, signers=signers,
                      envelope_sha256=hashlib.sha256(envelope_to_json(env)).hexdigest(),
                      payload_sha256=hashlib.sha256(env.payload).hexdigest())
