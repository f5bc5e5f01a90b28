"""What became of each signed op (``GetOpStatus``, ``pve-executor op status``): read from the journal and the desk.

A signed op is journaled under its own op_id (begun, task, ended; a refusal names it too). The op id is the
signer's choice: another op (another payload, so another nonce) may be signed under it, so an op is known by
its op id and payload sha256 and every op under an id is answered. Its fate, first match wins: begun and not
ended -> RUNNING; ended -> RAN (its outcome); accepted by the desk and not begun -> WAITING (queued in its
lane, or held back by a lock); a refusal -> REFUSED (REVOKED for a veto). The recent records are a window;
for one op id the journal's own memory (``remembered``: ops in flight, spent nonces, the last refusal per key,
kept for its whole retention) answers what the window lost. An op refused before a signature held is unknown."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from executor.gate.decisions import SPENDING
from executor.gate.journalport import JournalReads
from executor.gate.steps import refused_op
from executor.signed.auth import revokers
from executor.signed.desk import WaitingOp
from executor.v1 import executor_pb2 as pb
from journal import Begun, Ended, Outcome, Record, RefusalRecord, TaskStarted

OP_REVOKED = "OP_REVOKED"
REVOKE = "op.revoke"


TraceKey = tuple[str, str]  # (op id, payload sha256): the op id is the signer's choice, another op may reuse it


@dataclass(slots=True)
class _Trace:
    """What the journal says of one signed op, oldest record first."""

    op_id: str
    sha: str = ""  # its payload's sha256 ("" when no record named it: a veto only, or a journal from before)
    vmid: int = 0
    kind: str = ""
    begun: bool = False
    ended: Ended | None = None
    upid: str = ""
    at: float = 0.0
    signers: list[str] = field(default_factory=list)
    refusal: RefusalRecord | None = None
    veto: RefusalRecord | None = None  # a journaled op.revoke naming it: final, whatever the lane said after


def _signed(record: Begun) -> TraceKey | None:
    """The signed op a begun record is for, (op id, payload sha256) (None: the executor's own action)."""
    op = record.payload.get("op")
    return (str(op["id"]), str(op.get("sha256", ""))) if isinstance(op, dict) and op.get("id") else None


def _open(found: dict[TraceKey, _Trace], key: TraceKey, *, revoked: bool = False) -> _Trace:
    """The trace of ``key``, new or found. A first record naming the op's hash takes over a trace of its id that
    named none and never began (a journal from before the hash was recorded), or only a veto when it is the
    veto's refusal (``revoked``): an op under that id the veto did not stop is another op."""
    if key in found:
        return found[key]
    blank = found.get((key[0], ""))
    if key[1] and blank is not None and not blank.begun and (blank.veto is None or revoked):
        del found[(key[0], "")]
        blank.sha = key[1]
        found[key] = blank
        return blank
    return found.setdefault(key, _Trace(op_id=key[0], sha=key[1]))


def _refused(found: dict[TraceKey, _Trace], record: RefusalRecord) -> _Trace | None:
    """Fold a refusal naming a signed op into its trace (None: nothing to fold)."""
    op_id = record.op_id or ""
    if record.reason == OP_REVOKED and record.kind == REVOKE:  # a veto names the op id, not the hash
        vetoed = [t for (op, _), t in found.items() if op == op_id and not t.begun]  # none of them runs after
        for trace in vetoed or [_open(found, (op_id, ""))]:
            trace.vmid, trace.veto, trace.refusal, trace.at = trace.vmid or record.vmid, record, record, record.at
        return None
    parsed = refused_op(record.key or "", op_id)
    if parsed is None:  # written before refusals named the hash: the latest op under the id
        under = [key for key in found if key[0] == op_id]
        trace = found[under[-1]] if under else _open(found, (op_id, ""))
    else:
        sha, replay = parsed
        trace = _open(found, (op_id, sha), revoked=record.reason == OP_REVOKED)
        if replay and (trace.begun or trace.refusal is not None):
            return None  # a second submission refused: the op's own fate stands
    trace.vmid = trace.vmid or record.vmid
    trace.kind = trace.kind or record.kind
    trace.refusal = record
    return trace


def traces(records: Iterable[Record]) -> dict[TraceKey, _Trace]:
    """Each signed op's trace in ``records`` by (op id, payload sha256), in order of first appearance."""
    found: dict[TraceKey, _Trace] = {}
    journal_ids: dict[str, TraceKey] = {}  # journal id -> the signed op begun under it last (one at a time)
    for record in records:
        match record:
            case Begun():
                signed = _signed(record)
                if signed is None:
                    continue
                journal_ids[record.op_id] = signed
                trace = _open(found, signed)
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
                folded = _refused(found, record)
                if folded is None:
                    continue
                trace = folded
            case _:
                continue
        trace.at = record.at
    return found


def remembered(op_id: str, journal: JournalReads) -> list[Record]:
    """What the journal keeps of the ops under ``op_id`` for its whole retention, as records ``traces`` reads.

    The recent records are a window a busy node pushes an op out of within minutes; the journal keeps, by an
    index, every op in flight, each op's spent nonce with its outcome, and the last refusal per key. A nonce
    spent with no operation (FAILED, and the op's own last refusal journaled at or after it, or for the guest's
    state) is a refusal, not a run. What no longer exists: the task's UPID and the error of an op that ended,
    and the guest and kind of one that ran with no refusal before; a nonce names only the first 32 hex digits
    of the payload hash.
    """
    refusals = journal.refusals_of(op_id)
    flights = [f for f in journal.in_flight() if isinstance(op := f.payload.get("op"), dict) and op.get("id") == op_id]
    groups: list[tuple[float, list[Record]]] = [(r.at, [r]) for r in refusals]
    for flight in flights:
        group: list[Record] = [Begun(op_id=flight.op_id, vmid=flight.vmid, kind=flight.kind, payload=flight.payload,
                                     key=flight.key, at=flight.begun_at)]
        if flight.upid:
            group.append(TaskStarted(op_id=flight.op_id, upid=flight.upid, at=flight.begun_at))
        groups.append((flight.begun_at, group))
    for key, state in journal.keys_of(op_id).items():
        if state.outcome is None:
            continue  # in flight: read above, with its payload
        prefix = key.rpartition(":")[2]
        own = [(r, parsed[0]) for r in refusals if (parsed := refused_op(r.key or "", op_id)) is not None
               and parsed[0].startswith(prefix) and not parsed[1]]
        if state.outcome is Outcome.FAILED and own and (own[-1][0].reason in SPENDING
                                                        or own[-1][0].at >= state.at):
            continue  # burned: its refusal (journaled right after, or one for the guest's state) tells its fate
        facts, full = own[-1] if own else (None, prefix)
        begun = Begun(op_id=op_id, vmid=facts.vmid if facts else 0, kind=facts.kind if facts else "", key=key,
                      payload={"op": {"id": op_id, "sha256": full, "kind": facts.kind if facts else ""}},
                      at=state.at)
        groups.append((state.at, [begun, Ended(op_id=op_id, outcome=state.outcome, error="", at=state.at)]))
    groups.sort(key=lambda item: item[0])
    return [record for _, group in groups for record in group]


def _known(found: Mapping[TraceKey, _Trace], key: TraceKey) -> bool:
    """Whether ``found`` has the op ``key`` names (a nonce's hash is a prefix of the full one)."""
    op_id, sha = key
    return any(op == op_id and (have == sha or (sha and have.startswith(sha)) or (have and sha.startswith(have)))
               for op, have in found)


def _reason(name: str) -> pb.RefusalReason.ValueType:
    try:
        return pb.RefusalReason.Value(f"REFUSAL_REASON_{name}")
    except ValueError:
        return pb.REFUSAL_REASON_UNSPECIFIED


def _journaled(trace: _Trace) -> pb.OpStatus:
    status = pb.OpStatus(op_id=trace.op_id, vmid=trace.vmid, op_kind=trace.kind, upid=trace.upid,
                         at_unix_ms=int(trace.at * 1000), signers=trace.signers, payload_sha256=trace.sha)
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
                       not_after=op.not_after, signers=list(op.signers), payload_sha256=op.payload_sha256,
                       at_unix_ms=int(trace.at * 1000) if trace is not None else 0)


def fates(records: Sequence[Record], waiting: Sequence[WaitingOp], busy: Mapping[int, int],
          older: Sequence[Record] = ()) -> list[pb.OpStatus]:
    """Every signed op the journal window or the desk knows, oldest first, with its fate; one entry per op (op id
    and payload hash), so every op under a reused op id is answered. ``older``: what the journal keeps of ops the
    window lost (``remembered``): each op it names that the window does not, first."""
    window = traces(records)
    found = {key: trace for key, trace in traces(older).items() if not _known(window, key)}
    found.update(window)
    held = {(op.op_id, op.payload_sha256): op for op in waiting}
    out = []
    for key, trace in found.items():
        if not trace.begun and key in held:
            out.append(_waiting(held.pop(key), trace, busy.get(trace.vmid, 0)))
        else:
            held.pop(key, None)
            out.append(_journaled(trace))
    out += [_waiting(op, None, busy.get(op.vmid, 0)) for op in held.values()]
    return out


__all__ = ["fates", "remembered", "traces"]
