"""The trust store: what it refuses at load, and why (docs/SAFETY.md §6.5, §12 rows 29-31 and 36).

Every store here is a real file on disk, written by the test and loaded the way the gate loads it
(these tests run as root, so files start root-owned; ownership and modes are changed with chown/chmod).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from safety import signedop
from safety.refusal import RefusalReason, Refused
from safety.truststore import SMALL_ORDER_Y, TrustStoreError, TrustStoreHolder, is_small_order, key_id, load
from tests.signing import (
    AUDIENCE,
    NOW,
    SECRET,
    default_doc,
    encode,
    key_entry,
    kid,
    op,
    private,
    raw_public,
    seal,
    write_store,
)

ROOT = Path(__file__).resolve().parent.parent
P = 2**255 - 19
D = -121665 * pow(121666, -1, P) % P  # edwards25519: -x^2 + y^2 = 1 + d x^2 y^2
BASE_POINT = bytes.fromhex("5866666666666666666666666666666666666666666666666666666666666666")


def _sqrt(value: int) -> int | None:
    """A square root mod p (p = 5 mod 8), or None."""
    root = pow(value, (P + 3) // 8, P)
    if root * root % P != value % P:
        root = root * pow(2, (P - 1) // 4, P) % P
    return root if root * root % P == value % P else None


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """Affine twisted Edwards addition (a = -1); complete for this curve."""
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P)


def _point(encoded: bytes) -> tuple[int, int]:
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    x = _sqrt((y * y - 1) * pow(D * y * y + 1, -1, P))
    assert x is not None, "not on the curve"
    return x, y % P


def _times8(point: tuple[int, int]) -> tuple[int, int]:
    for _ in range(3):
        point = _add(point, point)
    return point


@pytest.fixture(name="write")
def _write(tmp_path: Path) -> Callable[..., Path]:
    """Writes a store document (default_doc() with overrides, or ``doc``) into tmp_path; returns its path."""
    def make(doc: dict[str, Any] | str | None = None, **overrides: Any) -> Path:
        return write_store(tmp_path, doc if doc is not None else default_doc(**overrides))
    return make


def refused_at_load(path: Path, *fragments: str, **options: Any) -> TrustStoreError:
    """load() refuses ``path``; the message names the file and each fragment."""
    with pytest.raises(TrustStoreError) as caught:
        load(path, **options)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


def test_the_default_store_loads_with_what_it_says(write: Callable[..., Path]) -> None:
    """A good store loads: keys by id with their roles, roles with their scope, version and file hash."""
    store = load(write())
    assert store.version == 4 and set(store.keys) == {kid("alice"), kid("bob"), kid("carol")}
    assert store.keys[kid("alice")].roles == {"operator", "destroyer"}
    destroyer = store.roles["destroyer"]
    assert destroyer.threshold == 2 and destroyer.max_ttl == 3600 and destroyer.vmids == ((100, 199), (205, 205))
    assert destroyer.allows_vmid(205) and not destroyer.allows_vmid(200)
    assert len(store.sha256) == 64 and store.path.endswith("trust.toml")


def test_key_id_is_sha256_of_the_raw_public_key() -> None:
    """key_id is "sha256:" + hex SHA-256 of the 32 raw bytes (what [[keys]].id must equal)."""
    raw = raw_public(private("alice"))
    assert key_id(raw) == "sha256:" + hashlib.sha256(raw).hexdigest()


# --- row 29: small-order keys ----------------------------------------------------------------------------


def test_small_order_list_is_exactly_the_curves_small_order_points() -> None:
    """The 7 y-values are all points of order dividing 8, and the order-8 pair solves d y^4 + 2 y^2 - 1 = 0."""
    for y in SMALL_ORDER_Y:
        assert _times8(_point(y.to_bytes(32, "little"))) == (0, 1), y
    # 8P = O for order 8 means 2P has order 4, i.e. y(2P) = 0: (y^2 + x^2) = 0 with the curve equation.
    order8 = set()
    for sign in (1, -1):
        y2 = (-1 + sign * _sqrt(1 + D)) * pow(D, -1, P) % P  # type: ignore[operator]
        root = _sqrt(y2)
        if root is not None:
            order8 |= {root, P - root}
    assert order8 == SMALL_ORDER_Y - {0, 1, P - 1, P, P + 1}
    assert not is_small_order(raw_public(private("alice"))) and not is_small_order(BASE_POINT)


def test_row29_small_order_forgery_verifies_under_openssl_so_the_store_refuses_the_key(
        write: Callable[..., Path]) -> None:
    """Row 29: under key 01 00..00 OpenSSL accepts R=B, S=1 for any message; a store holding it never loads."""
    weak = bytes.fromhex("01" + "00" * 31)
    forgery = BASE_POINT + (1).to_bytes(32, "little")
    for message in (b"any message", signedop.pae(signedop.PAYLOAD_TYPE, encode(op()))):
        Ed25519PublicKey.from_public_bytes(weak).verify(forgery, message)  # no exception: docs/SAFETY.md §6.5
    entry = {"id": key_id(weak), "public": "ed25519:" + base64.b64encode(weak).decode(), "owner": "mallory",
             "not_after": default_doc()["keys"][0]["not_after"], "roles": ["destroyer"]}
    doc = default_doc()
    doc["keys"].append(entry)
    refused_at_load(write(doc), "keys[3].public", "small-order")


@pytest.mark.parametrize("y", sorted(SMALL_ORDER_Y))
@pytest.mark.parametrize("sign_bit", [0, 1])
def test_row29_every_small_order_encoding_is_refused(write: Callable[..., Path], y: int, sign_bit: int) -> None:
    """Row 29: each of the 7 encodings, with either sign bit, is refused (compared with bit 255 cleared)."""
    raw = (y | sign_bit << 255).to_bytes(32, "little")
    doc = default_doc()
    doc["keys"][0].update(id=key_id(raw), public="ed25519:" + base64.b64encode(raw).decode())
    refused_at_load(write(doc), "keys[0].public", "small-order")


# --- rows 30, 31: key types, duplicates, ids --------------------------------------------------------------


@pytest.mark.parametrize("public", ["rsa:MIIBCgKCAQEA", "hmac:c2VjcmV0", "ED25519:AAAA", "x25519:AAAA"])
def test_row30_other_key_types_are_refused(write: Callable[..., Path], public: str) -> None:
    """Row 30 (store half): a key entry that is not "ed25519:" refuses the whole store; no alg exists to confuse."""
    doc = default_doc()
    doc["keys"][1]["public"] = public
    refused_at_load(write(doc), "keys[1].public", "ed25519:")


def test_row31_two_entries_with_the_same_public_key(write: Callable[..., Path]) -> None:
    """Row 31: the same public key twice (say under two owners) refuses the store: no signers."""
    doc = default_doc()
    twin = copy.deepcopy(doc["keys"][0])
    twin["owner"] = "alice-laptop@example.org"
    doc["keys"].append(twin)
    refused_at_load(write(doc), "keys[3]", "the same public key as keys[0]")


def test_row31_id_not_sha256_of_public(write: Callable[..., Path]) -> None:
    """Row 31: an id that is not sha256(public) (here bob's id on alice's key) refuses the store."""
    doc = default_doc()
    doc["keys"][0]["id"] = kid("bob")
    refused_at_load(write(doc), "keys[0].id", "must equal sha256")


# --- row 36: rollback; a failed reload keeps the last good store ------------------------------------------


def test_row36_rollback_to_an_older_version(write: Callable[..., Path]) -> None:
    """Row 36: a store restored from an older backup is refused; the last good store stays; none after a restart."""
    path = write(version=5)
    holder = TrustStoreHolder(path)
    assert holder.reload() is None and holder.current is not None and holder.current.version == 5
    write(version=4)
    error = holder.reload()
    assert error is not None and "rollback" in str(error)
    assert holder.current is not None and holder.current.version == 5
    restarted = TrustStoreHolder(path, min_version=5)  # the daemon persisted the last version accepted
    assert restarted.reload() is not None and restarted.current is None
    refused_at_load(path, "version", "lower than 5", min_version=5)


def test_a_changed_store_needs_a_higher_version(write: Callable[..., Path]) -> None:
    """A revocation added under version 5 cannot be taken back by editing the file under the same version:
    a store whose content changed but whose version did not is refused, and the last good store stays."""
    path = write(version=5, revoked={"keys": [kid("bob")]})
    holder = TrustStoreHolder(path)
    assert holder.reload() is None and holder.current is not None
    write(version=5)
    assert "needs a higher version" in str(holder.reload())
    assert holder.current is not None and kid("bob") in holder.current.revoked_keys
    write(version=6)
    assert holder.reload() is None and holder.current is not None and holder.current.version == 6
    accepted = holder.current.sha256
    write(version=6, revoked={"keys": [kid("bob")]})  # edited again, same version, then a restart
    restarted = TrustStoreHolder(path, min_version=6, min_sha256=accepted)  # what trust.version keeps
    assert "needs a higher version" in str(restarted.reload()) and restarted.current is None


def test_a_broken_reload_keeps_the_last_good_store(write: Callable[..., Path]) -> None:
    """An edit that breaks the file (a syntax error) leaves the store in force as it was, and reports why."""
    path = write()
    holder = TrustStoreHolder(path)
    holder.reload()
    good = holder.current
    path.write_text("version = 4\n[[keys]\n", encoding="utf-8")
    assert "not valid TOML" in str(holder.reload())
    assert holder.current is good and holder.error is not None


def test_a_start_with_a_bad_file_has_no_store(tmp_path: Path) -> None:
    """A missing or bad file at start means no store (no signers), with the error kept for GetStatus."""
    holder = TrustStoreHolder(tmp_path / "absent.toml")
    assert "cannot read" in str(holder.reload()) and holder.current is None


# --- ownership and mode (sshd StrictModes) ----------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_store_writable_by_group_or_others_is_refused(write: Callable[..., Path], mode: int) -> None:
    """A store group- or world-writable is refused: whoever can write it can grant themselves every role."""
    path = write()
    path.chmod(mode)
    refused_at_load(path, "file", "writable by group or others", f"{mode:04o}")


def test_store_not_owned_by_root_is_refused(write: Callable[..., Path]) -> None:
    """A store owned by another user (even read-only) is refused."""
    path = write()
    os.chown(path, 1000, 1000)
    path.chmod(0o444)
    refused_at_load(path, "file", "owned by root", "uid 1000")


def test_store_in_a_group_writable_directory_is_refused(write: Callable[..., Path]) -> None:
    """A directory others can write lets them replace the file: refused as well."""
    path = write()
    path.parent.chmod(0o775)
    try:
        refused_at_load(path, "directory", "writable by group or others")
    finally:
        path.parent.chmod(0o700)


def test_offline_review_may_skip_ownership_but_nothing_else(write: Callable[..., Path]) -> None:
    """check_owner=False (op verify on a workstation) skips ownership only: a bad key is still refused."""
    path = write()
    path.chmod(0o666)
    assert load(path, check_owner=False).version == 4
    doc = default_doc()
    doc["keys"][0]["id"] = kid("bob")
    path.write_text(write(doc).read_text())
    refused_at_load(path, "keys[0].id", check_owner=False)


# --- scope: empty grants nothing, "*" only when spelled out -----------------------------------------------


@pytest.mark.parametrize("field", ["kinds", "classes", "audiences", "vmids"])
def test_an_empty_scope_list_grants_nothing(tmp_path: Path, field: str) -> None:
    """An empty kinds, classes, audiences or vmids list (or a missing one) denies every op: ROLE_DENIES."""
    doc = default_doc()
    doc["roles"][0][field] = []
    store = load(write_store(tmp_path, doc))
    with pytest.raises(Refused) as caught:
        signedop.verify(_destroy_envelope(), store, now=NOW, audience=AUDIENCE, challenge_key=SECRET)
    assert caught.value.reason is RefusalReason.ROLE_DENIES
    del doc["roles"][0][field]
    store = load(write_store(tmp_path, doc))
    with pytest.raises(Refused) as missing:
        signedop.verify(_destroy_envelope(), store, now=NOW, audience=AUDIENCE, challenge_key=SECRET)
    assert missing.value.reason is RefusalReason.ROLE_DENIES


def test_star_audience_only_when_spelled_out(tmp_path: Path) -> None:
    """audiences = ["*"] allows any node; the op itself must still name one (a "*" audience is MALFORMED)."""
    doc = default_doc()
    doc["roles"][0]["audiences"] = ["*"]
    store = load(write_store(tmp_path, doc))
    assert signedop.verify(_destroy_envelope(), store, now=NOW, audience=AUDIENCE, challenge_key=SECRET).signers
    with pytest.raises(Refused) as caught:
        signedop.verify(_destroy_envelope(audience="*"), store, now=NOW, audience="*", challenge_key=SECRET)
    assert caught.value.reason is RefusalReason.MALFORMED


def _destroy_envelope(**overrides: Any) -> signedop.Envelope:
    return seal(encode(op(**overrides)), "alice", "bob")


# --- every other field rule names the field ---------------------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        target = doc
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    return apply


def _drop(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        target = doc
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
    return apply


@pytest.mark.parametrize(("mutate", "fragments"), [
    (_drop(("version",)), ("version", "required")),
    (_set(("version",), 0), ("version", "positive")),
    (_set(("version",), "4"), ("version", "positive")),
    (_set(("unexpected",), 1), ("unexpected", "not a known field")),
    (_set(("keys", 0, "alg"), "ed25519"), ("keys[0].alg", "not a known field")),
    (_drop(("keys", 0, "not_after")), ("keys[0].not_after", "required")),
    (_set(("keys", 0, "not_after"), "2027-06-30"), ("keys[0].not_after", "offset")),
    (_set(("keys", 0, "owner"), " "), ("keys[0].owner",)),
    (_set(("keys", 0, "roles"), ["destroyer", "admin"]), ("keys[0].roles", "undefined role 'admin'")),
    (_set(("keys", 0, "public"), "ed25519:" + base64.b64encode(b"\x01" * 31).decode()), ("keys[0].public", "32")),
    (_set(("keys", 0, "public"), "ed25519:" + base64.urlsafe_b64encode(b"\xfb" * 32).decode()),
     ("keys[0].public", "base64")),
    (_set(("roles", 1, "name"), "destroyer"), ("roles[1].name", "duplicate role")),
    (_set(("roles", 0, "name"), "Destroyer"), ("roles[0].name",)),
    (_set(("roles", 0, "kinds"), ["guest.destory"]), ("roles[0].kinds", "guest.destory")),
    (_set(("roles", 0, "classes"), ["BENIGN"]), ("roles[0].classes", "BENIGN")),
    (_set(("roles", 0, "audiences"), ["pve1@cluster-a", "\u0440ve1"]), ("roles[0].audiences",)),
    (_set(("roles", 0, "vmids"), ["199-100"]), ("roles[0].vmids[0]",)),
    (_set(("roles", 0, "vmids"), ["99"]), ("roles[0].vmids[0]",)),
    (_set(("roles", 0, "max_ttl"), "25h"), ("roles[0].max_ttl", "24h")),
    (_set(("roles", 0, "max_ttl"), "1 hour"), ("roles[0].max_ttl",)),
    (_drop(("roles", 0, "max_ttl")), ("roles[0].max_ttl", "required")),
    (_set(("roles", 0, "threshold"), 0), ("roles[0].threshold",)),
    (_set(("roles", 0, "threshold"), 5), ("roles[0].threshold",)),
    (_set(("revoked",), {"keys": ["alice"]}), ("revoked.keys[0]",)),
    (_set(("revoked",), {"ops": ["xyz"]}), ("revoked.ops[0]",)),
    (_set(("revoked",), {"nonces": []}), ("revoked.nonces", "not a known field")),
    (_set(("revoked",), {"documents": ["AB" * 32]}), ("revoked.documents[0]",)),
    (_set(("floor_resets",), [{"cluster": "cluster-a", "version": 2, "replaces": ["ef" * 32]}]),
     ("floor_resets[0].sha256", "required")),
    (_set(("floor_resets",), [{"cluster": "cluster-a", "version": 0, "sha256": "ab" * 32, "replaces": ["ef" * 32]}]),
     ("floor_resets[0].version",)),
    (_set(("floor_resets",), [{"cluster": "cluster-a", "version": 2, "sha256": "ab" * 31, "replaces": ["ef" * 32]}]),
     ("floor_resets[0].sha256",)),
    (_set(("floor_resets",), [{"cluster": "a b", "version": 2, "sha256": "ab" * 32, "replaces": ["ef" * 32]}]),
     ("floor_resets[0].cluster",)),
    (_set(("floor_resets",), [{"cluster": "c", "version": 2, "sha256": "ab" * 32, "replaces": ["ef" * 32]},
                              {"cluster": "c", "version": 3, "sha256": "cd" * 32, "replaces": ["ef" * 32]}]),
     ("floor_resets[1].cluster", "second reset")),
    # A reset names the floors it replaces: one for every floor would lower a node that took nothing under it.
    (_set(("floor_resets",), [{"cluster": "c", "version": 2, "sha256": "ab" * 32}]),
     ("floor_resets[0].replaces", "required")),
    (_set(("floor_resets",), [{"cluster": "c", "version": 2, "sha256": "ab" * 32, "replaces": []}]),
     ("floor_resets[0].replaces", "pve-executor whoami")),
    (_set(("floor_resets",), [{"cluster": "c", "version": 2, "sha256": "ab" * 32, "replaces": "ef" * 32}]),
     ("floor_resets[0].replaces",)),
    (_set(("floor_resets",), [{"cluster": "c", "version": 2, "sha256": "ab" * 32, "replaces": ["EF" * 32]}]),
     ("floor_resets[0].replaces[0]", "64 lowercase hex")),
    (_set(("floor_resets",), [{"cluster": "c", "version": 2, "sha256": "ab" * 32, "replaces": ["ef" * 32, "ef" * 32]}]),
     ("floor_resets[0].replaces[1]", "twice")),
    (_set(("floor_resets",), [{"cluster": "c", "version": 2, "sha256": "ab" * 32, "replaces": ["ab" * 32]}]),
     ("floor_resets[0].replaces[0]", "the replacement itself")),
], ids=lambda v: v[0] if isinstance(v, tuple) else None)
def test_a_bad_field_refuses_the_store_and_is_named(write: Callable[..., Path],
                                                    mutate: Callable[[dict[str, Any]], None],
                                                    fragments: tuple[str, ...]) -> None:
    """Each field rule refuses the whole store with a message naming the file and the field."""
    doc = default_doc()
    mutate(doc)
    refused_at_load(write(doc), *fragments)


def test_defaults_threshold_two_and_roles_none(write: Callable[..., Path]) -> None:
    """A role without threshold needs 2 distinct keys; a key without roles holds none."""
    doc = default_doc()
    del doc["roles"][1]["threshold"]
    doc["keys"].append(key_entry("dave", []))
    del doc["keys"][3]["roles"]
    store = load(write(doc))
    assert store.roles["operator"].threshold == 2 and store.keys[kid("dave")].roles == frozenset()


def test_a_fifo_at_the_path_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Something other than a regular file (a FIFO no one writes) is refused at once instead of hanging the gate."""
    path = tmp_path / "trust.toml"
    os.mkfifo(path)
    refused_at_load(path, "file", "not a regular file")


