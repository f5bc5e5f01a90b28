"""Signed ops: the DSSE profile, strict payloads and verification steps 1-11 (docs/SAFETY.md §6, §7, §12).

Each test named ``test_rowNN_*`` is one row of the docs/SAFETY.md §12 rejection matrix, with the refusal it must get.
Stores are real files loaded by ``safety.truststore.load``; signatures are real Ed25519 via OpenSSL.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from safety import challenge, classify, opschema, signedop
from safety.payload import parse_payload
from safety.refusal import RefusalReason, Refused
from safety.truststore import TrustStore, load
from tests.signing import (
    AUDIENCE,
    NOW,
    OTHER_SECRET,
    SECRET,
    action,
    approval_op,
    default_doc,
    encode,
    key_entry,
    kid,
    op,
    private,
    seal,
    write_store,
)

VECTORS = Path(__file__).parent / "vectors"
L = 2**252 + 27742317777372353535851937790883648493  # the order of Ed25519's prime subgroup
R = RefusalReason


@pytest.fixture(name="store_at")
def _store_at(tmp_path: Path) -> Callable[..., TrustStore]:
    """A loader of real store files: ``doc`` or default_doc() with overrides, written to tmp_path and loaded."""
    def make(doc: dict[str, Any] | None = None, **overrides: Any) -> TrustStore:
        return load(write_store(tmp_path, doc if doc is not None else default_doc(**overrides)))
    return make


@pytest.fixture(name="static", scope="module")
def _static(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrustStore, signedop.Envelope]:
    """A store and a valid APPROVAL envelope shared by property tests (hypothesis reruns a test many times)."""
    store = load(write_store(tmp_path_factory.mktemp("static"), default_doc()))
    return store, seal(encode(approval_op()), "carol")


@pytest.fixture(name="store")
def _store(store_at: Callable[..., TrustStore]) -> TrustStore:
    """The default store: alice (operator, destroyer), bob (destroyer), carol (operator)."""
    return store_at()


def check(env: signedop.Envelope, store: TrustStore, *, now: float = NOW, audience: str = AUDIENCE,
          secret: bytes | None = SECRET) -> signedop.VerifiedOp:
    """verify() as the gate calls it on pve1@cluster-a."""
    return signedop.verify(env, store, now=now, audience=audience, challenge_key=secret)


def refused(reason: RefusalReason, call: Callable[[], object]) -> Refused:
    """``call`` is refused with ``reason``; the refusal, for checks on its detail."""
    with pytest.raises(Refused) as caught:
        call()
    assert caught.value.reason is reason, caught.value.detail
    return caught.value


def _vector(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return result


# --- vectors -----------------------------------------------------------------------------------------


def test_pae_is_the_dsse_protocol_spec_vector() -> None:
    """pae() gives the spec's bytes, and the spec's ECDSA signature verifies over exactly those bytes."""
    vector = _vector("dsse_protocol.json")
    encoded = signedop.pae(vector["payloadType"], vector["payload_utf8"].encode())
    assert encoded == vector["pae_utf8"].encode()
    numbers = ec.EllipticCurvePublicNumbers(int(vector["key"]["x"]), int(vector["key"]["y"]), ec.SECP256R1())
    public = numbers.public_key()
    raw = base64.b64decode(vector["envelope"]["signatures"][0]["sig"])
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, encoded, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("vector", _vector("dsse_ed25519.json")["vectors"], ids=lambda v: v["id"])
def test_pae_matches_the_dsse_ed25519_vectors(vector: dict[str, Any]) -> None:
    """Byte lengths (not characters) and an empty body encode as DSSE's own Ed25519 vectors say."""
    keys = _vector("dsse_ed25519.json")["keys"]["A"]
    payload = base64.b64decode(vector["payload"])
    encoded = signedop.pae(vector["payloadType"], payload)
    assert encoded.hex() == vector["pae"]
    seed = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(keys["seed"]))
    assert signedop.public_raw(seed.public_key()).hex() == keys["public"]
    seed.public_key().verify(base64.b64decode(vector["sig"]), encoded)


def _wycheproof(result: str, comment: str = "") -> list[dict[str, Any]]:
    return [t for t in _vector("wycheproof_ed25519.json")["tests"]
            if t["result"] == result and comment in t["comment"]]


