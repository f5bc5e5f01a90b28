"""Hub documents: signed desired state, verified by the executor against its own trust store (docs/SAFETY.md §6.9).

The rejection matrix of docs/SAFETY.md §12.2: each ``test_doc_*`` is a way a hub, or whoever breaks into it,
could try to make an executor take a document the operators did not sign for it. Keys are real Ed25519, stores
real files loaded by ``safety.truststore.load``; the commands run as real subprocesses.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from safety import desireddoc, signedop
from safety.desireddoc import Held, VerifiedDocument
from safety.refusal import RefusalReason, Refused
from safety.truststore import TrustStore, load
from tests.signing import AUDIENCE, NOW, approval_op, default_roles, encode, key_entry, kid, private, seal, write_store

R = RefusalReason
ROOT = Path(__file__).resolve().parent.parent
CLUSTER = "cluster-a"  # AUDIENCE is pve1@cluster-a
DESIRED = "guests:\n  - vmid: 100\n    state: running\n    config:\n      memory: '2048'\n"
PAST = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)  # before NOW


def store_doc() -> dict[str, Any]:
    """publisher (desired.apply anywhere, threshold 1), council (desired.apply on pve1@cluster-a, threshold 2),
    elsewhere (desired.apply on another cluster's node), operator (ops only); erin's key expired, frank's revoked."""
    document_role = {"kinds": ["desired.apply"], "classes": ["APPROVAL"], "max_ttl": "1h"}
    return {
        "version": 3,
        "roles": [*default_roles(),
                  {"name": "publisher", **document_role, "audiences": ["*"], "threshold": 1},
                  {"name": "council", **document_role, "audiences": [AUDIENCE], "threshold": 2},
                  {"name": "elsewhere", **document_role, "audiences": ["pve1@cluster-b"], "threshold": 1}],
        "keys": [key_entry("alice", ["publisher", "council", "operator"]), key_entry("bob", ["council"]),
                 key_entry("carol", ["operator"]), key_entry("dave", ["elsewhere"]),
                 key_entry("erin", ["publisher"], not_after=PAST), key_entry("frank", ["publisher"])],
        "revoked": {"keys": [kid("frank")]},
    }


@pytest.fixture(name="store", scope="module")
def _store(tmp_path_factory: pytest.TempPathFactory) -> TrustStore:
    """The store of store_doc(), written as a real file and loaded as the executor loads it."""
    return load(write_store(tmp_path_factory.mktemp("trust"), store_doc()))


def payload(**overrides: Any) -> bytes:
    """Version 1 of cluster-a, signed as publisher, built by the signer's own function."""
    fields: dict[str, Any] = {"cluster": CLUSTER, "version": 1, "role": "publisher", "author": "alice@example.org",
                              "message": "OPS-7 first version", "created": NOW - 60, "previous_sha256": "",
                              "desired": DESIRED}
    fields.update(overrides)
    return desireddoc.build_payload(**fields)


def raw_payload(**overrides: Any) -> bytes:
    """A payload as plain JSON, not through build_payload (which refuses what these tests send)."""
    return json.dumps(json.loads(payload()) | overrides).encode()


def document(data: bytes, *signers: str) -> bytes:
    """The envelope bytes over ``data`` signed by the named test keys, as a hub stores and sends them."""
    return desireddoc.to_bytes(desireddoc.seal(data, *(private(name) for name in signers)))


def check(data: bytes, store: TrustStore, *, held: Held = Held(), audience: str = AUDIENCE,  # noqa: B008
          cluster: str = CLUSTER) -> VerifiedDocument:
    """verify_document as pve1@cluster-a's hub provider calls it."""
    return desireddoc.verify_document(data, store, cluster=cluster, audience=audience, held_version=held.version,
                                      held_sha256=held.sha256, now=NOW)


def refused(reason: RefusalReason, call: Callable[[], object]) -> Refused:
    """``call`` is refused with ``reason``; the refusal, for checks on its detail."""
    with pytest.raises(Refused) as caught:
        call()
    assert caught.value.reason is reason, caught.value
    return caught.value


def refused_check(reason: RefusalReason, data: bytes, store: TrustStore) -> Refused:
    """``check(data, store)`` is refused with ``reason``."""
    return refused(reason, lambda: check(data, store))


def chain(count: int) -> list[bytes]:
    """Versions 1..count of cluster-a, each naming the sha256 of the one before, signed by alice."""
    envelopes, previous = [], ""
    for version in range(1, count + 1):
        data = payload(version=version, previous_sha256=previous, message=f"version {version}")
        envelopes.append(document(data, "alice"))
        previous = hashlib.sha256(data).hexdigest()
    return envelopes


# --- what verifies --------------------------------------------------------------------------------------------


def test_a_document_signed_by_a_role_naming_desired_apply_verifies(store: TrustStore) -> None:
    """Version 1 by publisher: the document, its sha256 (of the signed payload) and the key counted."""
    data = payload()
    verified = check(document(data, "alice"), store)
    assert verified.document.desired == DESIRED and verified.document.version == 1
    assert verified.sha256 == hashlib.sha256(data).hexdigest()
    assert verified.signers == (kid("alice"),) and not verified.unchanged
    assert verified.held == Held(version=1, sha256=verified.sha256)


def test_each_version_names_the_one_it_replaces(store: TrustStore) -> None:
    """A chain: each version verifies over the one before it, held as the executor would hold it."""
    held = Held()
    for envelope in chain(4):
        held = check(envelope, store, held=held).held
    assert held.version == 4


def test_a_threshold_of_two_is_met_by_two_distinct_keys_holding_the_role(store: TrustStore) -> None:
    """council needs 2: alice and bob meet it, cosigned over the same bytes."""
    envelope = desireddoc.cosign(desireddoc.seal(payload(role="council"), private("alice")), private("bob"))
    assert check(desireddoc.to_bytes(envelope), store).signers == (kid("alice"), kid("bob"))


def test_the_version_held_sent_again_is_unchanged_not_an_error(store: TrustStore) -> None:
    """An idempotent re-send, even with one more signature, is ``unchanged``: same sha256, nothing new to apply."""
    data = payload(version=5, previous_sha256="ab" * 32)
    held = check(document(data, "alice"), store).held
    assert check(document(data, "alice"), store, held=held).unchanged
    cosigned = check(document(data, "alice", "bob"), store, held=held)
    assert cosigned.unchanged and cosigned.held == held


def test_a_skipped_version_verifies_without_the_versions_between(store: TrustStore) -> None:
    """Held 2, offered 4: the link to 3 cannot be checked and is not asked for; 4 is signed whole."""
    envelopes = chain(4)
    held = check(envelopes[1], store, held=check(envelopes[0], store).held).held
    assert check(envelopes[3], store, held=held).document.version == 4


def test_the_held_floor_round_trips_and_a_bad_one_is_an_error() -> None:
    """``Held`` is the executor's on-disk line; a line that is not one is a ValueError, never version 0."""
    held = Held(version=7, sha256="0f" * 32)
    assert Held.from_text(held.to_text()) == held
    for text in ("", "7", "0 " + "0f" * 32, "x " + "0f" * 32, "7 " + "0F" * 32, "7 abc"):
        with pytest.raises(ValueError):
            Held.from_text(text)


def test_held_values_that_cannot_be_are_a_caller_error(store: TrustStore) -> None:
    """Version 0 with a sha256, a version without one, or a negative version: ValueError (a bug, not a refusal)."""
    envelope = document(payload(), "alice")
    for held in (Held(version=0, sha256="0f" * 32), Held(version=3, sha256=""), Held(version=-1, sha256=""),
                 Held(version=3, sha256="xyz")):
        with pytest.raises(ValueError):
            check(envelope, store, held=held)


# --- the rejection matrix (docs/SAFETY.md §12.2) --------------------------------------------------------------


def test_doc_unknown_key(store: TrustStore) -> None:
    """Signed by a key the node's store does not hold: UNKNOWN_KEY."""
    refused(R.UNKNOWN_KEY, lambda: check(document(payload(), "mallory"), store))


def test_doc_signature_over_other_bytes(store: TrustStore) -> None:
    """alice's signature over one document, carried by another: SIGNATURE_INVALID."""
    signed = desireddoc.seal(payload(), private("alice"))
    other = signedop.Envelope(payload_type=signed.payload_type, payload=payload(message="OPS-8 other"),
                              signatures=signed.signatures)
    refused(R.SIGNATURE_INVALID, lambda: check(desireddoc.to_bytes(other), store))


def test_doc_an_op_envelope_never_verifies_as_a_document(store: TrustStore) -> None:
    """A valid signed op offered as a document: PAYLOAD_TYPE; an op's payload signed under the document type by
    a document role's key: MALFORMED (not a document)."""
    op_envelope = seal(encode(approval_op()), "alice")
    refused(R.PAYLOAD_TYPE, lambda: check(signedop.envelope_to_json(op_envelope), store))
    relabelled = document(encode(approval_op()), "alice")
    refused(R.MALFORMED, lambda: check(relabelled, store))


def test_doc_a_document_never_verifies_as_an_op(store: TrustStore) -> None:
    """A document offered as an op: PAYLOAD_TYPE; its type swapped for an op's: the signature no longer verifies;
    a document's payload signed under the op type: MALFORMED; an op of kind desired.apply: UNKNOWN_KIND."""
    signed = desireddoc.seal(payload(), private("alice"))
    verify: Callable[[signedop.Envelope], object] = lambda env: signedop.verify(  # noqa: E731
        env, store, now=NOW, audience=AUDIENCE, challenge_key=None)
    refused(R.PAYLOAD_TYPE, lambda: verify(signed))
    swapped = signedop.Envelope(payload_type=signedop.PAYLOAD_TYPE, payload=signed.payload,
                                signatures=signed.signatures)
    refused(R.SIGNATURE_INVALID, lambda: verify(swapped))
    refused(R.MALFORMED, lambda: verify(seal(payload(), "alice")))
    op_kind = approval_op(kind="desired.apply", params={}, role="publisher")
    refused(R.UNKNOWN_KIND, lambda: verify(seal(encode(op_kind), "alice")))


def test_doc_the_type_swapped_for_an_ops_is_refused_as_a_document(store: TrustStore) -> None:
    """A document envelope relabelled with the op type is not a document: PAYLOAD_TYPE before any signature."""
    signed = desireddoc.seal(payload(), private("alice"))
    swapped = signedop.Envelope(payload_type=signedop.PAYLOAD_TYPE, payload=signed.payload,
                                signatures=signed.signatures)
    refused(R.PAYLOAD_TYPE, lambda: check(signedop.envelope_to_json(swapped), store))


def test_doc_version_lower_than_held(store: TrustStore) -> None:
    """Held 3, offered 2 (validly signed, a real earlier version): ROLLBACK, both versions named."""
    envelopes = chain(3)
    held = Held()
    for envelope in envelopes:
        held = check(envelope, store, held=held).held
    error = refused(R.ROLLBACK, lambda: check(envelopes[1], store, held=held))
    assert "version 2" in error.detail and "version 3" in error.detail


def test_doc_same_version_other_content(store: TrustStore) -> None:
    """Held version 1; another validly signed version 1: FORK (two documents under one version)."""
    held = check(document(payload(), "alice"), store).held
    refused(R.FORK, lambda: check(document(payload(message="OPS-9 the other v1"), "alice"), store, held=held))


def test_doc_next_version_naming_another_predecessor(store: TrustStore) -> None:
    """Held version 1; a version 2 that replaces some other document: FORK."""
    held = check(document(payload(), "alice"), store).held
    fork = payload(version=2, previous_sha256="ab" * 32)
    error = refused(R.FORK, lambda: check(document(fork, "alice"), store, held=held))
    assert held.sha256 in error.detail


def test_doc_another_cluster(store: TrustStore) -> None:
    """A document for cluster-b offered to pve1@cluster-a: WRONG_AUDIENCE (the publisher role allows "*")."""
    refused(R.WRONG_AUDIENCE, lambda: check(document(payload(cluster="cluster-b"), "alice"), store))


def test_doc_a_role_for_another_clusters_audience(store: TrustStore) -> None:
    """Signed as elsewhere, a role naming desired.apply for pve1@cluster-b only: ROLE_DENIES on pve1@cluster-a."""
    error = refused(R.ROLE_DENIES, lambda: check(document(payload(role="elsewhere"), "dave"), store))
    assert AUDIENCE in error.detail


def test_doc_a_role_without_desired_apply(store: TrustStore) -> None:
    """Signed as operator (ops only) or as a role the store does not have: ROLE_DENIES."""
    error = refused(R.ROLE_DENIES, lambda: check(document(payload(role="operator"), "carol"), store))
    assert "desired.apply" in error.detail
    refused(R.ROLE_DENIES, lambda: check(document(payload(role="nobody"), "alice"), store))


def test_doc_threshold_not_met(store: TrustStore) -> None:
    """council needs 2 distinct keys: alice signing twice, or alice and carol (who lacks the role), do not meet it."""
    data = payload(role="council")
    signature = signedop.sign(data, private("alice"), desireddoc.PAYLOAD_TYPE)
    twice = signedop.Envelope(payload_type=desireddoc.PAYLOAD_TYPE, payload=data, signatures=(signature, signature))
    refused(R.THRESHOLD_NOT_MET, lambda: check(desireddoc.to_bytes(twice), store))
    refused(R.THRESHOLD_NOT_MET, lambda: check(document(data, "alice", "carol"), store))
    with pytest.raises(ValueError, match="already signed"):
        desireddoc.cosign(desireddoc.seal(data, private("alice")), private("alice"))


def test_doc_expired_or_revoked_key(store: TrustStore) -> None:
    """erin's key expired before the executor's clock: KEY_EXPIRED; frank's is revoked: KEY_REVOKED."""
    refused(R.KEY_EXPIRED, lambda: check(document(payload(), "erin"), store))
    refused(R.KEY_REVOKED, lambda: check(document(payload(), "frank"), store))


def test_doc_revoked_in_the_trust_store(store: TrustStore, tmp_path: Path) -> None:
    """A document whose payload sha256 is in ``[revoked].documents``: DOCUMENT_REVOKED, validly signed as it is, held
    or not; checked after the signature (the same payload under a forged signature says SIGNATURE_INVALID)."""
    envelope = document(payload(), "alice")
    sha256 = desireddoc.payload_sha256(desireddoc.parse_envelope(envelope))
    doc = store_doc() | {"version": 4, "revoked": {"keys": [kid("frank")], "documents": [sha256]}}
    revoking = load(write_store(tmp_path, doc))
    assert check(envelope, store).sha256 == sha256  # valid before
    error = refused(R.DOCUMENT_REVOKED, lambda: check(envelope, revoking))
    assert sha256 in error.detail and "v4" in error.detail
    refused(R.DOCUMENT_REVOKED, lambda: check(envelope, revoking, held=Held(version=1, sha256=sha256)))
    other = desireddoc.seal(payload(message="OPS-8 other"), private("alice"))
    forged = signedop.Envelope(payload_type=other.payload_type, payload=payload(), signatures=other.signatures)
    refused(R.SIGNATURE_INVALID, lambda: check(desireddoc.to_bytes(forged), revoking))


def test_doc_a_version_jump_past_the_bound(store: TrustStore) -> None:
    """A version more than MAX_VERSION_JUMP above the one held (0 included): VERSION_JUMP, naming both; exactly the
    bound is a skip like any other. One threshold of signers can no longer sign the last version at once."""
    bound = desireddoc.MAX_VERSION_JUMP
    skip = "0" * 64  # a version after 1 names a predecessor; one not held here is a skip
    first = check(document(payload(version=bound, previous_sha256=skip), "alice"), store).held
    assert first.version == bound
    error = refused(R.VERSION_JUMP, lambda: check(document(payload(version=bound + 1, previous_sha256=skip),
                                                           "alice"), store))
    assert f"version {bound + 1}" in error.detail and "version 0" in error.detail
    later = payload(version=2 * bound, previous_sha256=skip)
    assert check(document(later, "alice"), store, held=first).held.version == 2 * bound
    last = payload(version=desireddoc.VERSION_MAX, previous_sha256=skip)
    refused(R.VERSION_JUMP, lambda: check(document(last, "alice"), store, held=first))


def test_doc_trailing_data_or_duplicate_keys(store: TrustStore) -> None:
    """Validly signed payloads with trailing data or a duplicate key (``"version":1,"version":9``): MALFORMED; so is
    an envelope with a byte after it, or re-spelled (other indentation): one document, one spelling."""
    refused(R.MALFORMED, lambda: check(document(payload() + b" {}", "alice"), store))
    duplicate = payload().replace(b'"version":1', b'"version":1,"version":9')
    refused(R.MALFORMED, lambda: check(document(duplicate, "alice"), store))
    envelope = document(payload(), "alice")
    refused(R.MALFORMED, lambda: check(envelope + b"\n", store))
    respelled = json.dumps(json.loads(envelope), sort_keys=True).encode() + b"\n"
    refused(R.MALFORMED, lambda: check(respelled, store))


def test_doc_desired_text_over_the_size_limit(store: TrustStore) -> None:
    """A desired text one byte over MAX_DESIRED: the signer refuses to build it, the executor refuses it signed,
    and an envelope over the cap is refused before it is parsed."""
    big = "#" * desireddoc.MAX_DESIRED + "\n"
    with pytest.raises(Refused, match=r"document\.desired"):
        payload(desired=big)
    refused(R.MALFORMED, lambda: check(document(raw_payload(desired=big), "alice"), store))
    error = refused(R.MALFORMED, lambda: check(b" " * (desireddoc.MAX_ENVELOPE + 1), store))
    assert "larger than" in error.detail


def test_doc_fields_unknown_missing_or_inconsistent(store: TrustStore) -> None:
    """An unknown or missing field, version 1 naming a predecessor, version 2 naming none, a float version, a bidi
    override in the text or the message: MALFORMED, naming the field."""
    fields = json.loads(payload())
    cases = [raw_payload(extra=1), json.dumps({k: v for k, v in fields.items() if k != "author"}).encode(),
             raw_payload(previous_sha256="ab" * 32), raw_payload(version=2),
             payload().replace(b'"version":1', b'"version":1.0'),
             raw_payload(desired="guests: []  # \u202e"), raw_payload(message="ok\u202eevil")]
    details = [refused_check(R.MALFORMED, document(data, "alice"), store).detail for data in cases]
    assert details[0].startswith("document.extra") and details[1].startswith("document.author")
    assert "line 1" in details[5]


# JSON's whitespace and structure, where a change might keep the meaning; any byte value besides.
BYTES = st.sampled_from(b' \t\n\r{}[],:"\\0aA=+/') | st.integers(0, 255)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_doc_any_single_byte_change_is_refused(store: TrustStore, data: st.DataObject) -> None:
    """Change any one byte of a valid document envelope to any other value: refused, whatever the byte."""
    envelope = bytearray(VALID)
    index = data.draw(st.integers(0, len(envelope) - 1), label="index")
    value = data.draw(BYTES.filter(lambda b: b != envelope[index]), label="value")
    envelope[index] = value
    with pytest.raises(Refused):
        check(bytes(envelope), store)


def test_doc_whitespace_changed_anywhere_is_refused(store: TrustStore) -> None:
    """Every whitespace byte of a valid envelope, replaced by each other JSON whitespace (which keeps its meaning as
    JSON): refused, so a hub cannot hand two nodes two spellings of one document."""
    changed = 0
    for index, byte in enumerate(VALID):
        for other in b" \t\n\r":
            if byte in b" \t\n\r" and other != byte:
                refused_check(R.MALFORMED, VALID[:index] + bytes([other]) + VALID[index + 1:], store)
                changed += 1
    assert changed > 30


VALID = document(payload(version=2, previous_sha256="ab" * 32, role="council"), "alice", "bob")


# --- the commands -------------------------------------------------------------------------------------------


def _key_file(directory: Path, name: str) -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(private(name).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    path.chmod(0o600)
    return path


def _run(*args: str, prog: str = "executor", stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", prog, *args], cwd=ROOT, capture_output=True, text=True,
                          input=stdin, timeout=60, check=False)


def test_desired_sign_cosign_and_verify_on_the_command_line(tmp_path: Path) -> None:
    """``pve-executor desired sign`` checks the file and writes a document; ``cosign`` adds bob; ``verify`` exits 0
    for pve1@cluster-a and prints the sha256 the next version names; a rollback against the held version exits 2."""
    desired = tmp_path / "desired.yaml"
    desired.write_text(DESIRED, encoding="utf-8")
    trust = write_store(tmp_path, store_doc())
    envelope = tmp_path / "v1.json"
    signed = _run("desired", "sign", str(desired), "--cluster", CLUSTER, "--version", "1", "--role", "council",
                  "--key", str(_key_file(tmp_path, "alice")), "--message", "OPS-7 first", "--out", str(envelope))
    assert signed.returncode == 0, signed.stderr
    assert "(1 guests)" in signed.stderr
    cosigned = _run("desired", "cosign", str(envelope), "--key", str(_key_file(tmp_path, "bob")))
    assert cosigned.returncode == 0, cosigned.stderr
    verify = ["desired", "verify", str(envelope), "--trust", str(trust), "--audience", AUDIENCE]
    verified = _run(*verify)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    sha256 = hashlib.sha256(desireddoc.parse_envelope(envelope.read_bytes()).payload).hexdigest()
    assert f"version 1, 1 guests, sha256 {sha256}" in verified.stdout
    again = _run(*verify, "--held-version", "1", "--held-sha256", sha256)
    assert again.returncode == 0 and "nothing new" in again.stdout
    rollback = _run(*verify, "--held-version", "2", "--held-sha256", "ab" * 32)
    assert rollback.returncode == 2 and rollback.stdout.startswith("REFUSED ROLLBACK: ")


def test_desired_sign_refuses_a_file_the_executor_would_refuse(tmp_path: Path) -> None:
    """A desired file the executor's loader refuses is not signed: exit 2, file and line named, nothing written."""
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: runing\n", encoding="utf-8")
    out = tmp_path / "v1.json"
    result = _run("desired", "sign", str(desired), "--cluster", CLUSTER, "--version", "1", "--role", "publisher",
                  "--key", str(_key_file(tmp_path, "alice")), "--message", "typo", "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert f"{desired}:3" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    no_previous = _run("desired", "sign", "-", "--cluster", CLUSTER, "--version", "2", "--role", "publisher",
                       "--key", str(_key_file(tmp_path, "bob")), "--message", "m", stdin=DESIRED)
    assert no_previous.returncode == 2 and "--previous-sha256: must be" in no_previous.stderr, no_previous.stderr
