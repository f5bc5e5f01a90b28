"""Offline signing: ``op sign``, ``op cosign`` and ``op verify`` (docs/SAFETY.md §6, §11).

Nothing here talks to the executor. ``op sign`` builds the payload from a proposal, parses its own bytes
back with the gate's strict parser before signing them, prints what is signed in words, and asks the signer
to type the vmid. ``op cosign`` adds a signature over the very same bytes. ``op verify`` runs steps 1-11
against a trust store; without the executor's gate secret it cannot check a challenge, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import IO

from opctl.cli import DEFAULT_TTL
from opctl.doc import OpError, Proposal, read_proposal, refusal_text, summary
from opctl.keys import load_private
from safety import signedop, truststore
from safety.opschema import DESTRUCTIVE, TTL_CEILING
from safety.payload import OpPayload, parse_payload, to_json
from safety.refusal import Refused
from safety.signedop import SIGNER_BACKDATE

BACKDATE = SIGNER_BACKDATE  # not_before this far back, for a gate whose clock runs behind (docs/SAFETY.md §6.6)
_TTL = re.compile(r"([0-9]{1,6})([smh]?)", re.ASCII)
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_ttl(text: str) -> int:
    """``15m``, ``1h``, ``900s`` or ``900`` as seconds."""
    match = _TTL.fullmatch(text)
    if match is None or int(match[1]) == 0:
        raise OpError(f"--ttl {text!r}: give a duration such as 15m, 1h or 900s")
    return int(match[1]) * _UNIT[match[2]]


def read_input(path: str, what: str) -> bytes:
    """The bytes of ``path`` (``-``: standard input), at most 1 MiB."""
    try:
        if path == "-":
            return sys.stdin.buffer.read(1 << 20)
        with Path(path).open("rb") as handle:
            return handle.read(1 << 20)
    except OSError as exc:
        raise OpError(f"{what} {path}: cannot read: {exc.strerror}") from exc


def write_output(path: str | None, data: bytes) -> None:
    """``data`` to standard output (None or ``-``) or, atomically and fsync'd, to the file ``path``."""
    if path in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise OpError(f"--out {path}: cannot write: {exc.strerror}") from exc


def build_payload(proposal: Proposal, *, role: str, ttl: int, reason: str, now: float) -> bytes:
    """The payload bytes to sign, proven valid by the gate's own strict parser and canonical (``to_json``)."""
    cls = str(proposal.action["class"])
    lifetime = BACKDATE + ttl
    if cls in TTL_CEILING and lifetime > TTL_CEILING[cls]:
        longest = (TTL_CEILING[cls] - BACKDATE) // 60
        raise OpError(f"--ttl: {cls} ops live at most {TTL_CEILING[cls] // 60} min including the {BACKDATE}s "
                      f"backdating; give --ttl {longest}m or less")
    if cls == DESTRUCTIVE and proposal.challenge is None:
        raise OpError("a DESTRUCTIVE op needs the executor's challenge: get a fresh proposal with op propose")
    not_before = int(now) - BACKDATE
    document = {**proposal.action, "v": 1, "op_id": secrets.token_hex(16), "challenge": proposal.challenge,
                "role": role, "not_before": not_before, "not_after": not_before + lifetime, "reason": reason}
    data = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    try:
        parsed = parse_payload(data)
    except Refused as exc:
        raise OpError(f"cannot sign: {exc.detail}") from exc
    if to_json(parsed) != data:  # one encoding of the op, whichever tool writes it
        raise OpError("cannot sign: the payload does not round-trip to its canonical form")
    return data


def _answer(stream: IO[str], prompt: IO[str], vmid: int) -> str:
    prompt.write(f"type the vmid ({vmid}) to sign, anything else refuses: ")
    prompt.flush()
    line = stream.readline()
    if not stream.isatty():  # a terminal echoed the line break; a pipe did not
        prompt.write("\n")
    return line


def confirm(vmid: int, *, stdin_taken: bool) -> None:
    """The signer types the vmid: from standard input, or the terminal when the document came on stdin."""
    if not stdin_taken:
        line = _answer(sys.stdin, sys.stderr, vmid)
    else:
        try:
            with open("/dev/tty", "r+", encoding="utf-8") as tty:
                line = _answer(tty, tty, vmid)
        except OSError as exc:
            raise OpError("cannot ask for the vmid: no terminal (check the summary, then pass --yes)") from exc
    typed = line.strip()
    if typed != str(vmid):
        shown = "nothing" if not typed else repr(typed[:20])
        raise OpError(f"typed {shown}, not {vmid}: nothing signed", code=1)


def _check_window(payload: OpPayload, now: float) -> None:
    if now >= payload.not_after:
        raise OpError(f"the op expired at {payload.not_after}; sign a fresh proposal")


