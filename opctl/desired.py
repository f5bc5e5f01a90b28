"""Hub documents offline: ``desired sign``, ``desired cosign`` and ``desired verify`` (docs/SAFETY.md §6.9).

``desired sign`` checks the file with the loader every executor uses (``desiredfile``) before signing, so a
document that every node would NACK is never signed. ``sign_document`` is what the hub's ``apply`` calls too.
``desired verify`` runs the executor's checks against a copy of its trust store and, optionally, the version
it holds.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import desiredfile
from opctl.doc import OpError, refusal_text, when
from opctl.keys import load_private
from opctl.sign import write_output
from safety import desireddoc, truststore
from safety.refusal import Refused
from safety.signedop import Envelope

# The flag of ``desired sign`` that sets each document field, to name it when the field is refused.
FLAGS = {"cluster": "--cluster", "version": "--version", "role": "--role", "author": "--author",
         "message": "--message", "previous_sha256": "--previous-sha256", "desired": "FILE"}


def read_limited(path: str, what: str, limit: int) -> bytes:
    """The bytes of ``path`` (``-``: standard input); OpError naming ``what`` when unreadable or over ``limit``."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with Path(path).open("rb") as handle:
                data = handle.read(limit + 1)
    except OSError as exc:
        raise OpError(f"{what} {path}: cannot read: {exc.strerror}") from exc
    if len(data) > limit:
        raise OpError(f"{what} {path}: larger than {limit} bytes, the most a hub document holds")
    return data


def read_desired(path: str) -> str:
    """The desired file's text, refused over the document's size limit or not UTF-8."""
    data = read_limited(path, "FILE", desireddoc.MAX_DESIRED)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OpError(f"FILE {path}: not UTF-8 at byte {exc.start}") from exc


def check_desired(text: str, name: str) -> int:
    """The guests ``text`` declares, by the executor's loader; OpError naming file and line when it refuses it."""
    try:
        return len(desiredfile.parse(text, name))
    except desiredfile.DesiredFileError as exc:
        raise OpError(str(exc)) from exc


def sign_document(text: str, key: Ed25519PrivateKey, *, cluster: str, version: int, previous_sha256: str, role: str,
                  author: str, message: str, now: float) -> Envelope:
    """A document envelope over ``text`` with one signature by ``key``; Refused(MALFORMED) naming the field
    (``document.version: ...``) when the verifier's own parser would refuse it. The hub's ``apply`` calls it too."""
    payload = desireddoc.build_payload(cluster=cluster, version=version, role=role, author=author, message=message,
                                       created=int(now), previous_sha256=previous_sha256, desired=text)
    return desireddoc.seal(payload, key)


def sign(args: argparse.Namespace) -> int:
    """``desired sign FILE``: check it, sign it, write the envelope; its sha256 is printed for the next version."""
    text = read_desired(args.file)
    guests = check_desired(text, args.file)
    key = load_private(args.key, args.passphrase_file)
    author = args.author or f"{getpass.getuser()}@{socket.gethostname()}"
    try:
        envelope = sign_document(text, key, cluster=args.cluster, version=args.version,
                                 previous_sha256=args.previous_sha256 or "", role=args.role, author=author,
                                 message=args.message, now=time.time())
    except Refused as exc:
        field, _, why = exc.detail.partition(": ")
        raise OpError(f"{FLAGS.get(field.removeprefix('document.'), field)}: {why}; nothing signed") from exc
    write_output(args.out, desireddoc.to_bytes(envelope))
    print(f"signed version {args.version} of cluster {args.cluster} ({guests} guests) as "
          f"{envelope.signatures[0].keyid}; sha256 {desireddoc.payload_sha256(envelope)}", file=sys.stderr)
    return 0


def _read_envelope(path: str) -> Envelope:
    try:
        return desireddoc.parse_envelope(read_limited(path, "ENVELOPE", desireddoc.MAX_ENVELOPE))
    except Refused as exc:
        raise OpError(f"ENVELOPE {path}: {refusal_text(exc)}") from exc


def cosign(args: argparse.Namespace) -> int:
    """``desired cosign ENVELOPE``: one more signature over the same document bytes."""
    key = load_private(args.key, args.passphrase_file)
    envelope = _read_envelope(args.envelope)
    try:
        signed = desireddoc.cosign(envelope, key)
        document = desireddoc.parse_payload(envelope.payload)
    except (ValueError, Refused) as exc:
        raise OpError(f"ENVELOPE {args.envelope}: {refusal_text(exc) if isinstance(exc, Refused) else exc}") from exc
    write_output(args.out if args.out is not None else args.envelope, desireddoc.to_bytes(signed))
    print(f"co-signed version {document.version} of cluster {document.cluster} as {signed.signatures[-1].keyid} "
          f"({len(signed.signatures)} signatures)", file=sys.stderr)
    return 0


def _cluster(args: argparse.Namespace) -> str:
    if args.cluster:
        return str(args.cluster)
    cluster: str = args.audience.partition("@")[2]
    if not cluster:
        raise OpError(f"--audience {args.audience}: no @cluster in it; give --cluster")
    return cluster


def verify(args: argparse.Namespace) -> int:
    """``desired verify ENVELOPE``: the executor's checks offline; exit 0 when they hold, 2 with the refusal."""
    try:
        store = truststore.load(args.trust, check_owner=False)  # a reviewer's copy need not be root-owned
    except truststore.TrustStoreError as exc:
        raise OpError(f"--trust: {exc}") from exc
    if (args.held_version or 0) > 0 and not args.held_sha256:
        raise OpError("--held-version needs --held-sha256 (the executor's state_dir keeps both)")
    data = read_limited(args.envelope, "ENVELOPE", desireddoc.MAX_ENVELOPE)
    now = float(args.at) if args.at is not None else time.time()
    try:
        verified = desireddoc.verify_document(data, store, cluster=_cluster(args), audience=args.audience,
                                              held_version=args.held_version or 0,
                                              held_sha256=args.held_sha256 or "", now=now)
    except Refused as exc:
        print(f"REFUSED {refusal_text(exc)}")
        return 2
    except ValueError as exc:
        raise OpError(f"--held-version/--held-sha256: {exc}") from exc
    document = verified.document
    guests = check_desired(document.desired,
                           f"{args.envelope} (version {document.version})")
    print(f"VERIFIED (trust store v{store.version}){' (the version held: nothing new)' if verified.unchanged else ''}")
    print(f"  cluster {document.cluster}, version {document.version}, {guests} guests, sha256 {verified.sha256}")
    print(f"  replaces {document.previous_sha256 or 'nothing (version 1)'}")
    print(f"  by {document.author}, {when(document.created)}: {document.message}")
    print(f"  role {document.role}; signers counted: {', '.join(verified.signers)}")
    return 0