@pytest.mark.parametrize("case", _wycheproof("invalid"), ids=lambda t: f"tcId{t['tcId']}")
def test_wycheproof_invalid_signatures_are_rejected_by_openssl(case: dict[str, Any]) -> None:
    """OpenSSL (through cryptography) rejects Wycheproof's wrong-length and S >= L signatures (docs/SAFETY.md §6.1)."""
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(_vector("wycheproof_ed25519.json")["key"]["pk"]))
    (valid,) = _wycheproof("valid")
    public.verify(bytes.fromhex(valid["sig"]), bytes.fromhex(valid["msg"]))  # the key and message are right
    with pytest.raises(InvalidSignature):
        public.verify(bytes.fromhex(case["sig"]), bytes.fromhex(case["msg"]))


def test_wycheproof_malleability_cases_have_s_at_least_l() -> None:
    """The malleability vectors keep R and carry S >= L: the construction row 28 applies to our own ops."""
    (valid,) = _wycheproof("valid")
    for case in _wycheproof("invalid", "malleability"):
        sig = bytes.fromhex(case["sig"])
        assert sig[:32] == bytes.fromhex(valid["sig"])[:32]
        assert int.from_bytes(sig[32:], "little") >= L


# --- the positive path ---------------------------------------------------------------------------------


def test_threshold_two_with_two_distinct_keys_verifies(store: TrustStore) -> None:
    """A destroy signed by alice and bob (destroyer, threshold 2) with a fresh challenge verifies."""
    payload = encode(op())
    verified = check(seal(payload, "alice", "bob"), store)
    assert verified.signers == (kid("alice"), kid("bob"))
    assert verified.payload.kind == "guest.destroy" and verified.payload.vmid == 105
    assert verified.payload.params == {"purge": False, "destroy_unreferenced_disks": False}
    assert verified.payload_sha256 == hashlib.sha256(payload).hexdigest()


def test_threshold_one_approval_op_verifies_without_challenge(store: TrustStore) -> None:
    """An APPROVAL op needs no challenge; one operator key meets threshold 1."""
    verified = check(seal(encode(approval_op()), "carol"), store)
    assert verified.signers == (kid("carol"),)
    assert verified.payload.class_ == "APPROVAL" and verified.payload.challenge is None


def test_window_edges_are_half_open(store: TrustStore) -> None:
    """not_before may be up to skew (120 s) ahead; not_after gets no leeway: valid until the second before."""
    env = seal(encode(op(not_before=NOW + 120, not_after=NOW + 900)), "alice", "bob")
    assert check(env, store, now=NOW).payload.not_before == NOW + 120
    assert check(env, store, now=NOW + 899).payload.vmid == 105


def test_envelope_json_round_trip(store: TrustStore) -> None:
    """The file form written by envelope_to_json parses back to the same envelope, which verifies."""
    env = seal(encode(op()), "alice", "bob")
    assert signedop.parse_envelope_json(signedop.envelope_to_json(env)) == env
    assert check(signedop.parse_envelope_json(signedop.envelope_to_json(env)), store).signers


def test_sign_gives_a_signature_that_verifies(store: TrustStore) -> None:
    """sign() names the key by its id and signs the PAE: the CLI's signing path verifies here."""
    payload = encode(op())
    signatures = (signedop.sign(payload, private("alice")), signedop.sign(payload, private("bob")))
    env = signedop.Envelope(payload_type=signedop.PAYLOAD_TYPE, payload=payload, signatures=signatures)
    assert check(env, store).signers == (kid("alice"), kid("bob"))


# --- docs/SAFETY.md §12 rows 6-37 and 46 -----------------------------------------------------------------


def test_row06_expired_names_both_clocks(store: TrustStore) -> None:
    """Row 6: now >= not_after is EXPIRED, and the detail carries the op's and the executor's clocks."""
    refusal = refused(R.EXPIRED, lambda: check(seal(encode(op()), "alice", "bob"), store, now=NOW + 900))
    assert str(NOW + 900) in refusal.detail and "executor clock" in refusal.detail
    assert "2025-11-27T10:55:00" in refusal.detail


