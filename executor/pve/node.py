"""The Proxmox adapter: proxmoxer over HTTPS (PVE's task semantics are ``executor.pve.tasks``).

One ``ProxmoxAPI`` (one HTTPS session) for the life of the process: a new session costs ~45 ms.
Timeouts are well above proxmoxer's 5 s default. Secrets live in ``Credentials`` fields that are
never printed (``repr=False``) and never logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import requests
import structlog
import urllib3
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException

from executor.errors import ExecutorError, PermanentError, TemporaryError
from executor.pve import failures
from executor.pve import parse as pveparse

# proxmoxer logs every request with its form data at INFO (config values, cipassword...): never.
logging.getLogger("proxmoxer").setLevel(logging.WARNING)

QEMU, LXC = "qemu", "lxc"
log = structlog.get_logger("executor.pve")
T = TypeVar("T")
ErrorSink = Callable[[int | None, str], None]  # (HTTP status or None: no answer, the cause's code)


class PveError(ExecutorError):
    """A Proxmox call failed; ``status``: the HTTP status (None: no answer); ``cause``, ``hint``: why, what to do."""

    def __init__(self, message: str, status: int | None = None, *, failure: failures.Failure | None = None) -> None:
        super().__init__(failure.message if failure is not None else message)
        self.status = status
        if failure is not None:
            self.cause, self.hint = failure.code, failure.hint


class PveUnavailableError(PveError, TemporaryError):
    """No answer: connection refused or reset, timeout, TLS failure, 5xx from a proxy."""


class PveNotSentError(PveUnavailableError):
    """No connection was made (refused, connect timeout): the request never left."""


class PveAnswerError(PveError, PermanentError):
    """An answer that does not parse (``executor.pve.parse``): a read that failed, never a fact.

    Not transient (retrying gets the same answer); the message names the guest and what was wrong.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, 200)


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """API token (``user@realm!id`` + secret) or user + password; secrets are never printed."""

    user: str
    password: str | None = field(default=None, repr=False)
    token_secret: str | None = field(default=None, repr=False)

    @property
    def is_token(self) -> bool:
        """Token auth needs no ticket renewal."""
        return "!" in self.user


@dataclass(frozen=True, slots=True, kw_only=True)
class Connection:
    """Where and how to reach the node's API."""

    host: str
    port: int = 8006
    node: str
    credentials: Credentials
    ca_file: str | None = None
    insecure: bool = False
    timeout: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestState:
    """A guest as the node's guest list shows it."""

    vmid: int
    type: str  # qemu or lxc
    status: str  # running, stopped or paused
    lock: str
    name: str = ""  # as the list gives it (attacker-controlled text: shown escaped, never parsed)


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingSection:
    """A guest's pending section: the values now, the values and deletes the next start applies."""

    current: dict[str, str] = field(default_factory=dict)
    set: dict[str, str] = field(default_factory=dict)
    delete: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.set or self.delete)










def upid_node(upid: str) -> str:
    """The node a UPID names (``UPID:{node}:...``): ask that node about the task."""
    parts = upid.split(":")
    if len(parts) < 9 or parts[0] != "UPID":
        raise PveError(f"not a UPID: {upid!r}")
    return parts[1]


class PveReader(Protocol):
    """What the executor reads from a Proxmox node (one real implementation: ``ProxmoxNode``)."""

    node: str

    def guests(self) -> GuestList:
        """Every guest of the node with its run state and lock (one request per guest type)."""

    def cluster_guests(self) -> dict[int, str]:
        """vmid -> node for every guest of the cluster (one read of /cluster/resources)."""

    def cluster_name(self) -> str:
        """The cluster's name ("" for a node outside a cluster)."""

    def config(self, guest_type: str, vmid: int) -> tuple[dict[str, str], str]:
        """The pending-applied config and its digest."""

    def pending(self, guest_type: str, vmid: int) -> PendingSection:
        """PVE's pending section (what the next start applies) with the current values beside it."""

    def task_status(self, upid: str) -> dict[str, Any]:
        """The task's status record."""

    def tasks(self, vmid: int, since: float) -> list[dict[str, Any]]:
        """The node's tasks for a guest started at or after ``since`` (Unix time)."""

    def snapshots(self, guest_type: str, vmid: int) -> list[str]:
        """The names of the guest's snapshots (PVE's ``current`` entry left out)."""


