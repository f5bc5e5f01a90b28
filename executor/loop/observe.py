"""The one read path: what a tick, the dry run and selftest know of the node before they plan.

``observe`` reads the node's guest lists, the config of each declared guest whose config or
description is managed (in parallel; an unreadable config, one whose answer does not parse among
them, is left out and the planner says CONFIG_UNKNOWN), and, only when a declared guest is not on
this node, one ``/cluster/resources`` to tell a guest that lives on another node (left to that
node's executor, counted as elsewhere) from one that exists nowhere (the planner's NOT_FOUND). A guest
the cluster knows is never NOT_FOUND: one it places on this node although the list read just before did
not have it (a migration that ended between the two reads) is elsewhere for this tick. A ``lock:`` line
in a config read is a lock, as the list's is (a backup begun after the list was read).
``pve-executor plan`` uses this same function, so the dry run shows what ``run`` would do.

A declared guest whose guest-list entry does not parse is ``unreadable``: on the node, its run
state and lock unknown; it is not planned at all, and the tick reports it as skipped with the error.

PVE's config read is the pending-applied view: a change PVE staged for the next restart (a running
guest's ``memory``) already reads as done, so it is written once and never planned again. To say so
("staged, applies at the next restart"), ``PendingSections`` reads the guest's ``/pending`` beside
its config, again only when the config's digest moved: PVE's digest is the SHA-1 of the whole config
file, its [PENDING] section included, so an unchanged digest is an unchanged pending section and a
steady node pays no request for it. ``staged`` names the declared keys PVE holds for the restart
that the plan leaves alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

import structlog

from executor.gate.actions import SET_CONFIG, Step
from executor.gate.decisions import lock_of
from executor.loop.desired import Declared
from executor.loop.planner_client import RUN_STATES, actual_to_proto, desired_to_proto
from executor.pve.node import GuestState, PendingSection, PveError, PveReader
from planner.v1 import planner_pb2 as pb

log = structlog.get_logger("executor.observe")
STAGED_NOTE = "staged, applies at the next restart"  # how plan, status and the log say it


@dataclass(frozen=True, slots=True, kw_only=True)
class Observed:
    """The node as read for one plan."""

    guests: dict[int, GuestState]  # this node's guests whose run state the planner understands
    configs: dict[int, tuple[dict[str, str], str]]  # vmid -> (pending-applied config, digest)
    elsewhere: frozenset[int]  # declared guests that live on another node
    unreadable: dict[int, str] = field(default_factory=dict)  # declared guests whose list entry did not parse
    listed: frozenset[int] | None = None  # every vmid of this node's lists, whatever its state (None: not read)
    pending: dict[int, PendingSection] = field(default_factory=dict)  # vmid -> its /pending (when read)

    def request(self, declared: Iterable[Declared]) -> tuple[list[pb.DesiredGuest], list[pb.ActualGuest]]:
        """The planner request for ``declared``: guests elsewhere are not this node's to plan."""
        mine = [d for d in declared if d.vmid not in self.elsewhere and d.vmid not in self.unreadable]
        actual = [actual_to_proto(self.guests[d.vmid], self.configs.get(d.vmid)) for d in mine if d.vmid in self.guests]
        return desired_to_proto(mine), actual


def manages_config(declared: Declared) -> bool:
    """Whether a guest's config must be read: its config or description is declared."""
    return declared.config is not None or declared.description is not None


@dataclass(frozen=True, slots=True)
class StagedKey:
    """A declared key PVE holds in the guest's pending section: its value now and at the next restart."""

    key: str
    now: str | None  # None: absent now
    next: str | None  # None: deleted at the next restart


class PendingSections:
    """The /pending of each guest whose config is read, read again only when its config's digest moved."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the config readers run in parallel
        self._known: dict[int, tuple[str, PendingSection]] = {}  # vmid -> (digest, section)

    def read(self, reader: PveReader, guest: GuestState, digest: str) -> PendingSection | None:
        """The guest's pending section as of ``digest`` (None: the read failed; nothing is shown staged)."""
        with self._lock:
            known = self._known.get(guest.vmid)
        if known is not None and known[0] == digest:
            return known[1]
        try:
            section = reader.pending(guest.type, guest.vmid)
        except PveError as exc:
            log.warning("pending_unreadable", vmid=guest.vmid, error=str(exc))
            return None
        with self._lock:  # read after the config: never older than ``digest`` (a newer one is re-read next time)
            self._known[guest.vmid] = (digest, section)
        return section

    def keep(self, vmids: Iterable[int]) -> None:
        """Forget every guest but ``vmids`` (those whose config this tick read)."""
        wanted = set(vmids)
        with self._lock:
            self._known = {v: known for v, known in self._known.items() if v in wanted}