def test_row07_not_yet_valid(store: TrustStore) -> None:
    """Row 7: not_before > now + skew is NOT_YET_VALID, with both clocks."""
    env = seal(encode(op(not_before=NOW + 121, not_after=NOW + 900)), "alice", "bob")
    refusal = refused(R.NOT_YET_VALID, lambda: check(env, store))
    assert str(NOW + 121) in refusal.detail and str(NOW) in refusal.detail


@pytest.mark.parametrize(("kind_of_op", "lifetime", "max_ttl"), [
    ("destructive over the role's 1h", 3601, "1h"),
    ("destructive over the 1h class ceiling, role allows 24h", 3601, "24h"),
    ("approval over the role's 4h", 4 * 3600 + 1, "4h"),
    ("approval over the 24h class ceiling", 24 * 3600 + 1, "24h"),
])
def test_row08_ttl_longer_than_role_or_class_allows(store_at: Callable[..., TrustStore], kind_of_op: str,
                                                    lifetime: int, max_ttl: str) -> None:
    """Row 8: not_after - not_before above the role's max_ttl, or the class ceiling, is TTL_TOO_LONG."""
    doc = default_doc()
    for role in doc["roles"]:
        role["max_ttl"] = max_ttl
    store = store_at(doc)
    window = {"not_before": NOW - 60, "not_after": NOW - 60 + lifetime}
    env = (seal(encode(op(**window)), "alice", "bob") if kind_of_op.startswith("destructive")
           else seal(encode(approval_op(**window)), "carol"))
    refused(R.TTL_TOO_LONG, lambda: check(env, store))


def test_row09_key_not_in_the_store(store: TrustStore) -> None:
    """Row 9: a signature by a key the store does not hold is UNKNOWN_KEY."""
    refused(R.UNKNOWN_KEY, lambda: check(seal(encode(op()), "mallory"), store))


def test_row10_keyid_names_a_but_b_signed(store: TrustStore) -> None:
    """Row 10: the keyid is a lookup, not a hint to try others: bob's signature under alice's id is invalid."""
    payload = encode(approval_op())
    forged = signedop.Signature(keyid=kid("alice"), sig=seal(payload, "carol").signatures[0].sig)
    env = signedop.Envelope(payload_type=signedop.PAYLOAD_TYPE, payload=payload, signatures=(forged,))
    refused(R.SIGNATURE_INVALID, lambda: check(env, store))


def test_row11_role_lacks_the_kind(store: TrustStore) -> None:
    """Row 11: a valid signature by an operator-only key claiming operator for guest.destroy is ROLE_DENIES."""
    env = seal(encode(op(role="operator")), "carol")
    assert "kind guest.destroy" in refused(R.ROLE_DENIES, lambda: check(env, store)).detail


def test_row12_vmid_edited_or_presented_for_another(store: TrustStore) -> None:
    """Row 12: an edited vmid breaks the signature; a valid op for 100 presented for 101 is BINDING_MISMATCH."""
    payload = encode(op())
    edited = payload.replace(b'"vmid": 105', b'"vmid": 101')
    assert edited != payload
    env = seal(payload, "alice", "bob")
    tampered = signedop.Envelope(payload_type=env.payload_type, payload=edited, signatures=env.signatures)
    refused(R.SIGNATURE_INVALID, lambda: check(tampered, store))
    verified = check(env, store)
    refused(R.BINDING_MISMATCH, lambda: signedop.check_binding(verified.payload, action(op(vmid=101))))


def test_row13_digest_stale(store: TrustStore) -> None:
    """Row 13: an op bound to digest X against a guest now at digest Y is DIGEST_STALE."""
    verified = check(seal(encode(op()), "alice", "bob"), store)
    live = action(op(precondition={"digest": "9" * 40, "run_state": "stopped"}))
    refused(R.DIGEST_STALE, lambda: signedop.check_binding(verified.payload, live))


def test_row14_vmid_reused_after_recreate(store: TrustStore) -> None:
    """Row 14: a guest destroyed and re-created under the same vmid has another config digest: DIGEST_STALE."""
    verified = check(seal(encode(op()), "alice", "bob"), store)
    recreated = action(op(precondition={"digest": "0" * 40, "run_state": "stopped"}))
    assert recreated["vmid"] == verified.payload.vmid
    refused(R.DIGEST_STALE, lambda: signedop.check_binding(verified.payload, recreated))