class PveWriter(Protocol):
    """Every mutating Proxmox call; only the safety gate holds one (``executor.pve.write``)."""

    def start(self, guest_type: str, vmid: int) -> str:
        """Start; the task's UPID."""

    def shutdown(self, guest_type: str, vmid: int, timeout: int, force: bool) -> str:
        """Graceful shutdown, forced stop after ``timeout`` when ``force``; the task's UPID."""

    def set_config(self, guest_type: str, vmid: int, values: Mapping[str, str], delete: Sequence[str],
                   digest: str, *, force: bool = False) -> str | None:
        """Write config (QEMU: a UPID to wait on; LXC: None, already done); ``force`` frees deleted disks."""

    def destroy(self, guest_type: str, vmid: int, *, purge: bool, destroy_unreferenced_disks: bool) -> str:
        """Destroy the guest and every volume it owns; the task's UPID."""

    def resize(self, guest_type: str, vmid: int, disk: str, size: str, digest: str) -> str | None:
        """Grow a disk to ``size`` (PVE's size string); the task's UPID (None from a PVE that answers at once)."""

    def snapshot(self, guest_type: str, vmid: int, snapname: str, *, vmstate: bool) -> str:
        """Take a snapshot (QEMU: with the RAM when ``vmstate``); the task's UPID."""

    def rollback(self, guest_type: str, vmid: int, snapname: str) -> str:
        """Roll the guest back to a snapshot; the task's UPID."""

    def delete_snapshot(self, guest_type: str, vmid: int, snapname: str, *, force: bool) -> str:
        """Delete a snapshot (``force``: drop it from the config even if the storage delete fails); the UPID."""


class Session:
    """One logged-in proxmoxer API (one HTTPS session) with errors translated once."""

    def __init__(self, connection: Connection, on_error: ErrorSink | None = None) -> None:
        self.node = connection.node
        self._connection = connection
        self._on_error = on_error or (lambda _status, _cause: None)
        self._login_lock = threading.Lock()
        self._api = self._login()

    def _login(self) -> Any:
        c, creds = self._connection, self._connection.credentials
        verify: bool | str = False if c.insecure else (c.ca_file or True)
        kwargs: dict[str, Any] = {"port": c.port, "verify_ssl": verify, "timeout": c.timeout, "service": "PVE"}
        if creds.is_token:
            user, _, token_name = creds.user.partition("!")
            kwargs.update(user=user, token_name=token_name, token_value=creds.token_secret)
        else:
            kwargs.update(user=creds.user, password=creds.password)
        try:
            return ProxmoxAPI(c.host, **kwargs)
        except AuthenticationError as exc:  # proxmoxer's text names the URL and the user, never the password
            status, failure = failures.login_refused(str(exc), creds.user)
            self._on_error(status, failure.code if failure is not None else "http")
            raise PveError(f"login as {creds.user} failed (HTTP {status})", status, failure=failure) from exc
        except requests.RequestException as exc:
            raise self._unanswered(exc, PveUnavailableError) from exc

    def call(self, request: Callable[[Any], Any]) -> Any:
        """Run one API request; translate errors once; log in again once on a 401 (tickets)."""
        for attempt in (1, 2):
            try:
                return request(self._api)
            except ResourceException as exc:
                if exc.status_code == 401 and attempt == 1 and not self._connection.credentials.is_token:
                    with self._login_lock:
                        self._api = self._login()
                    continue
                message = str(exc.content or exc.status_message).strip()
                if exc.errors:
                    message = f"{message} {exc.errors}"
                if exc.status_code in (502, 503, 504, 595, 596):
                    self._on_error(exc.status_code, "http")
                    raise PveUnavailableError(message, exc.status_code) from exc
                raise self._answered(exc.status_code, message) from exc
            except requests.RequestException as exc:
                raise self._unanswered(exc, PveNotSentError if _never_sent(exc) else PveUnavailableError) from exc
        raise AssertionError("unreachable")

    def _answered(self, status: int, message: str) -> PveError:
        """An error answer: a 401 or a 403 says what to fix (``failures.answered``); counted by its cause."""
        failure = failures.answered(status, message, self._connection.credentials.user)
        self._on_error(status, failure.code if failure is not None else "http")
        return PveError(message, status, failure=failure)

    def _unanswered(self, exc: requests.RequestException, error: type[PveUnavailableError]) -> PveUnavailableError:
        """No answer: the cause found in the exception's chain (``failures.transport``); counted by it."""
        c = self._connection
        failure = failures.transport(exc, f"{c.host}:{c.port}", c.timeout)
        self._on_error(None, failure.code)
        return error(failure.message, failure=failure)

    def guest(self, api: Any, guest_type: str, vmid: int) -> Any:
        """The proxmoxer path of one guest of this node."""
        return getattr(api.nodes(self.node), guest_type)(vmid)