def staged(observed: Observed, declared: Iterable[Declared],
           planned: Mapping[int, Sequence[Step]]) -> dict[int, tuple[StagedKey, ...]]:
    """Per guest, the declared keys PVE holds for the next restart that no planned config step writes again."""
    found = {}
    for d in declared:
        section = observed.pending.get(d.vmid)
        if not section:
            continue
        managed = set(d.config or ()) | ({"description"} if d.description is not None else set())
        written = {k for s in planned.get(d.vmid, ()) if s.kind == SET_CONFIG for k in (*dict(s.set), *s.delete)}
        keys = sorted((set(section.set) | section.delete) & managed - written)
        if keys:
            found[d.vmid] = tuple(StagedKey(key=k, now=section.current.get(k),
                                            next=None if k in section.delete else section.set.get(k)) for k in keys)
    return found


class StagedLog:
    """Logs a guest's staged keys when they first show or change, not on every tick."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[str, ...]] = {}

    def report(self, found: Mapping[int, tuple[StagedKey, ...]]) -> None:
        """``config_staged`` for each guest whose staged keys are new since the last report."""
        now = {vmid: tuple(k.key for k in keys) for vmid, keys in found.items()}
        for vmid, keys in sorted(now.items()):
            if self._last.get(vmid) != keys:
                log.info("config_staged", vmid=vmid, keys=list(keys), note=STAGED_NOTE)
        self._last = now


def observe(reader: PveReader, declared: Sequence[Declared], *, pool: Executor | None = None,
            sections: PendingSections | None = None) -> Observed:
    """Read what planning ``declared`` needs; PveError when the guest list cannot be read.

    ``sections``: also each config-read guest's pending section (through its digest cache); None: not read.
    """
    listing = reader.guests()
    guests = {g.vmid: g for g in listing if g.status in RUN_STATES}
    unreadable = {d.vmid: listing.unreadable[d.vmid] for d in declared if d.vmid in listing.unreadable}
    for vmid, error in unreadable.items():
        log.warning("guest_unreadable", vmid=vmid, error=error)
    wanted = [guests[d.vmid] for d in declared if d.vmid in guests and manages_config(d)]

    def read(guest: GuestState) -> tuple[int, tuple[dict[str, str], str] | None, PendingSection | None]:
        try:
            found = reader.config(guest.type, guest.vmid)
        except PveError as exc:
            log.warning("config_unreadable", vmid=guest.vmid, error=str(exc))
            return guest.vmid, None, None
        return guest.vmid, found, sections.read(reader, guest, found[1]) if sections is not None else None

    results = list(pool.map(read, wanted) if pool is not None else map(read, wanted))
    configs = {vmid: found for vmid, found, _ in results if found is not None}
    pending = {vmid: section for vmid, _, section in results if section is not None}
    if sections is not None:
        sections.keep(configs)
    for vmid, (config, _) in configs.items():  # a lock only the config shows (taken after the list was read)
        guests[vmid] = replace(guests[vmid], lock=lock_of(guests[vmid].lock, config))
    placed = [d for d in declared if d.vmid not in unreadable]
    # A guest whose entry did not parse is still on the node (its state unknown), so listed; a list that
    # dropped entries naming no guest has holes: it proves no guest absent (``listed`` None).
    listed = None if listing.dropped else frozenset(g.vmid for g in listing) | frozenset(listing.unreadable)
    return Observed(guests=guests, configs=configs, elsewhere=_elsewhere(reader, placed, guests),
                    unreadable=unreadable, listed=listed, pending=pending)


def _elsewhere(reader: PveReader, declared: Sequence[Declared], guests: dict[int, GuestState]) -> frozenset[int]:
    missing = {d.vmid for d in declared if d.vmid not in guests}
    if not missing:
        return frozenset()
    try:
        placed = reader.cluster_guests()
    except PveError as exc:
        log.warning("cluster_resources_unreadable", error=str(exc))
        return frozenset()
    # Every guest the cluster knows is elsewhere for this tick, even one it places here: that one was not on
    # the list read just before (a migration that ended between the two reads, or a lagging index), so it
    # exists and is in motion; the next tick's list settles it. Only a guest the cluster does not know is missing.
    landed = sorted(vmid for vmid in missing if placed.get(vmid) == reader.node)
    if landed:
        log.info("guests_in_motion", vmids=landed, detail="on this node in /cluster/resources, not in its guest list "
                 "read just before: planned at the next tick")
    return frozenset(vmid for vmid in missing if vmid in placed)
