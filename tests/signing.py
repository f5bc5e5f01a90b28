"""Builders for signed-op tests: named keys, trust store files written for real, payloads and envelopes."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from safety import challenge, signedop
from safety.payload import action_of
from safety.truststore import key_id

NOW = 1_764_240_000  # 2025-11-27T10:40:00Z
AUDIENCE = "pve1@cluster-a"
SECRET = hashlib.sha256(b"gate secret of pve1").digest()
OTHER_SECRET = hashlib.sha256(b"gate secret of pve2").digest()
DIGEST = "3f2a" * 10
FAR = dt.datetime(2027, 6, 30, tzinfo=dt.UTC)


def private(name: str) -> Ed25519PrivateKey:
    """A deterministic test key per name, so failures reproduce."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(name.encode()).digest())


def raw_public(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key."""
    return signedop.public_raw(key.public_key())


def kid(name: str) -> str:
    """The key id of the named test key."""
    return key_id(raw_public(private(name)))


def key_entry(name: str, roles: list[str], *, not_after: dt.datetime = FAR) -> dict[str, Any]:
    """A [[keys]] entry for the named test key."""
    raw = raw_public(private(name))
    return {"id": key_id(raw), "public": "ed25519:" + base64.b64encode(raw).decode(), "owner": f"{name}@example.org",
            "not_after": not_after, "roles": roles}


def default_roles() -> list[dict[str, Any]]:
    """destroyer (DESTRUCTIVE, threshold 2, 1 h) and operator (APPROVAL, threshold 1, 4 h): docs/SAFETY.md §6.5."""
    return [
        {"name": "destroyer", "kinds": ["guest.destroy", "config.disk_detach", "config.unused_delete",
                                        "snapshot.delete"],
         "classes": ["DESTRUCTIVE"], "audiences": [AUDIENCE], "vmids": ["100-199", "205"], "max_ttl": "1h",
         "threshold": 2},
        {"name": "operator", "kinds": ["stop", "start", "config.nic_identity", "disk.resize", "snapshot.create"],
         "classes": ["APPROVAL"], "audiences": [AUDIENCE], "vmids": ["100-999"], "max_ttl": "4h", "threshold": 1},
    ]


def default_doc(**overrides: Any) -> dict[str, Any]:
    """alice (operator, destroyer), bob (destroyer), carol (operator); nothing revoked."""
    doc: dict[str, Any] = {
        "version": 4,
        "keys": [key_entry("alice", ["operator", "destroyer"]), key_entry("bob", ["destroyer"]),
                 key_entry("carol", ["operator"])],
        "roles": default_roles(),
    }
    doc.update(overrides)
    return doc


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, int | str):
        return json.dumps(value)  # a TOML basic string or integer for what these tests write
    raise TypeError(value)


def to_toml(doc: dict[str, Any]) -> str:
    """A trust store document as TOML: scalars, then [[roles]], [[keys]] (and any other array of tables, such as
    [[floor_resets]]) and [revoked] tables."""
    lines = [f"{k} = {_value(v)}" for k, v in doc.items() if not isinstance(v, list | dict)]
    arrays = [k for k, v in doc.items() if isinstance(v, list) and k not in ("roles", "keys")]
    for table in ("roles", "keys", *arrays):
        for entry in doc.get(table, []):
            lines += ["", f"[[{table}]]"] + [f"{k} = {_value(v)}" for k, v in entry.items()]
    for name, table_value in doc.items():
        if isinstance(table_value, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {_value(v)}" for k, v in table_value.items()]
    return "\n".join(lines) + "\n"


def write_store(directory: Path, doc: dict[str, Any] | str, *, name: str = "trust.toml", mode: int = 0o644) -> Path:
    """The store written as a real file (root-owned, as these tests run as root) with ``mode``."""
    path = directory / name
    path.write_text(doc if isinstance(doc, str) else to_toml(doc), encoding="utf-8")
    path.chmod(mode)
    return path


def op(**overrides: Any) -> dict[str, Any]:
    """A valid guest.destroy payload for vmid 105 on pve1@cluster-a, valid NOW-60 .. NOW+900, with a challenge."""
    doc: dict[str, Any] = {
        "v": 1, "op_id": "0123456789abcdef0123456789abcdef", "audience": AUDIENCE, "vmid": 105,
        "guest_type": "qemu", "kind": "guest.destroy", "params": {"purge": False, "destroy_unreferenced_disks": False},
        "class": "DESTRUCTIVE", "precondition": {"digest": DIGEST, "run_state": "stopped"}, "challenge": None,
        "role": "destroyer", "not_before": NOW - 60, "not_after": NOW + 900, "reason": "OPS-123 retire scratch VM",
    }
    doc.update(overrides)
    if doc["challenge"] is None and doc["class"] == "DESTRUCTIVE" and "challenge" not in overrides:
        doc["challenge"] = challenge.issue(SECRET, action(doc), now=NOW - 300)
    return doc


def action(doc: dict[str, Any]) -> dict[str, object]:
    """The action part of a payload document, as the proposer and the gate build it."""
    return action_of(audience=doc["audience"], vmid=doc["vmid"], guest_type=doc["guest_type"], kind=doc["kind"],
                     params=doc["params"], class_=doc["class"], digest=doc["precondition"]["digest"],
                     run_state=doc["precondition"]["run_state"])


def approval_op(**overrides: Any) -> dict[str, Any]:
    """A valid APPROVAL op: grow scsi0 of vmid 105 to 64 GiB, as operator, valid 4 h."""
    base: dict[str, Any] = {"kind": "disk.resize", "params": {"disk": "scsi0", "size": 64 << 30},
                            "class": "APPROVAL", "role": "operator", "not_after": NOW - 60 + 4 * 3600,
                            "challenge": None}
    return op(**{**base, **overrides})


def encode(doc: dict[str, Any]) -> bytes:
    """A payload document as signed bytes."""
    return json.dumps(doc).encode("utf-8")


def seal(payload: bytes, *signers: str, payload_type: str = signedop.PAYLOAD_TYPE) -> signedop.Envelope:
    """An envelope over ``payload`` signed by the named keys (each over PAE(payload_type, payload))."""
    signatures = tuple(signedop.Signature(keyid=kid(name), sig=private(name).sign(signedop.pae(payload_type, payload)))
                       for name in signers)
    return signedop.Envelope(payload_type=payload_type, payload=payload, signatures=signatures)