def proposal_to_sign(args: argparse.Namespace) -> Proposal:
    """The PROPOSAL file, or the pending entry ``--pending N`` or ``--vmid VMID`` names (asked of the executor)."""
    given = [name for name, value in (("PROPOSAL", args.proposal), ("--pending", args.pending),
                                      ("--vmid", args.vmid)) if value is not None]
    if len(given) != 1:
        raise OpError("give one of PROPOSAL (a file, - for stdin), --pending N or --vmid VMID"
                      + (f", not {' and '.join(given)}" if given else ""))
    if args.proposal is not None:
        return read_proposal(read_input(args.proposal, "PROPOSAL"), "proposal")
    from opctl.api import pending_proposal  # noqa: PLC0415 - the API side imports this module

    return pending_proposal(args)


def sign(args: argparse.Namespace) -> int:
    """``op sign``: a new envelope with one signature over a payload built from the proposal."""
    key = load_private(args.key, args.passphrase_file)
    proposal = proposal_to_sign(args)
    now = time.time()
    data = build_payload(proposal, role=args.role, ttl=parse_ttl(args.ttl or DEFAULT_TTL),
                         reason=args.reason or "no reason given", now=now)
    payload = parse_payload(data)
    print(f"signing:\n{summary(payload, now=now)}", file=sys.stderr)
    if not args.yes:
        confirm(payload.vmid, stdin_taken=args.proposal == "-")
    envelope = signedop.Envelope(payload_type=signedop.PAYLOAD_TYPE, payload=data,
                                 signatures=(signedop.sign(data, key),))
    write_output(args.out, signedop.envelope_to_json(envelope))
    print(f"signed op {payload.op_id} as {envelope.signatures[0].keyid}", file=sys.stderr)
    return 0


def read_envelope(path: str) -> signedop.Envelope:
    """The envelope file at ``path``, parsed as strictly as the gate parses it."""
    try:
        return signedop.parse_envelope_json(read_input(path, "ENVELOPE"))
    except Refused as exc:
        raise OpError(f"ENVELOPE {path}: {refusal_text(exc)}") from exc


def cosign(args: argparse.Namespace) -> int:
    """``op cosign``: one more signature over the same payload bytes, by a key that has not signed yet."""
    key = load_private(args.key, args.passphrase_file)
    envelope = read_envelope(args.envelope)
    keyid = signedop.sign(envelope.payload, key).keyid
    if any(s.keyid == keyid for s in envelope.signatures):
        raise OpError(f"key {keyid} already signed this op: a threshold counts distinct keys")
    if len(envelope.signatures) >= signedop.MAX_SIGNATURES:
        raise OpError(f"the envelope already carries {signedop.MAX_SIGNATURES} signatures, the most it may")
    if envelope.payload_type != signedop.PAYLOAD_TYPE:
        raise OpError(f"payloadType {envelope.payload_type[:80]!r} is not {signedop.PAYLOAD_TYPE}")
    try:
        payload = parse_payload(envelope.payload)
    except Refused as exc:
        raise OpError(f"ENVELOPE {args.envelope}: {refusal_text(exc)}") from exc
    now = time.time()
    _check_window(payload, now)
    print(f"co-signing:\n{summary(payload, now=now)}", file=sys.stderr)
    if not args.yes:
        confirm(payload.vmid, stdin_taken=args.envelope == "-")
    signed = signedop.Envelope(payload_type=envelope.payload_type, payload=envelope.payload,
                               signatures=(*envelope.signatures, signedop.sign(envelope.payload, key)))
    out = args.out if args.out is not None else args.envelope
    write_output(out, signedop.envelope_to_json(signed))
    print(f"co-signed op {payload.op_id} as {keyid} ({len(signed.signatures)} signatures)", file=sys.stderr)
    return 0


def _secret(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OpError(f"--gate-secret {path}: cannot read: {exc.strerror}") from exc


def verify(args: argparse.Namespace) -> int:
    """``op verify``: steps 1-11 offline; exit 0 when they hold, 2 with the refusal otherwise."""
    try:
        store = truststore.load(args.trust, check_owner=False)  # a reviewer's copy need not be root-owned
    except truststore.TrustStoreError as exc:
        raise OpError(f"--trust: {exc}") from exc
    envelope = read_envelope(args.envelope)
    audience = args.audience
    if audience is None:
        try:
            audience = parse_payload(envelope.payload).audience
        except Refused:
            audience = ""  # verify names the fault, in its order
    secret = _secret(args.gate_secret)
    now = float(args.at) if args.at is not None else time.time()
    try:
        verified = signedop.verify(envelope, store, now=now, audience=audience, challenge_key=secret,
                                   check_challenge=secret is not None)
    except Refused as exc:
        print(f"REFUSED {refusal_text(exc)}")
        return 2
    payload = verified.payload
    print(f"VERIFIED (steps 1-11 of trust store v{store.version}):\n{summary(payload, now=now)}")
    print(f"  signers counted: {', '.join(verified.signers)}")
    if args.audience is None:
        print(f"  audience {payload.audience} taken from the op itself: pass --audience to check it")
    if secret is None and payload.class_ == DESTRUCTIVE:
        print("  challenge NOT checked: it needs the executor's gate secret (--gate-secret); the executor checks it")
    return 0
