"""The operator's commands that talk to the executor API: ``pending``, ``op propose/submit/revoke``.

The executor reads Proxmox; these commands never do. A gRPC failure is reported with its status and
details (exit 1); a refusal with its typed reason (exit 1). The daemon's Unix socket by default (``--api
unix:PATH`` or HOST:PORT for another); beyond loopback the executor API requires mutual TLS (``--api-ca``,
``--api-cert``, ``--api-key``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import grpc

from common.grpcserver import ClientTls, channel_credentials
from executor.v1 import executor_pb2 as pb
from executor.v1 import executor_pb2_grpc as pb_grpc
from opctl.cli import DEFAULT_TTL
from opctl.connect import connection
from opctl.doc import (
    PARAM_WORDS,
    OpError,
    Proposal,
    action_words,
    parse_action_json,
    proposal_document,
    summary,
    visible,
    when,
)
from opctl.keys import load_private
from opctl.sign import build_payload, parse_ttl, read_envelope
from opctl.status import advice, report
from safety import signedop
from safety.opschema import APPROVAL, canonical_params, plain
from safety.payload import parse_payload
from safety.refusal import Refused

ZERO_DIGEST = "0" * 40


@contextmanager
def stub(args: argparse.Namespace) -> Iterator[pb_grpc.ExecutorServiceStub]:
    """A stub on a channel to the API the flags (or PVE_EXECUTOR_API) name, closed afterwards."""
    where = connection(args)
    if where.tls:
        tls = ClientTls(ca=where.ca, cert=where.cert, key=where.key,
                        names=("api_ca", "api_client_cert", "api_client_key"))
        channel = grpc.secure_channel(where.target, channel_credentials(tls))
    else:
        channel = grpc.insecure_channel(where.target)
    with channel:
        yield pb_grpc.ExecutorServiceStub(channel)


def class_name(value: int) -> str:
    """``APPROVAL`` for ACTION_CLASS_APPROVAL."""
    return pb.ActionClass.Name(value).removeprefix("ACTION_CLASS_")  # type: ignore[arg-type]


def reason_name(value: int) -> str:
    """``EXPIRED`` for REFUSAL_REASON_EXPIRED."""
    return pb.RefusalReason.Name(value).removeprefix("REFUSAL_REASON_")  # type: ignore[arg-type]


def _entry(item: pb.PendingApproval) -> dict[str, object]:
    action = parse_action_json(item.descriptor, f"pending[{item.vmid}:{item.op_kind}].descriptor")
    return proposal_document(action, item.challenge or None, cls=class_name(item.action_class), rule=item.rule,
                             reasons=list(item.reasons), before={}, source=item.source,
                             refusal=reason_name(item.reason), descriptor_sha256=item.descriptor_sha256,
                             first_seen_unix_ms=item.first_seen_unix_ms)


def pending(args: argparse.Namespace) -> int:
    """``pending``: the refused non-benign actions waiting for approval; ``--json``: entries ``op sign`` takes."""
    with stub(args) as api:
        response = api.ListPending(pb.ListPendingRequest(), timeout=args.timeout)
    entries = [_entry(item) for item in response.pending]
    if args.json:
        print(json.dumps(entries, indent=2, sort_keys=True))
        return 0
    if not entries:
        print("nothing pending")
    for index, (entry, item) in enumerate(zip(entries, response.pending, strict=True), start=1):
        print("\n".join(pending_lines(index, entry, item)))
    return 0


def pending_lines(index: int, entry: Mapping[str, object], item: pb.PendingApproval) -> list[str]:
    """One pending entry for a person: numbered, the action, one line per parameter (``key -> 'value'``, a
    delete ``key -> <absent>``; values quoted so commas and spaces are plain), why, and how to sign it."""
    action = entry["action"]
    assert isinstance(action, dict)
    params = plain(action["params"])
    assert isinstance(params, dict)
    lines = [f"[{index}] {action_words({**action, 'params': {}})}  {entry['class']}"]
    lines += [f"      {line}" for name, value in params.items() for line in param_lines(name, value)]
    lines.append(f"    rule {item.rule}; refused {entry['refusal']}; from {item.source}; "
                 f"first seen {when(item.first_seen_unix_ms / 1000)}; descriptor {item.descriptor_sha256[:12]}")
    lines += [f"    - {visible(reason)}" for reason in item.reasons]
    lines.append(f"    sign it: pve-executor op sign --pending {index} --key KEYFILE --role ROLE")
    return lines


def param_lines(name: str, value: object) -> list[str]:
    """A parameter as lines: each config key written (``key -> 'value'``) or deleted (``key -> <absent>``)."""
    if name == "set" and isinstance(value, dict):
        return [f"{visible(str(key))} -> {visible(repr(str(item)))}" for key, item in sorted(value.items())]
    if name == "delete" and isinstance(value, list):
        return [f"{visible(str(key))} -> <absent>" for key in value]
    if isinstance(value, bool):
        return [f"{name}: {'yes' if value else 'NO'}"]
    if name == "size":
        return [f"size: {PARAM_WORDS['size'](value).removeprefix('to ')}"]
    return [f"{name}: {visible(repr(value) if isinstance(value, str) else str(value))}"]


def pending_proposal(args: argparse.Namespace) -> Proposal:
    """The pending entry ``op sign --pending N`` (as ``pending`` numbers them) or ``--vmid VMID`` names,
    fetched with ListPending."""
    with stub(args) as api:
        response = api.ListPending(pb.ListPendingRequest(), timeout=args.timeout)
    items = list(response.pending)
    if args.pending is not None:
        if not 1 <= args.pending <= len(items):
            raise OpError(f"--pending {args.pending}: there are {len(items)} pending entries "
                          "(see pve-executor pending)")
        chosen = [(args.pending, items[args.pending - 1])]
    else:
        chosen = [(i, item) for i, item in enumerate(items, start=1) if item.vmid == args.vmid]
        if len(chosen) != 1:
            named = ", ".join(f"--pending {i} ({item.op_kind})" for i, item in chosen)
            raise OpError(f"--vmid {args.vmid}: " + (f"{len(chosen)} pending entries; give one of {named}" if chosen
                                                     else "no pending entry for this guest (see pve-executor pending)"))
    item = chosen[0][1]
    action = parse_action_json(item.descriptor, f"pending[{chosen[0][0]}].descriptor")
    return Proposal(action=action, challenge=item.challenge or None)


def coerce(kind: str, name: str, text: str) -> object:
    """A KEY=VALUE argument as the kind's schema types it (booleans, sizes, key lists, set.KEY strings)."""
    if name in ("delete",):
        return sorted(part for part in text.split(",") if part)
    if text in ("true", "yes", "false", "no"):
        return text in ("true", "yes")
    if name == "size" and kind == "disk.resize":
        units = {"K": 10, "M": 20, "G": 30, "T": 40}
        if text[-1:].upper() in units and text[:-1].isdigit():
            return int(text[:-1]) << units[text[-1].upper()]
    return int(text) if text.isdigit() else text