@pytest.mark.parametrize("audience", ["pve2@cluster-a", "pve1@cluster-b"])
def test_row15_op_for_another_node_or_cluster(store: TrustStore, audience: str) -> None:
    """Row 15: an op for pve1@cluster-a presented to another node, or to a pve1 in another cluster."""
    refused(R.WRONG_AUDIENCE, lambda: check(seal(encode(op()), "alice", "bob"), store, audience=audience))


def test_row16_stop_op_used_for_destroy() -> None:
    """Row 16: an op signed for stop, presented for guest.destroy, is BINDING_MISMATCH on the kind."""
    stop = parse_payload(encode(approval_op(kind="stop", params={})))
    refusal = refused(R.BINDING_MISMATCH, lambda: signedop.check_binding(stop, action(op())))
    assert refusal.detail.startswith("kind")


def test_row17_class_downgrade() -> None:
    """Row 17: a payload saying APPROVAL for a step the classifier finds DESTRUCTIVE is CLASS_MISMATCH."""
    downgraded = parse_payload(encode(op(**{"class": "APPROVAL"}, challenge=None)))
    refused(R.CLASS_MISMATCH, lambda: signedop.check_binding(downgraded, action(op())))


@pytest.mark.parametrize("reencode", [
    lambda d: json.dumps(d, indent=2).encode(),
    lambda d: json.dumps(dict(reversed(list(d.items())))).encode(),
    lambda d: json.dumps(d, ensure_ascii=True).encode(),
], ids=["whitespace", "key-order", "u-escapes"])
def test_row18_payload_reencoded_after_signing(store: TrustStore, reencode: Callable[[dict[str, Any]], bytes]) -> None:
    """Row 18: the same meaning in other bytes does not verify: bytes are verified, never a re-serialization."""
    doc = op(reason="OPS-123 Außerbetriebnahme")
    original = json.dumps(doc, ensure_ascii=False).encode()
    env = seal(original, "alice", "bob")
    again = reencode(doc)
    assert again != original and parse_payload(again) == parse_payload(original)
    moved = signedop.Envelope(payload_type=env.payload_type, payload=again, signatures=env.signatures)
    refused(R.SIGNATURE_INVALID, lambda: check(moved, store))


def test_row19_envelope_signed_for_another_application(store: TrustStore) -> None:
    """Row 19: an in-toto envelope by the same key is PAYLOAD_TYPE; relabelled as ours, its PAE differs."""
    payload = encode(op())
    foreign = seal(payload, "alice", "bob", payload_type="application/vnd.in-toto+json")
    refused(R.PAYLOAD_TYPE, lambda: check(foreign, store))
    relabelled = signedop.Envelope(payload_type=signedop.PAYLOAD_TYPE, payload=payload, signatures=foreign.signatures)
    refused(R.SIGNATURE_INVALID, lambda: check(relabelled, store))


