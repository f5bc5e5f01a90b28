"""``pve-executor whoami`` (alias ``status``): who this executor is to a signer, and whether it can work.

Read-only: the journal's files are scanned without taking its lock (a running daemon holds it), the
trust store is loaded as the daemon would (owner checks, the version floor kept in the state dir)
but nothing is written, and Proxmox gets one GET (``/cluster/status``, which also names the cluster).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.version import version
from executor.config import ExecutorSettings
from executor.loop.hubheld import HeldFileError, HeldFiles
from executor.pve.node import Connection, ProxmoxNode, PveError
from journal import Applied, Begun, Ended, RefusalRecord, is_burn_key, segments
from journal.records import record_of, scan
from journal.state import State
from safety.truststore import Role, TrustStore, TrustStoreError, TrustStoreHolder


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalView:
    """The state directory as found: exists, readable, locked by a daemon, what its journal holds."""

    state_dir: str
    exists: bool = False
    readable: bool = False
    locked: bool = False
    in_flight: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustView:
    """The trust store as the daemon would load it, and the roles that name this executor's audience."""

    path: str = ""
    version: int = 0
    sha256: str = ""
    keys: int = 0
    floor: int = 0  # the version last accepted here (state_dir/trust.version)
    error: str = ""
    roles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class HubView:
    """The hub document this node holds (state_dir/hub-held): a monitor that is not the hub compares nodes by it."""

    version: int = 0  # 0: none held
    sha256: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Whoami:
    """Everything ``whoami`` prints; ``problems`` empty means all is well (exit 0)."""

    executor_id: str
    version: str
    node: str
    pve_url: str
    proxmox: str  # "reachable" or the error
    trust: TrustView
    journal: JournalView
    problems: tuple[str, ...]
    hub: HubView = field(default_factory=HubView)


def roles_naming(store: TrustStore, audience: str) -> dict[str, Role]:
    """The store's roles whose audiences name ``audience`` (or ``*``)."""
    return {name: role for name, role in sorted(store.roles.items()) if role.allows_audience(audience)}


