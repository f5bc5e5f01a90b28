"""What `pve-hub status` prints and the exit code it gives: the cluster at a glance, or one node's guests.

Exit codes are Terraform-like, as `pve-executor plan`'s: 0 every node in sync; 3 drift the executors are converging
(drifted, staged, failed and retried); 4 an operator is needed (an approval waiting, a refused or skipped guest, a
NACK, a stale node, a tick that fails: Proxmox or the planner unreachable, a desired state it cannot use). Text from
a node (guest names, reasons, values) is printed with control characters escaped: a node cannot forge lines here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from hub import fleet
from hub.v1 import hub_pb2 as pb

EXIT_IN_SYNC, EXIT_CONVERGING, EXIT_ATTENTION = 0, 3, 4
CONVERGING = frozenset({"drifted", "staged", "failed"})
ATTENTION = frozenset({"pending_approval", "refused", "skipped"})
QUIET = frozenset({"in_sync", "elsewhere"})  # guests `--node` counts without a line each
CONVERGING_TICKS = frozenset({"", "ok", "actions_failed"})  # a tick that ended otherwise did nothing
SHOWN = ("in_sync", "drifted", "pending_approval", "refused")  # the columns; other states are named when non-zero
ABSENT = "<absent>"


def printable(text: str) -> str:
    """``text`` with every control character escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def counts(node: pb.NodeStatus) -> dict[str, int]:
    """A node's guests by state name."""
    return {fleet.state_name(c.state): c.count for c in node.guests if fleet.state_name(c.state)}


def nacked(node: pb.NodeStatus) -> bool:
    """Its last verdict on a version was a NACK."""
    return bool(node.reported_version) and not node.ok


def exit_code(nodes: Iterable[pb.NodeStatus]) -> int:
    """0 in sync; 3 converging; 4 an operator is needed (see the module's docstring)."""
    code = EXIT_IN_SYNC
    for node in nodes:
        found = {state for state, count in counts(node).items() if count}
        if found & ATTENTION or nacked(node) or node.stale or node.tick_outcome not in CONVERGING_TICKS:
            return EXIT_ATTENTION
        if found & CONVERGING:
            code = EXIT_CONVERGING
    return code


def when(unix_ms: int) -> str:
    """A time as UTC ISO 8601, "-" for none."""
    if not unix_ms:
        return "-"
    return dt.datetime.fromtimestamp(unix_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(unix_ms: int, now: float) -> str:
    """How long ago: 42s, 7m, 3h, 2d."""
    seconds = max(0, int(now - unix_ms / 1000))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _notes(node: pb.NodeStatus, latest: int, now: float) -> list[str]:
    found = counts(node)
    notes = [f"{state} {count}" for state, count in found.items() if state not in SHOWN and count]
    if node.stale:
        notes.insert(0, f"STALE: no report for {age(node.last_report_unix_ms or node.last_seen_unix_ms, now)}")
    if node.tick_outcome not in CONVERGING_TICKS:
        notes.append(f"tick {printable(node.tick_outcome)}: {printable(node.tick_error)[:120]}")
    if node.reason:
        notes.append(printable(node.reason))
    if node.held_version < latest:
        notes.append("(behind)")
    if not node.last_report_unix_ms:
        notes.append("(no state report)")
    return notes


def render_cluster(cluster: str, answer: pb.StatusResponse, now: float) -> list[str]:
    """One line per node: held version, ACK/NACK, guests by state, last seen, what stands out."""
    latest = answer.latest_version
    lines = [f"cluster {printable(cluster)}: latest version {latest or 'none'}"]
    if not answer.nodes:
        return [*lines, "no node has watched or reported yet"]
    lines.append(f"{'NODE':28}  {'HELD':>5}  {'REPORT':9}  {'IN SYNC':>7}  {'DRIFTED':>7}  {'PENDING':>7}  "
                 f"{'REFUSED':>7}  {'LAST SEEN':26}  NOTES")
    for node in answer.nodes:
        verdict = "-" if not node.reported_version else f"{'ACK' if node.ok else 'NACK'} v{node.reported_version}"
        found = counts(node)
        seen = f"{when(node.last_seen_unix_ms)} ({age(node.last_seen_unix_ms, now)})" if node.last_seen_unix_ms \
            else "-"
        cells = "  ".join(f"{found.get(state, 0):>7}" for state in SHOWN)
        lines.append(f"{printable(node.node)[:28]:28}  {node.held_version:>5}  {verdict:9}  {cells}  {seen:26}  "
                     f"{', '.join(_notes(node, latest, now))}".rstrip())
    return lines


def _value(text: str, absent: bool) -> str:
    return ABSENT if absent else printable(repr(text))


def render_guest(guest: pb.GuestState) -> list[str]:
    """A guest's head line and one line per key that differs (declared against actual), approvals waiting."""
    state = fleet.state_name(guest.state).upper()
    why = ": ".join(part for part in (printable(guest.reason), printable(guest.detail)) if part)
    name = f" {printable(guest.name)}" if guest.name else ""
    lines = [f"  guest {guest.vmid}{name}: {state}{f' {why}' if why else ''}"]
    lines += [f"      {printable(d.key)}: declared {_value(d.declared, d.declared_absent)}, "
              f"actual {_value(d.actual, d.actual_absent)}" for d in guest.diffs]
    lines += [f"      waits for approval: {printable(p.op_kind)} [{printable(p.action_class)}] "
              f"rule {printable(p.rule)}, descriptor sha256 {p.descriptor_sha256}" for p in guest.pending]
    return lines


def render_node(cluster: str, answer: pb.GetNodeResponse, now: float) -> list[str]:
    """One node: its status, each guest that is not in sync (the rest counted) and its recent signed ops."""
    node = answer.status
    verdict = "no verdict yet" if not node.reported_version else \
        f"{'ACK' if node.ok else 'NACK'} v{node.reported_version}"
    lines = [f"node {printable(node.node)} (cluster {printable(cluster)}): holds version {node.held_version}, "
             f"{verdict}; last report {when(node.last_report_unix_ms)} ({age(node.last_report_unix_ms, now)} ago), "
             f"every {round(node.report_interval_seconds, 1):g}s; tick {printable(node.tick_outcome) or '-'}"]
    lines += [f"  {note}" for note in _notes(node, 0, now) if note != "(behind)"]
    quiet = [g for g in answer.guests if fleet.state_name(g.state) in QUIET]
    for guest in answer.guests:
        if fleet.state_name(guest.state) not in QUIET:
            lines += render_guest(guest)
    by_state = {name: sum(1 for g in quiet if fleet.state_name(g.state) == name) for name in sorted(QUIET)}
    lines.append("  " + ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in by_state.items()))
    if answer.ops:
        lines.append("  recent signed ops:")
        lines += [f"    {op.op_id}  guest {op.vmid}  {printable(op.op_kind)}  {printable(op.fate)}"
                  f"{f' ({printable(op.outcome)})' if op.outcome else ''}  {when(op.at_unix_ms)}  "
                  f"{printable(op.detail)[:100]}" for op in answer.ops]
    return lines