def propose_params(kind: str, pairs: list[str], params_json: str | None) -> dict[str, object]:
    """The params of ``op propose``: ``--params-json`` overlaid with KEY=VALUE (``set.KEY=VALUE`` writes KEY)."""
    params: dict[str, object] = {}
    if params_json:
        try:
            loaded = json.loads(params_json)
        except json.JSONDecodeError as exc:
            raise OpError(f"--params-json: not JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise OpError("--params-json: must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise OpError(f"{pair!r}: parameters are KEY=VALUE (set.KEY=VALUE for a config write)")
        if name.startswith("set."):
            written = params.setdefault("set", {})
            assert isinstance(written, dict)
            written[name.removeprefix("set.")] = text
        else:
            params[name] = coerce(kind, name, text)
    try:
        canonical_params(kind, params)
    except Refused as exc:
        raise OpError(f"{kind}: {exc.detail}") from exc
    return params


def proposal_of(response: pb.ProposeOpResponse) -> dict[str, object]:
    """A ProposeOpResponse as the proposal document ``op sign`` reads."""
    action = parse_action_json(response.action, "ProposeOpResponse.action")
    return proposal_document(action, response.challenge or None, cls=class_name(response.action_class),
                             rule=response.rule, reasons=list(response.reasons), before=dict(response.before))


def call_propose(args: argparse.Namespace, vmid: int, kind: str, params: Mapping[str, object]) -> dict[str, object]:
    """ProposeOp for the guest, kind and params; the proposal document."""
    request = pb.ProposeOpRequest(vmid=vmid, kind=kind, params_json=json.dumps(plain(params), sort_keys=True))
    with stub(args) as api:
        return proposal_of(api.ProposeOp(request, timeout=args.timeout))


def print_proposal(document: Mapping[str, object]) -> None:
    """The proposal on stdout (JSON), what it means on stderr."""
    action = document["action"]
    assert isinstance(action, dict)
    print(json.dumps(document, indent=2, sort_keys=True))
    print(f"proposal: {action_words(action)} ({document['class']}); sign it with: "
          "pve-executor op sign --key KEYFILE --role ROLE FILE", file=sys.stderr)


def propose(args: argparse.Namespace) -> int:
    """``op propose``: ask the executor to describe the op and issue its challenge; nothing is mutated."""
    params = propose_params(args.kind, args.params, args.params_json)
    print_proposal(call_propose(args, args.vmid, args.kind, params))
    return 0


def to_proto(envelope: signedop.Envelope) -> pb.SignedOp:
    """The envelope as executor.v1.SignedOp: the payload bytes exactly as signed."""
    return pb.SignedOp(payload_type=envelope.payload_type, payload=envelope.payload,
                       signatures=[pb.OpSignature(keyid=s.keyid, sig=s.sig) for s in envelope.signatures])


def _decision(op_id: str, decision: str, refusal: pb.Refusal, done: str) -> int:
    if decision == done:
        print(f"{decision} op {op_id}")
        return 0
    named = op_id or refusal.op_id  # empty when refused before a signature held
    reason = reason_name(refusal.reason)
    print(f"{decision or 'refused'}{f' op {named}' if named else ''}: {reason}: {refusal.detail}")
    print(f"what to do: {advice(reason, refusal.vmid)}", file=sys.stderr)
    return 1


def _own_id(envelope: signedop.Envelope) -> str:
    """The op_id the envelope's payload names ("" when it does not parse: the executor said why)."""
    try:
        return parse_payload(envelope.payload).op_id
    except Refused:
        return ""


def submit(args: argparse.Namespace) -> int:
    """``op submit``: SubmitOp; exit 0 when the gate accepted it for the guest's lane, 1 when refused.

    Accepted is not ran: the lane checks the op again when its turn comes. ``--wait`` then reports its
    fate as ``op status OP_ID --wait`` does (and exits as it does).
    """
    envelope = read_envelope(args.envelope)
    with stub(args) as api:
        response = api.SubmitOp(pb.SubmitOpRequest(op=to_proto(envelope)), timeout=args.timeout)
        if response.decision != "accepted":  # the executor names the op only once a signature held: say it anyway
            return _decision(response.op_id or _own_id(envelope), response.decision, response.refusal, "accepted")
        op_id = response.op_id
        if not args.wait:
            print(f"accepted: {op_id} (queued; see `{args.prog} op status {op_id} --wait`)")
            return 0
        print(f"accepted: {op_id} (queued; waiting for its fate)", file=sys.stderr)
        # The op id is the signers' choice: another op may share it; this waits on the one submitted.
        return report(args, api, op_id, hashlib.sha256(envelope.payload).hexdigest())


def _revoke_proposal(args: argparse.Namespace) -> Proposal:
    params = {"op_id": args.op_id}
    if args.audience is None:  # the executor knows its audience and the guest's type
        document = call_propose(args, args.vmid, "op.revoke", params)
        action = document["action"]
        assert isinstance(action, dict)
        if action.get("kind") != "op.revoke" or action.get("params") != params or action.get("vmid") != args.vmid:
            raise OpError(f"the executor proposed {action_words(action)}, not a revocation of {args.op_id}", code=1)
        challenge = document["challenge"]
        return Proposal(action=action, challenge=challenge if isinstance(challenge, str) else None)
    action = {"audience": args.audience, "vmid": args.vmid, "guest_type": args.guest_type, "kind": "op.revoke",
              "params": params, "class": APPROVAL, "precondition": {"digest": ZERO_DIGEST, "run_state": "stopped"}}
    return Proposal(action=action, challenge=None)


def revoke(args: argparse.Namespace) -> int:
    """``op revoke``: a signed op.revoke naming OP_ID, sent with RevokeOp: a veto the op never outlives."""
    key = load_private(args.key, args.passphrase_file)
    try:
        canonical_params("op.revoke", {"op_id": args.op_id})
    except Refused as exc:
        raise OpError(f"OP_ID: {exc.detail}") from exc
    proposal = _revoke_proposal(args)
    now = time.time()
    data = build_payload(proposal, role=args.role, ttl=parse_ttl(args.ttl or DEFAULT_TTL),
                         reason=args.reason or f"revoke op {args.op_id}", now=now)
    print(f"signing:\n{summary(parse_payload(data), now=now)}", file=sys.stderr)
    envelope = signedop.Envelope(payload_type=signedop.PAYLOAD_TYPE, payload=data,
                                 signatures=(signedop.sign(data, key),))
    with stub(args) as api:
        response = api.RevokeOp(pb.RevokeOpRequest(revocation=to_proto(envelope)), timeout=args.timeout)
    return _decision(response.op_id or args.op_id, response.decision, response.refusal, "revoked")