class GuestList(list[GuestState]):
    """The node's guests whose entries parsed, and those whose entries did not.

    ``unreadable``: vmid -> what was wrong with its entry (the guest is on the node, its facts are not
    known: it is skipped, never planned); ``dropped``: entries that name no guest at all.
    """

    def __init__(self, guests: Sequence[GuestState] = (), *, unreadable: Mapping[int, str] | None = None,
                 dropped: Sequence[str] = ()) -> None:
        super().__init__(guests)
        self.unreadable = dict(unreadable or {})
        self.dropped = tuple(dropped)

    def find(self, vmid: int) -> GuestState | None:
        """The guest ``vmid`` (None: not on the node); PveAnswerError when its entry, or an entry that could
        be it, did not parse: absence is never concluded from a list with holes."""
        found = next((g for g in self if g.vmid == vmid), None)
        if found is not None:
            return found
        if vmid in self.unreadable:
            raise PveAnswerError(f"guest {vmid}: its guest-list entry does not parse: {self.unreadable[vmid]}")
        if self.dropped:
            raise PveAnswerError(f"guest {vmid} is not in the guest list, which dropped {self.dropped[0]}")
        return None


def _never_sent(exc: requests.RequestException) -> bool:
    """Whether the request failed before a connection existed (so PVE cannot have taken it).

    A connection refused or a connect timeout: yes. A reset, a read timeout, a connection closed after
    the request was written, a TLS error (urllib3 raises it mid-stream too): PVE may have taken it.
    """
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


MAX_NAME = 128  # of a guest's name kept from the list (PVE allows far less): a report carries no novel