def test_revoked_documents_and_floor_resets_load_and_trust_check_lists_them(write: Callable[..., Path]) -> None:
    """[revoked].documents (hub documents' payload sha256s) and [[floor_resets]] (per cluster, the replacement's
    version and sha256) load; `trust check` lists both, and warns that a reset left in place applies again."""
    doc = default_doc()
    doc["revoked"] = {"keys": [], "documents": ["ab" * 32]}
    doc["floor_resets"] = [{"cluster": "cluster-a", "version": 7, "sha256": "cd" * 32, "replaces": ["ef" * 32]}]
    path = write(doc)
    store = load(path)
    assert store.revoked_documents == frozenset({"ab" * 32})
    reset = store.floor_resets["cluster-a"]
    assert (reset.cluster, reset.version, reset.sha256, reset.replaces) == ("cluster-a", 7, "cd" * 32,
                                                                            frozenset({"ef" * 32}))
    assert load(write(default_doc())).floor_resets == {}
    path = write(doc)
    done = subprocess.run([sys.executable, "-m", "executor", "trust", "check", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert f"revoked hub document sha256 {'ab' * 32}" in done.stdout
    assert f"floor reset of cluster cluster-a: a node whose held hub document no longer verifies and whose floor is " \
           f"sha256 {'ef' * 32} takes version 7, sha256 {'cd' * 32}, as its floor" in done.stdout
    assert "warning: floor reset of cluster cluster-a (version 7): remove it" in done.stderr
