"""Each page: what it reads from the fleet, as a template name and its context. ``NotFound`` for what is not there."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hub.approvals import sign_command
from hub.store.model import MAX_HISTORY, check_name
from hub.v1 import hub_pb2 as pb
from hub.web import desired
from hub.web.fleet import Fleet, now_ms, state_name

HISTORY_PAGE = 50  # versions on the history page
RECENT_OPS = 20  # operations on the overview
MAX_CHANGES = 1000  # guests listed in a version's diff (a first 10,000-guest version adds every one)
STATE_ORDER = tuple(state_name(v) for v in pb.SyncState.values() if v)  # in_sync, drifted, ... as the enum
# States whose report lists every key that differs: a declared key it does not list is as declared.
COMPARED = frozenset({"in_sync", "drifted", "staged", "refused", "pending_approval"})
SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)


class NotFound(Exception):  # noqa: N818 (the HTTP status it becomes)
    """What the URL names is not there (404), in words."""


@dataclass(frozen=True, slots=True)
class Page:
    """A template to render and its context."""

    template: str
    context: dict[str, Any] = field(default_factory=dict)


def _cluster(fleet: Fleet, cluster: str) -> str:
    try:
        check_name("cluster", cluster)
    except ValueError as exc:
        raise NotFound(f"no cluster {cluster[:80]!r}") from exc
    if cluster not in fleet.clusters():
        raise NotFound(f"no cluster {cluster[:80]!r}")
    return cluster


def counts(status: pb.NodeStatus) -> dict[str, int]:
    """A node's guests by sync state name (states it has none of are left out)."""
    return {state_name(c.state): int(c.count) for c in status.guests if c.count}


def index(fleet: Fleet) -> Page:
    """Every cluster the hub holds."""
    return Page("index.html", {"clusters": fleet.clusters()})


def overview(fleet: Fleet, cluster: str) -> Page:
    """The cluster at a glance: its nodes, guests by sync state, pending approvals, recent versions and ops."""
    _cluster(fleet, cluster)
    statuses = fleet.statuses(cluster)
    totals: Counter[str] = Counter()
    for status in statuses:  # a guest is elsewhere on every node but its own: counted there only
        totals.update({name: count for name, count in counts(status).items() if name != "elsewhere"})
    ops = [(s.node, op) for s in statuses for op in fleet.ops(cluster, s.node)]
    ops.sort(key=lambda pair: pair[1].at_unix_ms, reverse=True)
    return Page("overview.html", {
        "cluster": cluster, "latest": fleet.latest(cluster), "nodes": statuses,
        "totals": [(name, totals[name]) for name in STATE_ORDER if totals[name]],
        "pending": fleet.pending(cluster), "history": fleet.read(fleet.store.history, cluster, 5),
        "ops": ops[:RECENT_OPS]})


def _node(fleet: Fleet, cluster: str, node: str) -> pb.GetNodeResponse:
    _cluster(fleet, cluster)
    found = fleet.node(cluster, node)
    if found is None:
        raise NotFound(f"no node {node[:140]!r} in cluster {cluster}")
    return found


def node(fleet: Fleet, cluster: str, name: str) -> Page:
    """One node: its status, every guest with its sync state and differing keys, its recent operations."""
    found = _node(fleet, cluster, name)
    return Page("node.html", {"cluster": cluster, "latest": fleet.latest(cluster), "node": found.status,
                              "guests": list(found.guests), "ops": [(name, op) for op in reversed(found.ops)]})


def guest(fleet: Fleet, cluster: str, name: str, vmid_text: str) -> Page:
    """One guest: declared against actual key by key, the reason, what waits for approval, its operations."""
    found = _node(fleet, cluster, name)
    vmid = int(vmid_text) if vmid_text.isdigit() and len(vmid_text) < 10 else -1
    guests = [g for g in found.guests if g.vmid == vmid]
    if not guests:
        raise NotFound(f"no guest {vmid_text[:20]!r} on node {name}")
    latest = fleet.read(fleet.store.get, cluster)
    declared = desired.of_version(latest) if latest else None
    keys = declared.guests.get(vmid, {}) if declared else {}
    differing = {d.key for d in guests[0].diffs}
    waiting = fleet.pending(cluster)
    return Page("guest.html", {
        "cluster": cluster, "node": found.status, "guest": guests[0],
        "declared": [(k, v) for k, v in sorted(keys.items()) if k not in differing and k != "state"],
        "compared": state_name(guests[0].state) in COMPARED,
        "version": latest.version if latest else 0,
        "pending": [p for p in waiting if p.node == name and p.vmid == vmid], "commands": commands(cluster, waiting),
        "ops": [(name, op) for op in reversed(found.ops) if op.vmid == vmid]})


