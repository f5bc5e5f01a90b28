"""``pve-hub pending`` and ``pve-hub submit``: approvals through the hub, the operator's side.

``pending`` lists every node's changes waiting for a signed op (from their reports), each with the commands that
sign it offline with the operator's own keys; ``submit`` hands a signed envelope to the hub, which routes it to the
node its audience names over that node's own connection. The node verifies it as its local API does: the hub
carries, it cannot approve. ``submit --wait`` follows it (GetOpStatus) and exits as ``pve-executor op submit
--wait`` does: 0 ran ok (a revocation: took effect), 1 refused, revoked or failed, 3 still waiting after --timeout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Mapping

import grpc

from hub.client import Failed, _call, _failure, _stub
from hub.config import DEFAULT_ADDRESS
from hub.v1 import hub_pb2 as pb
from opctl.advice import advice
from opctl.doc import OpError, action_words, parse_action_json, proposal_document, visible
from opctl.sign import read_input
from safety import signedop
from safety.refusal import Refused

EXIT_NOT_DONE = 3
POLL = 0.25  # seconds between GetOpStatus calls while waiting
CALL_TIMEOUT = 30.0
OPEN = frozenset({"queued", "delivered"})
SETTLED_FATES = frozenset({"ran", "refused", "revoked"})


# --- pending ----------------------------------------------------------------------------------------------------

def _entry(item: pb.PendingApproval) -> dict[str, object]:
    action = parse_action_json(item.descriptor, f"pending[{item.node}:{item.vmid}:{item.op_kind}].descriptor")
    return {**proposal_document(action, item.challenge or None, cls=item.action_class, rule=item.rule,
                                reasons=list(item.reasons), before={}, descriptor_sha256=item.descriptor_sha256,
                                first_seen_unix_ms=item.first_seen_unix_ms), "node": item.node}


def hub_flags(args: argparse.Namespace) -> str:
    """The flags that reached this hub (``--hub`` unless the default, the client TLS files), shell-quoted: the
    commands ``pending`` prints must reach the same hub when pasted."""
    flags = [] if args.hub == DEFAULT_ADDRESS else ["--hub", args.hub]
    for name in ("hub_ca", "hub_client_cert", "hub_client_key"):
        if getattr(args, name, None):
            flags += ["--" + name.replace("_", "-"), getattr(args, name)]
    return "".join(f" {shlex.quote(flag)}" for flag in flags)


def sign_command(cluster: str, item: pb.PendingApproval, flags: str = "") -> str:
    """The exact commands that sign ``item`` offline and route it through the hub (``flags``: how to reach it)."""
    short = item.descriptor_sha256[:12]
    cluster = shlex.quote(cluster)
    return (f"pve-hub pending --cluster {cluster}{flags} --descriptor {short} --json > pending-{short}.json && "
            f"pve-executor op sign --key KEYFILE --role ROLE --out op-{short}.json pending-{short}.json && "
            f"pve-hub submit op-{short}.json --cluster {cluster}{flags} --wait")


def pending(args: argparse.Namespace) -> int:
    """Every node's pending approvals (by node, then vmid), or the one ``--descriptor`` names."""
    with _stub(args) as stub:
        answer = _call(f"--hub {args.hub}", stub.ListPending, pb.ListPendingRequest(cluster=args.cluster))
    items = list(answer.pending)
    if args.descriptor:
        items = [item for item in items if item.descriptor_sha256.startswith(args.descriptor.lower())]
        if len(items) != 1:
            raise Failed(f"--descriptor {args.descriptor}: {len(items)} pending entries match (see pve-hub pending "
                         f"--cluster {args.cluster})")
    entries, items = _readable(items, strict=bool(args.descriptor))
    if answer.omitted:
        print(f"pve-hub pending: {answer.omitted} more left out (the answer reached its size limit; taken in turn "
              f"from each node): see pve-hub status --node NODE", file=sys.stderr)
    if args.json:
        print(json.dumps(entries[0] if args.descriptor else entries, indent=2, sort_keys=True))
        return 0
    if not entries:
        print(f"nothing pending in cluster {args.cluster}")
    for index, (entry, item) in enumerate(zip(entries, items, strict=True), start=1):
        print("\n".join(_lines(index, entry, item, args.cluster, hub_flags(args))))
    return 0


def _readable(items: list[pb.PendingApproval], *, strict: bool) -> tuple[list[dict[str, object]],
                                                                         list[pb.PendingApproval]]:
    """Each item with its entry; one whose descriptor cannot be read (a node sends it) is named on stderr and left
    out, so it never hides the other nodes' approvals (``strict``: the operator chose it, its error stands)."""
    entries, kept = [], []
    for item in items:
        try:
            entries.append(_entry(item))
        except OpError as exc:
            if strict:
                raise
            print(f"pve-hub pending: left out node {visible(item.node)} guest {item.vmid} {visible(item.op_kind)}: "
                  f"{visible(str(exc))} (it cannot be signed)", file=sys.stderr)
            continue
        kept.append(item)
    return entries, kept


