"""The trust store: who may sign which ops, read from a root-owned TOML file (docs/SAFETY.md §6.5).

A store that does not load grants nothing: the caller has no signers and refuses every non-benign step.
Every rule a mistake or an attacker could break is checked at load, and the error names the file and
the field: ownership and mode (sshd's StrictModes), unknown fields, a duplicate key or id, an id that is
not sha256(public), a key type other than ``ed25519:``, a small-order key, a version lower than the
last one accepted (rollback, row 36). Empty lists grant nothing; ``"*"`` audience only when spelled out.
``[revoked]`` lists keys, op ids and hub documents (payload sha256s); ``[[floor_resets]]`` names, per cluster,
the hub document that replaces the floors (``replaces``, by sha256) a key or a document revoked since pushed nodes
to (docs/SAFETY.md §6.9).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from safety import opschema

MAX_FILE = 1 << 20
KEY_ID = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
OP_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
DOCUMENT_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)  # a hub document's payload sha256 (safety.desireddoc)
CLUSTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)  # as a hub document spells it
VERSION_MAX = 1 << 53  # a hub document's highest version (safety.desireddoc.VERSION_MAX)
_TTL = re.compile(r"([0-9]{1,6})([smh])", re.ASCII)
_VMIDS = re.compile(r"([0-9]{3,9})(?:-([0-9]{3,9}))?", re.ASCII)
_TTL_UNIT = {"s": 1, "m": 60, "h": 3600}
DEFAULT_THRESHOLD = 2
_P = 2**255 - 19
# libsodium's has_small_order list (docs/SAFETY.md §6.5), as y-coordinates with bit 255 (the sign of x) cleared: the
# identity (1, p+1), order 2 (p-1), order 4 (0, p), order 8 (the two below). tests/test_truststore.py
# recomputes the order-8 pair from the curve equation.
SMALL_ORDER_Y = frozenset({0, 1, _P - 1, _P, _P + 1} | {
    int.from_bytes(bytes.fromhex(h), "little") for h in (
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")})


class TrustStoreError(Exception):
    """The trust store did not load; the message names the file and the field."""


class _FieldError(Exception):
    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")


def key_id(public_raw: bytes) -> str:
    """A key's id: ``sha256:`` and the hex SHA-256 of its raw 32-byte public key."""
    return "sha256:" + hashlib.sha256(public_raw).hexdigest()


def is_small_order(public_raw: bytes) -> bool:
    """True for the 7 small-order Ed25519 encodings (either sign bit), under which OpenSSL accepts forgeries."""
    return int.from_bytes(public_raw, "little") & ((1 << 255) - 1) in SMALL_ORDER_Y


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustKey:
    """One signer's public key and what it may sign as."""

    id: str
    public: Ed25519PublicKey
    public_raw: bytes
    owner: str
    not_after: float  # epoch seconds; the key signs nothing at or after it
    roles: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Role:
    """A scope: op kinds, classes, audiences and vmid ranges, a TTL ceiling and a threshold of distinct keys."""

    name: str
    kinds: frozenset[str]
    classes: frozenset[str]
    audiences: frozenset[str]
    vmids: tuple[tuple[int, int], ...]
    max_ttl: int
    threshold: int

    def allows_audience(self, audience: str) -> bool:
        """The audience is listed, or ``"*"`` is (spelled out, never implied by an empty list)."""
        return audience in self.audiences or "*" in self.audiences

    def allows_vmid(self, vmid: int) -> bool:
        """The vmid falls in one of the role's ranges."""
        return any(low <= vmid <= high for low, high in self.vmids)


@dataclass(frozen=True, slots=True, kw_only=True)
class FloorReset:
    """A cluster's hub-document floor, reset by root: the replacement document (its version and payload sha256).

    A node whose held document no longer verifies under this store (its signer or the document revoked), and whose
    floor is one of ``replaces``, takes ``(version, sha256)`` as its floor, so the replacement, and only it or what
    follows it, can be taken (docs/SAFETY.md §6.9). It lives here because the store is root's, versioned and on
    every node: a hub alone cannot send one.
    """

    cluster: str
    version: int
    sha256: str
    # The payload sha256s of the floors it replaces: the documents a revoked key or document pushed nodes to. A node
    # holding any other floor keeps it, so a reset meant for another node's floor never lowers this one.
    replaces: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustStore:
    """A loaded, checked trust store."""

    version: int
    keys: Mapping[str, TrustKey]
    roles: Mapping[str, Role]
    revoked_keys: frozenset[str]
    revoked_ops: frozenset[str]
    revoked_documents: frozenset[str] = frozenset()  # hub documents' payload sha256s
    # By cluster: the hub documents that replace floors pushed up by a revoked key or document.
    floor_resets: Mapping[str, FloorReset] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    path: str = ""
    sha256: str = ""


