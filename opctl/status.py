"""``op status [OP_ID] [--wait]``: what became of a signed op (GetOpStatus), and what to do about it.

An accepted op is only admitted: its guest's lane still checks it against the guest as it is when its
turn comes (protection, lock, config digest, expiry). This command shows each op's fate: WAITING
(why), RUNNING, RAN (outcome, Proxmox task), REFUSED (reason, what to do) or REVOKED. Exit status:
0 ran ok; 1 refused, revoked, failed or unknown; 3 still waiting or running (after ``--timeout``
with ``--wait``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import grpc

from executor.v1 import executor_pb2 as pb
from executor.v1 import executor_pb2_grpc as pb_grpc
from opctl.advice import ADVICE, advice
from opctl.doc import OpError, when

EXIT_NOT_DONE = 3
__all__ = ["ADVICE", "advice"]  # re-exported: opctl.api and the tests read them here
OP_ID = re.compile(r"[0-9a-f]{32}")
POLL = 0.25  # seconds between GetOpStatus calls while waiting (it only reads memory)
FATES = {pb.OP_FATE_WAITING: "WAITING", pb.OP_FATE_RUNNING: "RUNNING", pb.OP_FATE_RAN: "RAN",
         pb.OP_FATE_REFUSED: "REFUSED", pb.OP_FATE_REVOKED: "REVOKED"}
SETTLED = frozenset({pb.OP_FATE_RAN, pb.OP_FATE_REFUSED, pb.OP_FATE_REVOKED})


def reason_of(status: pb.OpStatus) -> str:
    """The refusal's reason name (``PROTECTED``), empty when none."""
    if status.reason == pb.REFUSAL_REASON_UNSPECIFIED:
        return ""
    return pb.RefusalReason.Name(status.reason).removeprefix("REFUSAL_REASON_")


def exit_code(status: pb.OpStatus) -> int:
    """0 ran ok; 1 refused, revoked or ran without success; 3 not settled yet."""
    if status.fate not in SETTLED:
        return EXIT_NOT_DONE
    return 0 if status.fate == pb.OP_FATE_RAN and status.outcome == "ok" else 1


def document(status: pb.OpStatus) -> dict[str, object]:
    """One op's fate as JSON (``--json``)."""
    reason = reason_of(status)
    return {"op_id": status.op_id, "vmid": status.vmid, "kind": status.op_kind,
            "fate": FATES.get(status.fate, "UNKNOWN"), "detail": status.detail, "reason": reason or None,
            "outcome": status.outcome or None, "upid": status.upid or None,
            "at_unix_ms": status.at_unix_ms or None, "not_after": status.not_after or None,
            "signers": list(status.signers), "what_to_do": advice(reason, status.vmid) if reason else None,
            "exit_code": exit_code(status)}


def _headline(status: pb.OpStatus) -> str:
    fate = FATES.get(status.fate, "UNKNOWN")
    what = f"{status.op_kind or 'op'} on guest {status.vmid}" if status.vmid else (status.op_kind or "op")
    tail = {
        pb.OP_FATE_WAITING: f": {status.detail}",
        pb.OP_FATE_RUNNING: f": {status.detail}",
        pb.OP_FATE_RAN: f" {status.outcome}" + (f": {status.detail}" if status.detail else ""),
        pb.OP_FATE_REFUSED: f" {reason_of(status)}: {status.detail}",
        pb.OP_FATE_REVOKED: f": {status.detail}",
    }.get(status.fate, "")
    return f"op {status.op_id} ({what}): {fate}{tail}"


def lines(status: pb.OpStatus) -> list[str]:
    """One op's fate in words: the headline, then the task, the time and what to do."""
    out = [_headline(status)]
    if status.upid:
        out.append(f"  Proxmox task {status.upid}")
    if status.fate == pb.OP_FATE_WAITING and status.not_after:
        out.append(f"  dropped unrun if still waiting at {when(status.not_after)}")
    elif status.at_unix_ms:
        out.append(f"  last record {when(status.at_unix_ms / 1000)}")
    reason = reason_of(status)
    if status.fate == pb.OP_FATE_REFUSED and reason:
        out.append(f"  what to do: {advice(reason, status.vmid)}")
    return out


def show(status: pb.OpStatus, *, as_json: bool) -> int:
    """Print one op's fate; its exit code."""
    print(json.dumps(document(status), indent=2, sort_keys=True) if as_json else "\n".join(lines(status)))
    return exit_code(status)


def fetch(api: pb_grpc.ExecutorServiceStub, op_id: str, timeout: float) -> pb.OpStatus:
    """GetOpStatus for one op (OpError, exit 1, when the executor has no trace of it)."""
    try:
        response: pb.GetOpStatusResponse = api.GetOpStatus(pb.GetOpStatusRequest(op_id=op_id), timeout=timeout)
    except grpc.RpcError as exc:
        if getattr(exc, "code", lambda: None)() == grpc.StatusCode.NOT_FOUND:
            raise OpError(str(getattr(exc, "details", lambda: "")()) or f"op {op_id}: not found", code=1) from exc
        raise
    if len(response.ops) != 1:
        raise OpError(f"the executor answered {len(response.ops)} ops for op {op_id}, not one", code=1)
    return response.ops[0]


def wait(api: pb_grpc.ExecutorServiceStub, op_id: str, *, timeout: float, call_timeout: float) -> pb.OpStatus:
    """Poll the op's fate until it is settled or ``timeout`` seconds passed; the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        status = fetch(api, op_id, max(1.0, min(call_timeout, left)))
        if status.fate in SETTLED or left <= 0:
            return status
        time.sleep(min(POLL, max(0.0, left)))


def report(args: argparse.Namespace, api: pb_grpc.ExecutorServiceStub, op_id: str) -> int:
    """The op's fate now, or once settled with ``--wait``; printed; its exit code."""
    if args.wait:
        status = wait(api, op_id, timeout=args.wait_timeout, call_timeout=args.timeout)
        if status.fate not in SETTLED:
            print(f"{args.prog} op status: still {FATES.get(status.fate, 'UNKNOWN')} after {args.wait_timeout:g}s "
                  f"(--timeout)", file=sys.stderr)
    else:
        status = fetch(api, op_id, args.timeout)
    return show(status, as_json=args.json)


def status(args: argparse.Namespace) -> int:
    """``op status [OP_ID]``: one op's fate (``--wait``: once settled), or the most recent signed ops."""
    from opctl.api import stub  # noqa: PLC0415 - api imports this module for submit --wait

    if args.op_id and not OP_ID.fullmatch(args.op_id):
        raise OpError(f"OP_ID {args.op_id[:40]!r}: give the 32 lowercase hex id op sign and op submit printed")
    with stub(args) as api:
        if args.op_id:
            return report(args, api, args.op_id)
        response = api.GetOpStatus(pb.GetOpStatusRequest(limit=args.limit), timeout=args.timeout)
    if args.json:
        print(json.dumps([document(s) for s in response.ops], indent=2, sort_keys=True))
    elif not response.ops:
        print("no signed op in the journal's recent records")
    for one in response.ops if not args.json else ():
        print(_headline(one))
    return 0
