"""``op status [OP_ID] [--wait]``: what became of a signed op (GetOpStatus), and what to do about it.

An accepted op is only admitted: its guest's lane still checks it against the guest as it is when its
turn comes (protection, lock, config digest, expiry). This command shows each op's fate: WAITING
(why), RUNNING, RAN (outcome, Proxmox task), REFUSED (reason, what to do) or REVOKED. Exit status:
0 ran ok; 1 refused, revoked, failed or unknown; 3 still waiting or running (after ``--timeout``
with ``--wait``).

The op id is the signers' choice, and another op (another payload) may be signed under it: an id can name
several ops, each told apart by its payload sha256. All are shown; ``--sha256 HEX`` keeps the op(s) whose
payload hash starts with HEX (``op submit --wait`` keeps the one it submitted). The exit status is then of
every op shown: 3 while any still waits or runs, 0 only when every one ran ok, else 1: a second op under an
id never makes the first look done."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence

import grpc

from executor.v1 import executor_pb2 as pb
from executor.v1 import executor_pb2_grpc as pb_grpc
from opctl.advice import ADVICE, advice
from opctl.doc import OpError, when

EXIT_NOT_DONE = 3
__all__ = ["ADVICE", "advice"]  # re-exported: opctl.api and the tests read them here
OP_ID = re.compile(r"[0-9a-f]{32}")
SHA256 = re.compile(r"[0-9a-f]{8,64}")
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


def exit_code_of(statuses: Sequence[pb.OpStatus]) -> int:
    """The exit status of every op shown: 3 while one is not settled, 0 when every one ran ok, else 1."""
    codes = {exit_code(status) for status in statuses}
    return EXIT_NOT_DONE if EXIT_NOT_DONE in codes else (0 if codes == {0} else 1)


def document(status: pb.OpStatus) -> dict[str, object]:
    """One op's fate as JSON (``--json``)."""
    reason = reason_of(status)
    return {"op_id": status.op_id, "vmid": status.vmid, "kind": status.op_kind,
            "fate": FATES.get(status.fate, "UNKNOWN"), "detail": status.detail, "reason": reason or None,
            "outcome": status.outcome or None, "upid": status.upid or None,
            "at_unix_ms": status.at_unix_ms or None, "not_after": status.not_after or None,
            "signers": list(status.signers), "what_to_do": advice(reason, status.vmid) if reason else None,
            "payload_sha256": status.payload_sha256 or None, "exit_code": exit_code(status)}


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


def lines(status: pb.OpStatus, *, sha: bool = False) -> list[str]:
    """One op's fate in words: the headline, then (``sha``: its payload hash) the task, the time and what to do."""
    out = [_headline(status)]
    if sha:
        out.append(f"  payload sha256 {status.payload_sha256 or 'not recorded'}")
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


def show(statuses: Sequence[pb.OpStatus], *, as_json: bool) -> int:
    """Print the fate of the ops under one id (one: as before; several: each with its payload hash); the exit code."""
    if as_json:
        docs = [document(status) for status in statuses]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2, sort_keys=True))
    else:
        if len(statuses) > 1:
            print(f"op id {statuses[0].op_id} names {len(statuses)} signed ops (each its own payload):")
        print("\n".join(line for status in statuses for line in lines(status, sha=len(statuses) > 1)))
    return exit_code_of(statuses)


def fetch(api: pb_grpc.ExecutorServiceStub, op_id: str, timeout: float, sha256: str = "") -> list[pb.OpStatus]:
    """GetOpStatus for the ops under one id (``sha256``: those whose payload hash starts with it; a hash the
    journal keeps only 32 digits of matches on those); OpError, exit 1, when the executor has no trace of one."""
    try:
        response: pb.GetOpStatusResponse = api.GetOpStatus(pb.GetOpStatusRequest(op_id=op_id), timeout=timeout)
    except grpc.RpcError as exc:
        if getattr(exc, "code", lambda: None)() == grpc.StatusCode.NOT_FOUND:
            raise OpError(str(getattr(exc, "details", lambda: "")()) or f"op {op_id}: not found", code=1) from exc
        raise
    found = [status for status in response.ops if not sha256 or _same(status.payload_sha256, sha256)]
    if not found:
        raise OpError(f"op {op_id}: no op under this id has payload sha256 {sha256}... (it names "
                      f"{', '.join(s.payload_sha256[:16] or '?' for s in response.ops)}...)", code=1)
    return found


def _same(have: str, wanted: str) -> bool:
    """Whether payload hash ``have`` (maybe only its first 32 digits) is the one ``wanted`` (maybe a prefix) names."""
    return bool(have) and (have.startswith(wanted) or wanted.startswith(have))


def wait(api: pb_grpc.ExecutorServiceStub, op_id: str, *, timeout: float, call_timeout: float,
         sha256: str = "") -> list[pb.OpStatus]:
    """Poll the ops' fates until every one is settled or ``timeout`` seconds passed; the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        statuses = fetch(api, op_id, max(1.0, min(call_timeout, left)), sha256)
        if all(status.fate in SETTLED for status in statuses) or left <= 0:
            return statuses
        time.sleep(min(POLL, max(0.0, left)))


def report(args: argparse.Namespace, api: pb_grpc.ExecutorServiceStub, op_id: str, sha256: str = "") -> int:
    """The fate of the op(s) under ``op_id`` now, or once settled with ``--wait``; printed; the exit code.

    ``sha256``: only the op with that payload hash (``op submit --wait``: the one it submitted; ``op status``:
    ``--sha256``).
    """
    if args.wait:
        statuses = wait(api, op_id, timeout=args.wait_timeout, call_timeout=args.timeout, sha256=sha256)
        open_ = [FATES.get(status.fate, "UNKNOWN") for status in statuses if status.fate not in SETTLED]
        if open_:
            print(f"{args.prog} op status: still {', '.join(open_)} after {args.wait_timeout:g}s "
                  f"(--timeout)", file=sys.stderr)
    else:
        statuses = fetch(api, op_id, args.timeout, sha256)
    return show(statuses, as_json=args.json)


def status(args: argparse.Namespace) -> int:
    """``op status [OP_ID]``: one op's fate (``--wait``: once settled), or the most recent signed ops."""
    from opctl.api import stub  # noqa: PLC0415 - api imports this module for submit --wait

    if args.op_id and not OP_ID.fullmatch(args.op_id):
        raise OpError(f"OP_ID {args.op_id[:40]!r}: give the 32 lowercase hex id op sign and op submit printed")
    sha256 = (getattr(args, "sha256", "") or "").lower()
    if sha256 and not (args.op_id and SHA256.fullmatch(sha256)):
        raise OpError(f"--sha256 {sha256[:70]!r}: with OP_ID, 8 to 64 hex digits of the payload sha256 op status "
                      "printed" if args.op_id else "--sha256: give OP_ID too")
    with stub(args) as api:
        if args.op_id:
            return report(args, api, args.op_id, sha256)
        response = api.GetOpStatus(pb.GetOpStatusRequest(limit=args.limit), timeout=args.timeout)
    if args.json:
        print(json.dumps([document(s) for s in response.ops], indent=2, sort_keys=True))
    elif not response.ops:
        print("no signed op in the journal's recent records")
    for one in response.ops if not args.json else ():
        print(_headline(one))
    return 0