def _lines(index: int, entry: Mapping[str, object], item: pb.PendingApproval, cluster: str,
           flags: str = "") -> list[str]:
    action = entry["action"]
    assert isinstance(action, dict)
    lines = [f"[{index}] node {visible(item.node)}: {action_words(action)}  {item.action_class}",
             f"    kind {item.op_kind}; rule {item.rule}; descriptor {item.descriptor_sha256[:12]}"]
    lines += [f"    - {visible(reason)}" for reason in item.reasons]
    lines.append(f"    sign it: {sign_command(cluster, item, flags)}")
    return lines


# --- submit -----------------------------------------------------------------------------------------------------

def _read(path: str) -> bytes:
    """The envelope file's bytes, checked to parse as the gate parses it (OpError naming the file: exit 2)."""
    data = read_input(path, "ENVELOPE")
    try:
        signedop.parse_envelope_json(data)
    except Refused as exc:
        raise OpError(f"ENVELOPE {path}: {exc.reason.value}: {exc.detail}") from exc
    return data


def submit(args: argparse.Namespace) -> int:
    """SubmitOp; with --wait, the node's verdict and the op's fate."""
    envelope = _read(args.envelope)
    with _stub(args) as stub:
        try:
            answer = stub.SubmitOp(pb.SubmitOpRequest(cluster=args.cluster, envelope=envelope), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise Failed(f"{exc.details()}: is its executor watching this hub?") from exc
            raise _failure(f"--hub {args.hub}", exc) from exc
        print(f"queued: delivery {answer.delivery_id} of {answer.op_kind} op {answer.op_id} for node {answer.node}",
              file=sys.stderr)
        if not args.wait:
            print(f"{answer.delivery_id} (see pve-hub submit --wait, or GetOpStatus)")
            return 0
        routed = _wait(stub, args.cluster, answer.delivery_id, args.timeout)
    return _show(routed, as_json=args.json, timeout=args.timeout)


def _fetch(stub: object, cluster: str, delivery_id: str) -> pb.RoutedOp:
    answer = _call("op status", stub.GetOpStatus,  # type: ignore[attr-defined]
                   pb.GetOpStatusRequest(cluster=cluster, id=delivery_id))
    if len(answer.ops) != 1:
        raise Failed(f"the hub answered {len(answer.ops)} deliveries for {delivery_id}, not one")
    routed: pb.RoutedOp = answer.ops[0]
    return routed


def settled(routed: pb.RoutedOp) -> bool:
    """The node decided and, for an accepted op, its fate is final."""
    if routed.state in OPEN:
        return False
    return routed.state != "accepted" or routed.op.fate in SETTLED_FATES


def _wait(stub: object, cluster: str, delivery_id: str, timeout: float) -> pb.RoutedOp:
    deadline = time.monotonic() + timeout
    while True:
        routed = _fetch(stub, cluster, delivery_id)
        if settled(routed) or time.monotonic() >= deadline:
            return routed
        time.sleep(POLL)


def exit_code(routed: pb.RoutedOp) -> int:
    """0 ran ok (an op.revoke: revoked); 1 refused, revoked or failed; 3 not settled."""
    if not settled(routed):
        return EXIT_NOT_DONE
    if routed.state == "revoked":
        return 0
    if routed.state == "refused":
        return 1
    return 0 if routed.op.fate == "ran" and routed.op.outcome == "ok" else 1


def document(routed: pb.RoutedOp) -> dict[str, object]:
    """The outcome as JSON."""
    op = routed.op
    return {"delivery_id": routed.delivery_id, "node": routed.node, "op_id": routed.op_id, "kind": routed.op_kind,
            "state": routed.state, "reason": routed.reason or None, "detail": routed.detail or None,
            "fate": op.fate or None, "outcome": op.outcome or None, "upid": op.upid or None,
            "what_to_do": advice(routed.reason) if routed.reason else None, "exit_code": exit_code(routed)}


def lines(routed: pb.RoutedOp) -> list[str]:
    """The outcome in words."""
    head = f"{visible(routed.op_kind)} op {visible(routed.op_id)} on node {visible(routed.node)}"
    if routed.state in OPEN:
        return [f"{head}: {routed.state.upper()} (the node has not answered yet)"]
    if routed.state == "refused":
        return [f"{head}: REFUSED by the node: {visible(routed.reason)}: {visible(routed.detail)}",
                f"what to do: {advice(routed.reason)}"]
    if routed.state == "revoked":
        return [f"{head}: REVOKED: the op it names can never run"]
    op = routed.op
    if not op.fate:
        return [f"{head}: ACCEPTED by the node (its fate not reported yet)"]
    out = [f"{head}: {visible(op.fate.upper())}" + (f" {visible(op.outcome)}" if op.outcome else "")
           + (f": {visible(op.detail)}" if op.detail else "")]
    if op.upid:
        out.append(f"  Proxmox task {visible(op.upid)}")
    return out


def _show(routed: pb.RoutedOp, *, as_json: bool, timeout: float) -> int:
    code = exit_code(routed)
    if code == EXIT_NOT_DONE:
        print(f"pve-hub submit: still {routed.state}{f' ({routed.op.fate})' if routed.op.fate else ''} after "
              f"{timeout:g}s (--timeout)", file=sys.stderr)
    print(json.dumps(document(routed), indent=2, sort_keys=True) if as_json else "\n".join(lines(routed)))
    return code