class ProxmoxNode:
    """``PveReader`` over proxmoxer; ``session`` is shared with the gate's writer.

    Every answer is parsed strictly (``executor.pve.parse``): one that does not parse raises
    PveAnswerError naming the guest and what was wrong, never a TypeError deep in a tick.
    """

    def __init__(self, connection: Connection, on_error: ErrorSink | None = None) -> None:
        self.session = Session(connection, on_error)
        self.node = connection.node
        self._call = self.session.call

    def guests(self) -> GuestList:
        """QEMU (``full=1`` for qmpstatus) and LXC lists of the node; entries that do not parse set apart."""
        found, unreadable, dropped = [], {}, []
        for kind in (QEMU, LXC):
            params = {"full": 1} if kind == QEMU else {}

            def listing(api: Any, kind: str = kind, params: dict[str, int] = params) -> Any:
                return getattr(api.nodes(self.node), kind).get(**params)

            entries, notes = _parsed(f"the {kind} guest list", pveparse.objects, self._call(listing),
                                     f"the {kind} guest list")
            dropped += notes
            for entry in entries:
                try:
                    vmid, status, lock = pveparse.guest_entry(entry)
                except pveparse.MalformedAnswerError as exc:
                    named = _vmid_or_none(entry)
                    if named is None:
                        dropped.append(f"a {kind} guest-list entry: {exc}")
                    else:
                        unreadable[named] = f"{kind} guest-list entry: {exc}"
                    continue
                name = entry.get("name")
                found.append(GuestState(vmid=vmid, type=kind, status=status, lock=lock,
                                        name=name[:MAX_NAME] if isinstance(name, str) else ""))
        for note in dropped:
            log.warning("pve_entry_dropped", node=self.node, error=note)
        return GuestList(found, unreadable=unreadable, dropped=dropped)

    def cluster_guests(self) -> dict[int, str]:
        """GET /cluster/resources?type=vm: where each guest of the cluster lives."""
        placed, dropped = _parsed("cluster resources", pveparse.resources_answer,
                                  self._call(lambda api: api.cluster.resources.get(type="vm")))
        for note in dropped:
            log.warning("pve_entry_dropped", node=self.node, error=note)
        return placed

    def cluster_name(self) -> str:
        """GET /cluster/status: the entry of type cluster names it."""
        name, dropped = _parsed("cluster status", pveparse.cluster_name_answer,
                                self._call(lambda api: api.cluster.status.get()))
        for note in dropped:
            log.warning("pve_entry_dropped", node=self.node, error=note)
        return name

    def config(self, guest_type: str, vmid: int) -> tuple[dict[str, str], str]:
        """GET .../config: PVE's pending-applied view, values as text, digest apart (never without one)."""
        answer = self._call(lambda api: self.session.guest(api, guest_type, vmid).config.get())
        return _parsed(f"guest {vmid}: config", pveparse.config_answer, answer)

    def pending(self, guest_type: str, vmid: int) -> PendingSection:
        """GET .../pending: per key its current value, its pending value or a pending delete."""
        answer = self._call(lambda api: self.session.guest(api, guest_type, vmid).pending.get())
        current, values, deleted = _parsed(f"guest {vmid}: pending", pveparse.pending_answer, answer)
        return PendingSection(current=current, set=values, delete=deleted)

    def task_status(self, upid: str) -> dict[str, Any]:
        """GET /nodes/{upid's node}/tasks/{upid}/status: ``status``, and a stopped task's ``exitstatus``."""
        answer = self._call(lambda api: api.nodes(upid_node(upid)).tasks(upid).status.get())
        return dict(_parsed(f"task {upid}: status", pveparse.task_status_answer, answer))

    def tasks(self, vmid: int, since: float) -> list[dict[str, Any]]:
        """GET /nodes/{node}/tasks?vmid=&since=&source=all: PVE's default source (archive) omits running tasks."""
        answer = self._call(lambda api: api.nodes(self.node).tasks.get(vmid=vmid, since=int(since), limit=100,
                                                                        source="all"))
        listed = _parsed(f"guest {vmid}: task list", pveparse.task_list, answer)
        return [t for t in listed if t["starttime"] >= int(since)]

    def snapshots(self, guest_type: str, vmid: int) -> list[str]:
        """GET .../snapshot: every entry but ``current`` (where the guest is now)."""
        answer = self._call(lambda api: self.session.guest(api, guest_type, vmid).snapshot.get())
        return _parsed(f"guest {vmid}: snapshot list", pveparse.snapshot_names, answer)


def _parsed(what: str, parse: Callable[..., T], *args: Any) -> T:
    """``parse(*args)``, a MalformedAnswerError answer raised as PveAnswerError prefixed with ``what`` (the guest)."""
    try:
        return parse(*args)
    except pveparse.MalformedAnswerError as exc:
        raise PveAnswerError(f"{what}: {exc}") from exc


def _vmid_or_none(entry: Mapping[str, Any]) -> int | None:
    try:
        return pveparse.vmid_of(entry.get("vmid"))
    except pveparse.MalformedAnswerError:
        return None