def test_row20_duplicate_keys_in_a_signed_payload(store: TrustStore) -> None:
    """Row 20: "vmid":105,"vmid":101 inside a validly signed payload is MALFORMED (Python would keep 101)."""
    payload = encode(op()).replace(b'"vmid": 105', b'"vmid": 105, "vmid": 101')
    refusal = refused(R.MALFORMED, lambda: check(seal(payload, "alice", "bob"), store))
    assert "duplicate key 'vmid'" in refusal.detail


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(force=True),
    lambda d: d["params"].update(force=True),
    lambda d: d["precondition"].update(lock=""),
], ids=["top-level", "params", "precondition"])
def test_row21_unknown_field(store: TrustStore, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Row 21: an unknown field at the top, in params or in the precondition is MALFORMED (fail closed)."""
    doc = op()
    mutate(doc)
    refused(R.MALFORMED, lambda: check(seal(encode(doc), "alice", "bob"), store))


@pytest.mark.parametrize("vmid", ['"105"', "105.0", "true", "1e2"])
def test_row22_type_tricks(store: TrustStore, vmid: str) -> None:
    """Row 22: a vmid of "105", 105.0, true or 1e2 is MALFORMED."""
    payload = encode(op()).replace(b'"vmid": 105', b'"vmid": ' + vmid.encode())
    refusal = refused(R.MALFORMED, lambda: check(seal(payload, "alice", "bob"), store))
    assert "vmid" in refusal.detail or "integer" in refusal.detail


@pytest.mark.parametrize("replace", [
    (b'"vmid": 105', b'"vmid": NaN'),
    (b'"vmid": 105', b'"vmid": Infinity'),
    (b'"vmid": 105', b'"vmid": ' + b"1" * 5000),
    (b'"reason": "OPS', b'"reason": "\\ud800OPS'),
], ids=["nan", "infinity", "5000-digits", "lone-surrogate"])
def test_row23_nan_huge_integer_lone_surrogate(store: TrustStore, replace: tuple[bytes, bytes]) -> None:
    """Row 23: NaN, Infinity, an integer of 5,000 digits and a lone surrogate are MALFORMED."""
    payload = encode(op()).replace(*replace)
    refused(R.MALFORMED, lambda: check(seal(payload, "alice", "bob"), store))


@pytest.mark.parametrize("field", [
    {"audience": "\u0440ve1@cluster-a"},  # Cyrillic er
    {"role": "destroye\u0301r"},  # NFD combining accent
    {"kind": "guest.\u200bdestroy"},  # zero-width space
], ids=["homoglyph-audience", "nfd-role", "zero-width-kind"])
def test_row24_non_ascii_identifiers(store: TrustStore, field: dict[str, str]) -> None:
    """Row 24: a homoglyph audience, NFD in a role name, a zero-width space in a kind are MALFORMED."""
    refused(R.MALFORMED, lambda: check(seal(encode(op(**field, challenge="1." + "0" * 64)), "alice", "bob"),
                                       store))


@pytest.mark.parametrize("delete", [["scsi2", "scsi1"], ["scsi1", "scsi1"]], ids=["unsorted", "duplicated"])
def test_row25_unsorted_or_duplicated_list(store: TrustStore, delete: list[str]) -> None:
    """Row 25: params.delete must be sorted and unique, so one op has one meaning."""
    doc = op(kind="config.disk_detach", params={"delete": delete, "force": False}, challenge="1." + "0" * 64)
    refusal = refused(R.MALFORMED, lambda: check(seal(encode(doc), "alice", "bob"), store))
    assert "payload.params.delete" in refusal.detail


@pytest.mark.parametrize("length", [63, 65])
def test_row26_truncated_or_extended_signature(store: TrustStore, length: int) -> None:
    """Row 26: a 63- or 65-byte signature is SIGNATURE_INVALID."""
    env = seal(encode(approval_op()), "carol")
    sig = env.signatures[0].sig
    bad = sig[:63] if length == 63 else sig + b"\x00"
    env = signedop.Envelope(payload_type=env.payload_type, payload=env.payload,
                            signatures=(signedop.Signature(keyid=kid("carol"), sig=bad),))
    refused(R.SIGNATURE_INVALID, lambda: check(env, store))


def _flip_trailing_bits(text: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = text.rstrip("=")
    return body[:-1] + alphabet[alphabet.index(body[-1]) | 1] + text[len(body):]


@pytest.mark.parametrize("mangle", [
    lambda s: s.replace("+", "-").replace("/", "_"),
    lambda s: s.rstrip("="),
    lambda s: s[:20] + "\n" + s[20:],
    _flip_trailing_bits,
], ids=["url-safe", "no-padding", "whitespace", "trailing-bits"])
def test_row27_non_canonical_base64(mangle: Callable[[str], str]) -> None:
    """Row 27: URL-safe alphabet, missing padding, whitespace or non-zero trailing bits in base64 are MALFORMED."""
    document = json.loads(signedop.envelope_to_json(seal(encode(op()), "alice", "bob")))
    sig = document["signatures"][0]["sig"]
    assert mangle(sig) != sig, "the test signature must exercise the mangling"
    document["signatures"][0]["sig"] = mangle(sig)
    refused(R.MALFORMED, lambda: signedop.parse_envelope_json(json.dumps(document).encode()))
    if mangle is _flip_trailing_bits:  # the lenient decoder would have accepted it as the same bytes
        assert base64.b64decode(mangle(sig)) == base64.b64decode(sig)


def test_row28_malleated_signature_s_plus_l(store: TrustStore) -> None:
    """Row 28: our valid signature with S + L (Wycheproof's malleability construction) is SIGNATURE_INVALID."""
    env = seal(encode(approval_op()), "carol")
    sig = env.signatures[0].sig
    malleated = sig[:32] + (int.from_bytes(sig[32:], "little") + L).to_bytes(32, "little")
    env = signedop.Envelope(payload_type=env.payload_type, payload=env.payload,
                            signatures=(signedop.Signature(keyid=kid("carol"), sig=malleated),))
    refused(R.SIGNATURE_INVALID, lambda: check(env, store))


def test_row30_alg_field_in_the_envelope() -> None:
    """Row 30 (envelope half): no algorithm field exists, so an "alg" is an unknown field: MALFORMED."""
    document = json.loads(signedop.envelope_to_json(seal(encode(op()), "alice", "bob")))
    document["alg"] = "none"
    refused(R.MALFORMED, lambda: signedop.parse_envelope_json(json.dumps(document).encode()))
    document.pop("alg")
    document["signatures"][0]["alg"] = "ed25519"
    refused(R.MALFORMED, lambda: signedop.parse_envelope_json(json.dumps(document).encode()))


def test_row32_one_key_twice_does_not_meet_threshold_two(store: TrustStore) -> None:
    """Row 32: two signature entries by alice count once: THRESHOLD_NOT_MET."""
    refusal = refused(R.THRESHOLD_NOT_MET, lambda: check(seal(encode(op()), "alice", "alice"), store))
    assert "needs 2" in refusal.detail


def test_row33_a_key_without_the_role_is_not_counted(store: TrustStore) -> None:
    """Row 33: alice (destroyer) + carol (operator only) verify, but only one holds destroyer: THRESHOLD_NOT_MET."""
    refused(R.THRESHOLD_NOT_MET, lambda: check(seal(encode(op()), "alice", "carol"), store))


@pytest.mark.parametrize(("revoked", "reason"), [
    ({"keys": [kid("bob")]}, R.KEY_REVOKED),
    ({"ops": ["0123456789abcdef0123456789abcdef"]}, R.OP_REVOKED),
], ids=["key", "op"])
def test_row34_revoked_key_or_op(store_at: Callable[..., TrustStore], revoked: dict[str, list[str]],
                                 reason: RefusalReason) -> None:
    """Row 34: a revoked signer is KEY_REVOKED; a revoked op_id is OP_REVOKED (the [revoked] list)."""
    store = store_at(revoked=revoked)
    refused(reason, lambda: check(seal(encode(op()), "alice", "bob"), store))


def test_row35_key_past_its_not_after(store_at: Callable[..., TrustStore]) -> None:
    """Row 35: bob's key expired at now: KEY_EXPIRED (no leeway)."""
    doc = default_doc()
    doc["keys"][1] = key_entry("bob", ["destroyer"], not_after=dt.datetime.fromtimestamp(NOW, dt.UTC))
    store = store_at(keys=doc["keys"])
    refused(R.KEY_EXPIRED, lambda: check(seal(encode(op()), "alice", "bob"), store))


@pytest.mark.parametrize("shape", ["envelope-64k", "payload-16k", "five-signatures"])
def test_row37_size_caps_before_parsing(store: TrustStore, shape: str) -> None:
    """Row 37: an envelope over 64 KiB, a payload over 16 KiB or over 4 signatures is MALFORMED, before parsing."""
    env = seal(encode(op()), "alice", "bob")
    if shape == "envelope-64k":
        data = b'{"payloadType": "' + b"x" * (64 * 1024) + b'"}'
        refused(R.MALFORMED, lambda: signedop.parse_envelope_json(data))
        return
    payload = b" " * (16 * 1024 + 1) if shape == "payload-16k" else env.payload
    signatures = env.signatures if shape == "payload-16k" else (env.signatures * 3)[:5]
    big = signedop.Envelope(payload_type=env.payload_type, payload=payload, signatures=signatures)
    refused(R.MALFORMED, lambda: check(big, store))
    refused(R.MALFORMED, lambda: signedop.parse_envelope_json(signedop.envelope_to_json(big)))


@pytest.mark.parametrize("case", ["none", "older-than-1h", "other-executor", "other-action"])
def test_row46_destructive_challenge(store: TrustStore, case: str) -> None:
    """Row 46: a DESTRUCTIVE op without a challenge, with one over 1 h old, from another executor or another action."""
    doc = op()
    issued = {
        "none": None,
        "older-than-1h": challenge.issue(SECRET, action(doc), now=NOW - 3600),
        "other-executor": challenge.issue(OTHER_SECRET, action(doc), now=NOW - 60),
        "other-action": challenge.issue(SECRET, action(op(vmid=106)), now=NOW - 60),
    }[case]
    refused(R.CHALLENGE_INVALID, lambda: check(seal(encode(op(challenge=issued)), "alice", "bob"), store))


def test_row46_no_gate_secret_means_no_destructive_op(store: TrustStore) -> None:
    """Row 46: an executor without its gate secret cannot check a challenge, so it refuses DESTRUCTIVE ops."""
    refused(R.CHALLENGE_INVALID, lambda: check(seal(encode(op()), "alice", "bob"), store, secret=None))


# --- beyond the matrix ----------------------------------------------------------------------------------


def test_unknown_kind_from_a_valid_signer(store: TrustStore) -> None:
    """An authenticated op of a kind without a params schema is UNKNOWN_KIND, never run with unchecked params."""
    refused(R.UNKNOWN_KIND, lambda: check(seal(encode(approval_op(kind="guest.explode", params={})), "carol"), store))


@pytest.mark.parametrize("reason", ["", "x" * 1025, "ok\u202eevil", "tab\there", "nul\x00"])
def test_reason_holds_no_control_or_format_characters(reason: str) -> None:
    """The reason a signer reads cannot hide text: empty, over 1024, bidi override or control characters are refused."""
    refused(R.MALFORMED, lambda: parse_payload(encode(op(reason=reason))))


def test_every_kind_the_classifier_names_has_a_params_schema() -> None:
    """Every op kind the classifier can give a step (and its flags) can be signed: no approval is unreachable."""
    named = {rule.op_kind for rule in classify.KIND_RULES.values()}
    named |= {flag.op_kind for rule in classify.KIND_RULES.values() for flag in rule.flags}
    assert named <= opschema.OP_KINDS, sorted(named - opschema.OP_KINDS)


def test_check_binding_compares_meaning_not_spelling() -> None:
    """A live action built with tuples, other key order and defaults left out binds to the signed op."""
    signed = parse_payload(encode(op(kind="config.disk_detach", params={"delete": ["scsi1", "scsi2"], "force": False})))
    live = action(op(kind="config.disk_detach", params={"delete": ("scsi2", "scsi1")}))
    signedop.check_binding(signed, live)


@given(index=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_changed_payload_byte_breaks_the_signature(static: tuple[TrustStore, signedop.Envelope], index: int,
                                                       flip: int) -> None:
    """Property: flipping any bits of any payload byte is SIGNATURE_INVALID (checked before parsing)."""
    store, env = static
    assert check(env, store).signers
    payload = bytearray(env.payload)
    payload[index % len(payload)] ^= flip
    changed = signedop.Envelope(payload_type=env.payload_type, payload=bytes(payload), signatures=env.signatures)
    refused(R.SIGNATURE_INVALID, lambda: check(changed, store))


@given(data=st.binary(max_size=200))
def test_base64_accepts_exactly_the_canonical_encoding(data: bytes) -> None:
    """Property: the standard encoding decodes to its bytes; dropping its padding is refused."""
    text = base64.b64encode(data).decode()
    assert signedop.b64decode(text, "f") == data
    if text.endswith("="):
        refused(R.MALFORMED, lambda: signedop.b64decode(text.rstrip("="), "f"))


@given(vmid=st.integers(opschema.VMID_MIN, opschema.VMID_MAX), snap=st.from_regex(opschema.SNAPNAME, fullmatch=True),
       force=st.booleans(), reason=st.text(st.characters(categories=("L", "N", "P", "Zs")), min_size=1, max_size=50))
def test_to_json_then_parse_is_identity(vmid: int, snap: str, force: bool, reason: str) -> None:
    """Property: what the signer CLI encodes parses back to the same payload."""
    payload = parse_payload(encode(op(vmid=vmid, kind="snapshot.delete", params={"snapname": snap, "force": force},
                                      reason=reason)))
    assert parse_payload(signedop.to_json(payload)) == payload