@dataclass(frozen=True, slots=True)
class Commands:
    """How to sign one pending approval: through the hub (as ``pve-hub pending`` prints it; empty when the node
    reported a descriptor sha256 that is not one, so nothing it sent reaches a shell) and on the node itself (as
    ``pve-executor pending`` prints it there)."""

    hub: str
    node: str


def commands(cluster: str, pending: list[pb.PendingApproval]) -> dict[tuple[str, int, str, str], Commands]:
    """The commands that sign each pending approval. ``pve-executor pending`` numbers a node's entries from 1 by
    vmid, then op kind."""
    numbered: Counter[str] = Counter()
    found = {}
    for item in sorted(pending, key=lambda p: (p.node, p.vmid, p.op_kind)):
        numbered[item.node] += 1
        hub = sign_command(cluster, item) if SHA256.fullmatch(item.descriptor_sha256) else ""
        found[(item.node, item.vmid, item.op_kind, item.descriptor_sha256)] = Commands(
            hub=hub, node=f"pve-executor op sign --pending {numbered[item.node]} --key KEYFILE --role ROLE")
    return found


def pending(fleet: Fleet, cluster: str) -> Page:
    """Every node's pending approvals, each with the command that signs it."""
    _cluster(fleet, cluster)
    items = fleet.pending(cluster)
    return Page("pending.html", {"cluster": cluster, "pending": items, "commands": commands(cluster, items)})


def history(fleet: Fleet, cluster: str) -> Page:
    """The cluster's versions, newest first."""
    _cluster(fleet, cluster)
    return Page("history.html", {"cluster": cluster,
                                 "entries": fleet.read(fleet.store.history, cluster, min(HISTORY_PAGE, MAX_HISTORY))})


def version(fleet: Fleet, cluster: str, version_text: str) -> Page:
    """One version: who applied it, when and why, and its desired guests against the version before."""
    _cluster(fleet, cluster)
    number = int(version_text) if version_text.isdigit() and len(version_text) < 19 else 0
    found = fleet.read(fleet.store.get, cluster, number) if number else None
    if found is None:
        raise NotFound(f"no version {version_text[:20]!r} of cluster {cluster}")
    before = fleet.read(fleet.store.get, cluster, number - 1) if number > 1 else None
    new = desired.of_version(found)
    old = desired.of_version(before) if before else desired.Declaration("", {})
    changes = desired.compare(old.guests, new.guests)
    return Page("version.html", {"cluster": cluster, "entry": found, "latest": fleet.latest(cluster),
                                 "changes": changes[:MAX_CHANGES], "more": max(0, len(changes) - MAX_CHANGES),
                                 "problem": new.problem, "text": new.text})


def ops(fleet: Fleet, cluster: str) -> Page:
    """Every node's recent operations, newest first."""
    _cluster(fleet, cluster)
    found = [(s.node, op) for s in fleet.statuses(cluster) for op in fleet.ops(cluster, s.node)]
    found.sort(key=lambda pair: pair[1].at_unix_ms, reverse=True)
    return Page("ops.html", {"cluster": cluster, "ops": found})


Route = Callable[..., Page]
# Path segments after the cluster (quoted one by one) -> the page; a segment in <> is an argument.
ROUTES: tuple[tuple[tuple[str, ...], Route], ...] = (
    ((), overview),
    (("pending",), pending),
    (("history",), history),
    (("history", "<version>"), version),
    (("ops",), ops),
    (("nodes", "<node>"), node),
    (("nodes", "<node>", "guests", "<vmid>"), guest),
)


def route(fleet: Fleet, segments: list[str]) -> Page:
    """The page a path's (unquoted) segments name; NotFound for any other path."""
    if not segments:
        return index(fleet)
    if segments[0] != "clusters" or len(segments) < 2:
        raise NotFound("no such page")
    cluster, rest = segments[1], segments[2:]
    for pattern, build in ROUTES:
        if len(pattern) == len(rest) and all(p.startswith("<") or p == s for p, s in zip(pattern, rest, strict=True)):
            return build(fleet, cluster, *(s for p, s in zip(pattern, rest, strict=True) if p.startswith("<")))
    raise NotFound("no such page")


__all__ = ["ROUTES", "NotFound", "Page", "now_ms", "route"]