def node_json(node: pb.NodeStatus, now: float) -> dict[str, Any]:
    """A node's status line as JSON."""
    return {"node": node.node, "held_version": node.held_version,
            "report": None if not node.reported_version else ("ACK" if node.ok else "NACK"),
            "reported_version": node.reported_version, "reason": node.reason, "audience": node.audience,
            "last_seen": when(node.last_seen_unix_ms) if node.last_seen_unix_ms else None,
            "last_report": when(node.last_report_unix_ms) if node.last_report_unix_ms else None,
            "report_age_seconds": round(now - node.last_report_unix_ms / 1000, 3) if node.last_report_unix_ms
            else None, "report_interval_seconds": node.report_interval_seconds, "stale": node.stale,
            "tick_outcome": node.tick_outcome, "tick_error": node.tick_error, "guests": counts(node)}


def guest_json(guest: pb.GuestState) -> dict[str, Any]:
    """A guest as JSON (an absent value: null)."""
    return {"vmid": guest.vmid, "name": guest.name, "type": guest.type, "state": fleet.state_name(guest.state),
            "reason": guest.reason, "detail": guest.detail,
            "declared_run_state": guest.declared_run_state, "actual_run_state": guest.actual_run_state,
            "diffs": [{"key": d.key, "declared": None if d.declared_absent else d.declared,
                       "actual": None if d.actual_absent else d.actual} for d in guest.diffs],
            "pending": [{"op_kind": p.op_kind, "class": p.action_class, "rule": p.rule, "reasons": list(p.reasons),
                         "descriptor_sha256": p.descriptor_sha256, "audience": p.audience} for p in guest.pending]}


def op_json(op: pb.OpReport) -> dict[str, Any]:
    """A signed op as JSON."""
    return {"op_id": op.op_id, "vmid": op.vmid, "op_kind": op.op_kind, "fate": op.fate, "outcome": op.outcome,
            "detail": op.detail, "upid": op.upid, "at": when(op.at_unix_ms), "signers": list(op.signers),
            "payload_sha256": op.payload_sha256}


def cluster_json(cluster: str, answer: pb.StatusResponse, now: float) -> dict[str, Any]:
    """The cluster at a glance as JSON, with the exit code it gives."""
    return {"cluster": cluster, "latest_version": answer.latest_version,
            "nodes": [node_json(n, now) for n in answer.nodes], "exit_code": exit_code(answer.nodes)}


def node_detail_json(cluster: str, answer: pb.GetNodeResponse, now: float) -> dict[str, Any]:
    """One node as JSON, with the exit code it gives."""
    return {"cluster": cluster, "node": node_json(answer.status, now),
            "guests": [guest_json(g) for g in answer.guests], "ops": [op_json(o) for o in answer.ops],
            "exit_code": exit_code([answer.status])}

