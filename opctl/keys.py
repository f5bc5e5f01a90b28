"""Signing keys and the trust store, for operators: ``keys generate``, ``trust check``, loading a key to sign.

A private key is an Ed25519 PKCS8 PEM file, mode 0600, optionally encrypted with a passphrase. It is never
overwritten, and a key file that group or others can read is refused (ssh's rule for identity files).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import getpass
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from opctl.doc import OpError, when
from safety import truststore
from safety.signedop import public_raw

KEY_VALIDITY = dt.timedelta(days=365)


def read_passphrase(path: str) -> bytes:
    """The passphrase in ``path``: its first line, which must not be empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OpError(f"--passphrase-file {path}: cannot read: {getattr(exc, 'strerror', exc)}") from exc
    line = text.splitlines()[0] if text else ""
    if not line:
        raise OpError(f"--passphrase-file {path}: empty")
    return line.encode("utf-8")


def _not_after(text: str | None) -> dt.datetime:
    if text is None:
        today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return today + KEY_VALIDITY
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise OpError(f"--not-after {text!r}: give a date (2027-06-30) or a UTC time (2027-06-30T12:00:00Z)") from exc
    value = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if value.timestamp() <= time.time():
        raise OpError(f"--not-after {text}: is in the past")
    return value.astimezone(dt.UTC)


def key_entry(key: Ed25519PrivateKey, *, owner: str, not_after: dt.datetime) -> str:
    """The trust store's ``[[keys]]`` entry for ``key`` (no roles yet: the store's owner grants them)."""
    raw = public_raw(key.public_key())
    return "\n".join([
        "[[keys]]",
        f"id = {json.dumps(truststore.key_id(raw))}",
        f"public = {json.dumps('ed25519:' + base64.b64encode(raw).decode('ascii'))}",
        f"owner = {json.dumps(owner)}",
        f"not_after = {not_after.strftime('%Y-%m-%dT%H:%M:%SZ')}",
        "roles = []  # the roles this key holds, e.g. [\"operator\"]",
    ]) + "\n"


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and ``data``, fsync'd; an existing file is never overwritten."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as exc:
        raise OpError(f"--out {path}: exists; a key is never overwritten (choose another name)") from exc
    except OSError as exc:
        raise OpError(f"--out {path}: cannot create: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate(args: argparse.Namespace) -> int:
    """``keys generate``: a new Ed25519 key in a 0600 PKCS8 PEM file; prints its [[keys]] entry."""
    not_after = _not_after(args.not_after)
    owner = args.owner or f"{getpass.getuser()}@{socket.gethostname()}"
    key = Ed25519PrivateKey.generate()
    encryption = (BestAvailableEncryption(read_passphrase(args.passphrase_file)) if args.passphrase_file
                  else NoEncryption())
    write_private(Path(args.out), key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption))
    print(f"wrote {args.out} (mode 0600{', encrypted' if args.passphrase_file else ', NOT encrypted'}); "
          "add this entry to the trust store and grant it roles:", file=sys.stderr)
    sys.stdout.write(key_entry(key, owner=owner, not_after=not_after))
    return 0