def _read(path: Path, check_owner: bool) -> bytes:
    """The file's bytes, refused unless a regular file owned by root and writable by root only, in such a dir."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO planted here must not hang the load
    try:
        info = os.fstat(fd)  # the file we read, not whatever the name points to a moment later
        if not stat.S_ISREG(info.st_mode):
            raise _FieldError("file", "is not a regular file")
        if check_owner:
            _check_owner("file", info)
            _check_owner("directory", os.stat(Path(os.path.realpath(path)).parent))
        if info.st_size > MAX_FILE:
            raise _FieldError("file", f"is larger than {MAX_FILE} bytes")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise _FieldError("file", f"is larger than {MAX_FILE} bytes")
        return data
    finally:
        os.close(fd)


def _check_owner(what: str, info: os.stat_result) -> None:
    # Whoever can write the store, or replace it in its directory, can grant themselves every role.
    if info.st_uid != 0:
        raise _FieldError(what, f"must be owned by root (uid 0), is owned by uid {info.st_uid}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _FieldError(what, f"must not be writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})")


def _table(value: object, where: str, *, required: frozenset[str], optional: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _FieldError(where, "must be a table")
    unknown = sorted(set(value) - required - optional)
    if unknown:
        raise _FieldError(f"{where}.{unknown[0]}" if where else unknown[0], "is not a known field")
    missing = sorted(required - set(value))
    if missing:
        raise _FieldError(f"{where}.{missing[0]}" if where else missing[0], "is required")
    return value


def _strings(value: object, where: str, pattern: re.Pattern[str] | None = None) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _FieldError(where, "must be a list of strings")
    for i, item in enumerate(value):
        if pattern is not None and not pattern.fullmatch(item):
            raise _FieldError(f"{where}[{i}]", f"{item!r} is not valid here")
    return frozenset(value)


def _public(value: object, where: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("ed25519:"):
        raise _FieldError(where, "must be \"ed25519:<base64 of 32 bytes>\" (no other key type is accepted)")
    encoded = value.removeprefix("ed25519:")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _FieldError(where, "is not standard padded base64") from None
    if base64.b64encode(raw).decode() != encoded or len(raw) != 32:
        raise _FieldError(where, "must be the canonical base64 of exactly 32 bytes")
    if is_small_order(raw):
        raise _FieldError(where, "is a small-order Ed25519 key, under which a forged signature verifies")
    return raw


def _key(value: object, where: str, roles: Mapping[str, Role]) -> TrustKey:
    entry = _table(value, where, required=frozenset({"id", "public", "owner", "not_after"}),
                   optional=frozenset({"roles"}))
    raw = _public(entry["public"], f"{where}.public")
    if entry["id"] != key_id(raw):
        raise _FieldError(f"{where}.id", f"must equal sha256 of the public key, {key_id(raw)}")
    if not isinstance(entry["owner"], str) or not entry["owner"].strip():
        raise _FieldError(f"{where}.owner", "must be a non-empty string")
    expiry = entry["not_after"]
    if not isinstance(expiry, dt.datetime) or expiry.tzinfo is None:
        raise _FieldError(f"{where}.not_after", "must be a TOML date-time with an offset, e.g. 2027-06-30T00:00:00Z")
    held = _strings(entry.get("roles", []), f"{where}.roles")
    undefined = sorted(held - set(roles))
    if undefined:
        raise _FieldError(f"{where}.roles", f"names the undefined role {undefined[0]!r}")
    return TrustKey(id=entry["id"], public=Ed25519PublicKey.from_public_bytes(raw), public_raw=raw,
                    owner=entry["owner"], not_after=expiry.timestamp(), roles=held)


def _vmids(value: object, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list):
        raise _FieldError(where, "must be a list such as [\"100-199\", 205]")
    ranges = []
    for i, item in enumerate(value):
        text = str(item) if type(item) is int else item if isinstance(item, str) else ""
        match = _VMIDS.fullmatch(text)
        low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, -1)
        if not opschema.VMID_MIN <= low <= high <= opschema.VMID_MAX:
            raise _FieldError(f"{where}[{i}]", f"{item!r} is not a vmid or a range low-high in 100..999999999")
        ranges.append((low, high))
    return tuple(ranges)


def _ttl(value: object, where: str) -> int:
    seconds = 0
    if type(value) is int:
        seconds = value
    elif isinstance(value, str) and (match := _TTL.fullmatch(value)):
        seconds = int(match[1]) * _TTL_UNIT[match[2]]
    if not 0 < seconds <= opschema.TTL_CEILING[opschema.APPROVAL]:
        raise _FieldError(where, "must be seconds or a duration like \"15m\"/\"1h\", at most 24h")
    return seconds


def _role(value: object, where: str) -> Role:
    entry = _table(value, where, required=frozenset({"name", "max_ttl"}),
                   optional=frozenset({"kinds", "classes", "audiences", "vmids", "threshold"}))
    if not isinstance(entry["name"], str) or not opschema.ROLE.fullmatch(entry["name"]):
        raise _FieldError(f"{where}.name", "must be an ASCII role name ([a-z][a-z0-9_-]*)")
    kinds = _strings(entry.get("kinds", []), f"{where}.kinds")
    classes = _strings(entry.get("classes", []), f"{where}.classes")
    for field, values, known in (("kinds", kinds, opschema.OP_KINDS), ("classes", classes, opschema.SIGNABLE_CLASSES)):
        unknown = sorted(values - known)
        if unknown:
            raise _FieldError(f"{where}.{field}", f"{unknown[0]!r} is not one of {sorted(known)}")
    threshold = entry.get("threshold", DEFAULT_THRESHOLD)
    if type(threshold) is not int or not 1 <= threshold <= 4:  # an envelope carries at most 4 signatures
        raise _FieldError(f"{where}.threshold", "must be an integer in 1..4")
    audiences = _strings(entry.get("audiences", []), f"{where}.audiences")
    for i, audience in enumerate(sorted(audiences)):
        if audience != "*" and not opschema.AUDIENCE.fullmatch(audience):
            raise _FieldError(f"{where}.audiences[{i}]", f"{audience!r} is not node[@cluster] or \"*\"")
    return Role(name=entry["name"], kinds=kinds, classes=classes, audiences=audiences,
                vmids=_vmids(entry.get("vmids", []), f"{where}.vmids"),
                max_ttl=_ttl(entry["max_ttl"], f"{where}.max_ttl"), threshold=threshold)


def _list(doc: dict[str, Any], name: str) -> list[object]:
    value = doc.get(name, [])
    if not isinstance(value, list):
        raise _FieldError(name, f"must be an array of tables ([[{name}]])")
    return value


def _floor_reset(value: object, where: str) -> FloorReset:
    entry = _table(value, where, required=frozenset({"cluster", "version", "sha256", "replaces"}),
                   optional=frozenset())
    if not isinstance(entry["cluster"], str) or not CLUSTER.fullmatch(entry["cluster"]):
        raise _FieldError(f"{where}.cluster", "must be a cluster name as hub documents spell it")
    if type(entry["version"]) is not int or not 1 <= entry["version"] <= VERSION_MAX:
        raise _FieldError(f"{where}.version", f"must be the replacement document's version, 1..{VERSION_MAX}")
    if not isinstance(entry["sha256"], str) or not DOCUMENT_SHA256.fullmatch(entry["sha256"]):
        raise _FieldError(f"{where}.sha256", "must be the replacement document's payload sha256 (64 lowercase hex, "
                                             "as pve-hub history shows it)")
    return FloorReset(cluster=entry["cluster"], version=entry["version"], sha256=entry["sha256"],
                      replaces=_replaced(entry["replaces"], entry["sha256"], f"{where}.replaces"))


def _replaced(value: object, replacement: str, where: str) -> frozenset[str]:
    """The floors a reset replaces: a non-empty list of distinct payload sha256s, its own replacement not among them."""
    hint = ("must list the payload sha256s of the floors it replaces (the held document a revoked key or document "
            "pushed nodes to: `pve-executor whoami` prints a node's)")
    if not isinstance(value, list) or not value:
        raise _FieldError(where, hint)
    for i, item in enumerate(value):
        if not isinstance(item, str) or not DOCUMENT_SHA256.fullmatch(item):
            raise _FieldError(f"{where}[{i}]", "must be a payload sha256 (64 lowercase hex)")
        if item in value[:i]:
            raise _FieldError(f"{where}[{i}]", f"{item} is listed twice")
        if item == replacement:
            raise _FieldError(f"{where}[{i}]", "is the replacement itself: a reset replaces another floor")
    return frozenset(value)


def _floor_resets(doc: dict[str, Any]) -> Mapping[str, FloorReset]:
    resets: dict[str, FloorReset] = {}
    for i, item in enumerate(_list(doc, "floor_resets")):
        reset = _floor_reset(item, f"floor_resets[{i}]")
        if reset.cluster in resets:
            raise _FieldError(f"floor_resets[{i}].cluster", f"a second reset of cluster {reset.cluster!r}")
        resets[reset.cluster] = reset
    return MappingProxyType(resets)


def _build(doc: dict[str, Any], min_version: int) -> TrustStore:
    _table(doc, "", required=frozenset({"version"}),
           optional=frozenset({"keys", "roles", "revoked", "floor_resets"}))
    version = doc["version"]
    if type(version) is not int or version < 1:
        raise _FieldError("version", "must be a positive integer")
    if version < min_version:
        raise _FieldError("version", f"{version} is lower than {min_version}, the last version accepted (rollback)")
    roles: dict[str, Role] = {}
    for i, item in enumerate(_list(doc, "roles")):
        role = _role(item, f"roles[{i}]")
        if role.name in roles:
            raise _FieldError(f"roles[{i}].name", f"duplicate role {role.name!r}")
        roles[role.name] = role
    keys: dict[str, TrustKey] = {}
    publics: dict[bytes, int] = {}
    for i, item in enumerate(_list(doc, "keys")):
        key = _key(item, f"keys[{i}]", roles)
        if key.id in keys or key.public_raw in publics:
            raise _FieldError(f"keys[{i}]", f"the same public key as keys[{publics[key.public_raw]}]")
        keys[key.id] = key
        publics[key.public_raw] = i
    revoked = _table(doc.get("revoked", {}), "revoked", required=frozenset(),
                     optional=frozenset({"keys", "ops", "documents"}))
    return TrustStore(version=version, keys=MappingProxyType(keys), roles=MappingProxyType(roles),
                      revoked_keys=_strings(revoked.get("keys", []), "revoked.keys", KEY_ID),
                      revoked_ops=_strings(revoked.get("ops", []), "revoked.ops", OP_ID),
                      revoked_documents=_strings(revoked.get("documents", []), "revoked.documents", DOCUMENT_SHA256),
                      floor_resets=_floor_resets(doc))


def load(path: str | Path, *, min_version: int = 0, check_owner: bool = True) -> TrustStore:
    """The trust store at ``path``; raises TrustStoreError naming the file and the field at fault.

    ``min_version`` is the last version accepted (from memory or state_dir): a lower one is a rollback.
    ``check_owner=False`` is only for offline review (``op verify`` on a workstation), never for the gate.
    """
    try:
        data = _read(Path(path), check_owner)
        doc = tomllib.loads(data.decode("utf-8"))
        store = _build(doc, min_version)
    except OSError as exc:
        raise TrustStoreError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TrustStoreError(f"{path}: not UTF-8 at byte {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrustStoreError(f"{path}: not valid TOML: {exc}") from None
    except _FieldError as exc:
        raise TrustStoreError(f"{path}: {exc}") from None
    return dataclasses.replace(store, path=str(path), sha256=hashlib.sha256(data).hexdigest())


FLOOR_FILE = "trust.version"  # in the executor's state_dir: "VERSION SHA256" of the last store accepted


def read_floor(state_dir: str | Path) -> tuple[int, str | None]:
    """The last trust store the executor with ``state_dir`` accepted: (version, sha256); (0, None) if none."""
    try:
        words = (Path(state_dir) / FLOOR_FILE).read_text(encoding="utf-8").split()
        return int(words[0]), words[1] if len(words) > 1 else None
    except (OSError, ValueError, IndexError):
        return 0, None


class TrustStoreHolder:
    """The store in force: a reload that fails keeps the last good one; a first load that fails leaves none.

    The version floor only rises, so a file restored from an older backup is refused (row 36). The caller
    persists ``current.version`` and ``current.sha256`` (state_dir/trust.version) and passes them as
    ``min_version`` and ``min_sha256`` after a restart: the same version with other content is refused
    across restarts too (a revocation cannot be taken back without a new version).
    """

    def __init__(self, path: str | Path, *, min_version: int = 0, check_owner: bool = True,
                 min_sha256: str | None = None) -> None:
        self.path, self.check_owner = Path(path), check_owner
        self.min_version, self.min_sha256 = min_version, min_sha256
        self.current: TrustStore | None = None
        self.error: TrustStoreError | None = None

    def reload(self) -> TrustStoreError | None:
        """Load the file again; on failure keep the current store and return (and remember) the error."""
        floor = max(self.min_version, self.current.version if self.current else 0)
        try:
            store = load(self.path, min_version=floor, check_owner=self.check_owner)
            known = (self.current.version, self.current.sha256) if self.current is not None else (
                self.min_version, self.min_sha256)
            if store.version == known[0] and known[1] is not None and store.sha256 != known[1]:
                raise TrustStoreError(f"{self.path}: version {store.version} changed content: a changed trust store "
                                      "needs a higher version (else a revocation could be taken back unseen)")
        except TrustStoreError as exc:
            self.error = exc
            return exc
        self.current, self.error = store, None
        return None
