"""What became of each signed op (``GetOpStatus``, ``pve-executor op status``): read from the journal and the desk.

A signed op is journaled under its own op_id (begun, task, ended; a refusal names it too). Its fate,
first match wins: begun and not ended -> RUNNING; ended -> RAN (its outcome); accepted by the desk and
not begun -> WAITING (queued in its lane, or held back by a lock); a refusal -> REFUSED (REVOKED for a
veto). An op whose records were all compacted away, or that was refused before a signature held, is
unknown here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from executor.signed.auth import revokers
from executor.signed.desk import WaitingOp
from executor.v1 import executor_pb2 as pb
from journal import Begun, Ended, Record, RefusalRecord, TaskStarted

OP_REVOKED = "OP_REVOKED"
REVOKE = "op.revoke"


@dataclass(slots=True)
class _Trace:
    """What the journal says of one signed op, oldest record first."""

    op_id: str
    vmid: int = 0
    kind: str = ""
    begun: bool = False
    ended: Ended | None = None
    upid: str = ""
    at: float = 0.0
    signers: list[str] = field(default_factory=list)
    refusal: RefusalRecord | None = None
    veto: RefusalRecord | None = None  # a journaled op.revoke naming it: final, whatever the lane said after
    ran_begun: bool = False  # a begun record came after the last refusal (a LOCKED retry that then ran)


def _signed_id(record: Begun) -> str | None:
    """The signed op a begun record is for (None: the executor's own action)."""
    op = record.payload.get("op")
    return str(op["id"]) if isinstance(op, dict) and op.get("id") else None


def traces(records: Iterable[Record]) -> dict[str, _Trace]:
    """Each signed op's trace in ``records``, in order of first appearance."""
    found: dict[str, _Trace] = {}
    journal_ids: dict[str, str] = {}  # journal id -> signed id (a journal written before the ids were one)
    for record in records:
        match record:
            case Begun():
                signed = _signed_id(record)
                if signed is None:
                    continue
                journal_ids[record.op_id] = signed
                trace = found.setdefault(signed, _Trace(op_id=signed))
                op = record.payload["op"]
                trace.vmid, trace.kind, trace.begun, trace.ended, trace.upid = (
                    record.vmid, str(op.get("kind", record.kind)), True, None, "")
                trace.signers = [str(s) for s in op.get("signers", [])]
            case TaskStarted() if record.op_id in journal_ids:
                trace = found[journal_ids[record.op_id]]
                trace.upid = record.upid
            case Ended() if record.op_id in journal_ids:
                trace = found[journal_ids[record.op_id]]
                trace.ended = record
            case RefusalRecord() if record.op_id and not (record.key or "").startswith("act:"):  # act: "it ran"
                trace = found.setdefault(record.op_id, _Trace(op_id=record.op_id))
                trace.vmid = trace.vmid or record.vmid
                if record.reason != OP_REVOKED:  # a veto's record names the op.revoke, not the op it vetoes
                    trace.kind = trace.kind or record.kind
                elif record.kind == REVOKE:
                    trace.veto = record
                trace.refusal = record
            case _:
                continue
        trace.at = record.at
    return found


def _reason(name: str) -> pb.RefusalReason.ValueType:
    try:
        return pb.RefusalReason.Value(f"REFUSAL_REASON_{name}")
    except ValueError:
        return pb.REFUSAL_REASON_UNSPECIFIED


def _journaled(trace: _Trace) -> pb.OpStatus:
    status = pb.OpStatus(op_id=trace.op_id, vmid=trace.vmid, op_kind=trace.kind, upid=trace.upid,
                         at_unix_ms=int(trace.at * 1000), signers=trace.signers)
    if trace.begun and trace.ended is None:
        status.fate = pb.OP_FATE_RUNNING
        status.detail = "its Proxmox call has no definite answer yet" if not trace.upid else "its task is running"
    elif trace.begun and trace.ended is not None:
        status.fate, status.outcome, status.detail = pb.OP_FATE_RAN, trace.ended.outcome.value, trace.ended.error
    elif trace.veto is not None:
        by = ", ".join(revokers(trace.veto.detail)) or "a key"
        status.fate, status.reason = pb.OP_FATE_REVOKED, pb.REFUSAL_REASON_OP_REVOKED
        status.detail = f"vetoed by a signed op.revoke (signed by {by}): it never runs"
    elif trace.refusal is not None:
        revoked = trace.refusal.reason == OP_REVOKED
        status.fate = pb.OP_FATE_REVOKED if revoked else pb.OP_FATE_REFUSED
        status.reason, status.detail = _reason(trace.refusal.reason), trace.refusal.detail
    return status


def _waiting(op: WaitingOp, trace: _Trace | None, depth: int) -> pb.OpStatus:
    if op.locked:  # the desk's word: a lock held it back and it waits for the next tick's retry
        last = trace.refusal if trace is not None else None
        held = last.detail if last is not None and last.reason == "LOCKED" else f"guest {op.vmid} is locked"
        why = held if "retried" in held else f"{held}: retried each tick until it expires"
    else:
        ahead = max(0, depth - 1)  # the lane's depth counts this op's own job
        why = f"queued in guest {op.vmid}'s lane behind {ahead} other job(s)"
    return pb.OpStatus(op_id=op.op_id, vmid=op.vmid, op_kind=op.kind, fate=pb.OP_FATE_WAITING, detail=why,
                       not_after=op.not_after, signers=list(op.signers),
                       at_unix_ms=int(trace.at * 1000) if trace is not None else 0)


def fates(records: Sequence[Record], waiting: Sequence[WaitingOp], busy: Mapping[int, int]) -> list[pb.OpStatus]:
    """Every signed op the journal window or the desk knows, oldest first, with its fate."""
    found = traces(records)
    held = {op.op_id: op for op in waiting}
    out = []
    for op_id, trace in found.items():
        if not trace.begun and op_id in held:
            out.append(_waiting(held.pop(op_id), trace, busy.get(trace.vmid, 0)))
        else:
            held.pop(op_id, None)
            out.append(_journaled(trace))
    out += [_waiting(op, None, busy.get(op.vmid, 0)) for op in held.values()]
    return out


__all__ = ["fates", "traces"]