def lock_held(state_dir: Path) -> bool:
    """Whether a process (a running daemon) holds the journal's lock; never creates the lock file."""
    try:
        fd = os.open(state_dir / segments.LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # closing drops our shared lock at once
    return False


def journal_view(state_dir: str) -> JournalView:
    """The journal read from its files as they are now, without its lock (read-only)."""
    path = Path(state_dir)
    if not path.is_dir():
        return JournalView(state_dir=state_dir, error="no such directory")
    locked = lock_held(path)
    state, counts = State(keep_recent=0), collections.Counter[str]()

    def fold(body: Any) -> None:
        state.apply(body)
        counts[_count_of(record_of(body))] += 1

    try:
        for sequence in segments.sequences(path):
            scan((path / segments.name(sequence)).read_bytes(), fold)
    except (OSError, ValueError) as exc:
        return JournalView(state_dir=state_dir, exists=True, locked=locked, error=f"cannot read the journal: {exc}")
    counts.pop("", None)
    return JournalView(state_dir=state_dir, exists=True, readable=True, locked=locked,
                       in_flight=len(state.in_flight()), counts=dict(sorted(counts.items())))


def _count_of(record: object) -> str:
    """The op-count bucket of one record ("" for records that count nothing, like the clock's marks)."""
    if isinstance(record, Begun):
        return "signed ops begun" if record.key and is_burn_key(record.key) else "operations begun"
    if isinstance(record, Ended):
        return f"ended {record.outcome.value}"
    if isinstance(record, RefusalRecord):
        return "refusals"
    if isinstance(record, Applied) and is_burn_key(record.key):
        return "signed ops spent"
    return ""


def _floor(state_dir: str) -> tuple[int, str | None]:
    """The trust store last accepted here (the daemon's state_dir/trust.version): (version, sha256)."""
    try:
        words = (Path(state_dir) / "trust.version").read_text(encoding="utf-8").split()
        return int(words[0]), words[1] if len(words) > 1 else None
    except (OSError, ValueError, IndexError):
        return 0, None


NO_TRUST_STORE = "none configured (trust_store): signed operations are off, every non-benign step waits"


def trust_view(path: str | None, state_dir: str, audience: str) -> TrustView:
    """Load the trust store as the daemon would (never writing the floor) and list the roles naming ``audience``."""
    if not path:
        return TrustView(error=NO_TRUST_STORE)
    floor, sha256 = _floor(state_dir)
    holder = TrustStoreHolder(path, min_version=floor, min_sha256=sha256)
    error: TrustStoreError | None = holder.reload()
    store = holder.current
    if store is None:
        return TrustView(path=path, floor=floor, error=str(error))
    roles = {name: {"kinds": sorted(role.kinds), "classes": sorted(role.classes), "threshold": role.threshold,
                    "signers": sorted(k.owner for k in store.keys.values() if name in k.roles)}
             for name, role in roles_naming(store, audience).items()}
    return TrustView(path=path, version=store.version, sha256=store.sha256, keys=len(store.keys), floor=floor,
                     roles=roles)


def hub_view(state_dir: str) -> HubView:
    """The hub version and sha256 held in ``state_dir``, read as the daemon reads them at start (read-only)."""
    if not Path(state_dir).is_dir():
        return HubView()
    try:
        held = HeldFiles(Path(state_dir)).load().held
    except HeldFileError as exc:
        return HubView(error=str(exc))
    return HubView(version=held.version, sha256=held.sha256)


def probe_proxmox(conn: Connection) -> tuple[str, str]:
    """One GET (/cluster/status): ("reachable" or the error, the cluster's name or "")."""
    try:
        cluster = ProxmoxNode(conn).cluster_name()
    except PveError as exc:
        return f"unreachable: {exc}", ""
    return "reachable", cluster


def gather(settings: ExecutorSettings, conn: Connection) -> Whoami:
    """Look at everything (one GET to Proxmox); the problems found, each with what it means."""
    proxmox, cluster = probe_proxmox(conn)
    # As the daemon's (``executor.gate.audience``): a node outside a cluster is its own name alone.
    named = (f"{conn.node}@{cluster}" if cluster else conn.node) if proxmox == "reachable" else f"{conn.node}@?"
    audience = settings.executor_id or named
    trust = trust_view(settings.trust_store, settings.state_dir, audience)
    journal = journal_view(settings.state_dir)
    hub = hub_view(settings.state_dir)
    problems = []
    if proxmox != "reachable":
        problems.append(f"Proxmox at {settings.pve_url} is {proxmox}")
    if trust.error == NO_TRUST_STORE:  # a benign-only node, as the quick start leaves it: no problem
        pass
    elif trust.error:
        problems.append(f"trust store: {trust.error}")
    elif not trust.roles and (settings.executor_id or proxmox == "reachable"):  # else the audience is unknown
        problems.append(f"no role of the trust store names audience {audience!r}: no signed op can be approved here "
                        f"(add it to a role's audiences)")
    if hub.error:
        problems.append(f"hub document: {hub.error} (the daemon refuses to start)")
    if journal.exists and not journal.readable:  # one not made yet is no problem: the daemon makes it
        problems.append(f"state directory {settings.state_dir}: {journal.error}")
    if journal.in_flight:
        problems.append(f"{journal.in_flight} operation(s) in flight in the journal (the daemon resolves them at "
                        "start)" + ("" if journal.locked else "; no daemon holds the journal now"))
    return Whoami(executor_id=audience, version=version(), node=conn.node, pve_url=settings.pve_url, proxmox=proxmox,
                  trust=trust, journal=journal, problems=tuple(problems), hub=hub)


def render(who: Whoami) -> str:
    """The text ``whoami`` prints."""
    trust, journal = who.trust, who.journal
    lines = [f"executor_id  {who.executor_id}    (the audience signed ops must name)",
             f"version      pve-executor {who.version}",
             f"proxmox      {who.pve_url} (node {who.node}): {who.proxmox}"]
    if trust.error:
        lines.append(f"trust store  {trust.path or '-'}: {trust.error}")
    else:
        lines.append(f"trust store  {trust.path}: version {trust.version}, sha256 {trust.sha256[:16]}, "
                     f"{trust.keys} key(s); highest version accepted on this node: {trust.floor}")
        lines.extend(f"  role {name}: {', '.join(role['classes'])}; kinds {', '.join(role['kinds'])}; "
                     f"threshold {role['threshold']}; signers {', '.join(role['signers']) or 'none'}"
                     for name, role in trust.roles.items())
        if not trust.roles:
            lines.append(f"  no role names {who.executor_id}" if not who.executor_id.endswith("@?") else
                         "  the audience is not known (Proxmox unreachable, executor_id unset): roles not matched")
    held = "locked by a running daemon" if journal.locked else "not locked (no daemon running on it)"
    if journal.readable:
        counts = ", ".join(f"{n} {what}" for what, n in journal.counts.items()) or "empty"
        lines.append(f"state dir    {journal.state_dir}: {held}; {journal.in_flight} in flight; {counts}")
    elif not journal.exists:
        lines.append(f"state dir    {journal.state_dir}: does not exist yet (the daemon creates it at its first "
                     "start; or is --state-dir mistyped?)")
    else:
        lines.append(f"state dir    {journal.state_dir}: {journal.error}")
    if who.hub.version:  # the same pair as pve_executor_hub_held_info: compare it across nodes
        lines.append(f"hub document version {who.hub.version}, sha256 {who.hub.sha256} (held in state dir)")
    lines.extend(f"PROBLEM: {p}" for p in who.problems)
    lines.append("status: ok" if not who.problems else f"status: {len(who.problems)} problem(s)")
    return "\n".join(lines)


def as_json(who: Whoami) -> str:
    """The JSON ``whoami --json`` prints."""
    return json.dumps({**asdict(who), "ok": not who.problems}, indent=2, sort_keys=True)


def run_whoami(settings: ExecutorSettings, conn: Connection) -> int:
    """``pve-executor whoami``: print the report; 0 when all is well, 1 when a problem was found."""
    who = gather(settings, conn)
    with contextlib.suppress(BrokenPipeError):
        print(as_json(who) if settings.json else render(who))
    return 0 if not who.problems else 1