def load_private(path: str, passphrase_file: str | None = None) -> Ed25519PrivateKey:
    """The Ed25519 key in ``path``; asks for the passphrase on the terminal when it is encrypted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
            data = handle.read(64 * 1024)
    except OSError as exc:
        raise OpError(f"--key {path}: cannot read: {exc.strerror}") from exc
    if mode & 0o077:
        raise OpError(f"--key {path}: readable or writable by group or others (mode {mode:04o}): chmod 600 it")
    password = read_passphrase(passphrase_file) if passphrase_file else None
    if password is None and b"ENCRYPTED" in data:
        try:
            password = getpass.getpass(f"passphrase for {path}: ").encode("utf-8")
        except (EOFError, OSError) as exc:
            raise OpError(f"--key {path}: encrypted; give --passphrase-file") from exc
    try:
        key = load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise OpError(f"--key {path}: not a usable PKCS8 PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise OpError(f"--key {path}: not an Ed25519 key")
    return key


def _vmids(ranges: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges) or "none"


def _listed(values: frozenset[str]) -> str:
    return ", ".join(sorted(values)) or "nothing"


def describe(store: truststore.TrustStore, *, now: float) -> tuple[list[str], list[str]]:
    """The store in words, and warnings (a threshold no set of keys can meet, expired or revoked keys)."""
    lines = [f"trust store {store.path}: version {store.version}, sha256 {store.sha256}",
             f"{len(store.roles)} role(s), {len(store.keys)} key(s)"]
    warnings = []
    for role in store.roles.values():
        holders = [k for k in store.keys.values()
                   if role.name in k.roles and k.id not in store.revoked_keys and k.not_after > now]
        lines.append(f"role {role.name}: may sign {_listed(role.kinds)} of class {_listed(role.classes)} "
                     f"for {_listed(role.audiences)} on vmids {_vmids(role.vmids)}; lifetime up to "
                     f"{role.max_ttl // 60} min; needs {role.threshold} distinct key(s), {len(holders)} usable")
        if len(holders) < role.threshold:
            warnings.append(f"role {role.name} needs {role.threshold} keys but only {len(holders)} usable key(s) "
                            "hold it: nothing can be signed as it")
    for key in store.keys.values():
        state = ("REVOKED" if key.id in store.revoked_keys else
                 "EXPIRED" if key.not_after <= now else f"valid until {when(key.not_after)}")
        lines.append(f"key {key.id} ({key.owner}): {state}; roles {_listed(key.roles)}")
        if state == "EXPIRED":
            warnings.append(f"key {key.id} ({key.owner}) has expired")
    lines += [f"revoked op {op_id}" for op_id in sorted(store.revoked_ops)]
    lines += [f"revoked hub document sha256 {sha256}" for sha256 in sorted(store.revoked_documents)]
    lines += [f"floor reset of cluster {reset.cluster}: a node whose held hub document no longer verifies and whose "
              f"floor is sha256 {' or '.join(sorted(reset.replaces))} takes version {reset.version}, sha256 "
              f"{reset.sha256}, as its floor" for reset in store.floor_resets.values()]
    warnings += [f"floor reset of cluster {reset.cluster} (version {reset.version}): remove it (in a new version) once "
                 "every node holds that version or a later one; left in place, it lowers again any node found "
                 "holding a floor it replaces" for reset in store.floor_resets.values()]
    return lines, warnings


def _load(path: str, state_dir: str | None) -> truststore.TrustStore:
    """The store as the executor would load it; with ``state_dir``, under the floor that executor recorded."""
    if state_dir is None:
        return truststore.load(path, check_owner=True)
    if not Path(state_dir).is_dir():
        raise OpError(f"--state-dir {state_dir}: not a directory")
    version, sha256 = truststore.read_floor(state_dir)
    holder = truststore.TrustStoreHolder(path, min_version=version, min_sha256=sha256, check_owner=True)
    error = holder.reload()
    if error is not None:
        raise error
    assert holder.current is not None
    return holder.current


def check(args: argparse.Namespace) -> int:
    """``trust check FILE [--state-dir DIR]``: load it as the executor would (ownership and, with DIR, the
    rollback floor included), list roles and keys."""
    try:
        store = _load(args.file, args.state_dir)
    except truststore.TrustStoreError as exc:
        print(f"{args.prog}: trust check: INVALID: {exc}", file=sys.stderr)
        return 2
    lines, warnings = describe(store, now=time.time())
    if args.state_dir is not None:
        version, _ = truststore.read_floor(args.state_dir)
        lines.insert(1, f"the executor with state dir {args.state_dir} would accept it (its floor: "
                        f"{f'version {version}' if version else 'none recorded'})")
    print("\n".join(lines))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
