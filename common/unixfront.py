"""A Unix socket in front of a gRPC server that knows who connects: the kernel's SO_PEERCRED per connection.

grpcio cannot say who called over a Unix socket: ``context.peer()`` is ``unix:``, the auth context holds
nothing (grpc/grpc#15511), LocalServerCredentials(UDS) never reads SO_PEERCRED (grpc/grpc#28755), and
Python cannot hand gRPC a descriptor it accepted (C++'s AddInsecureChannelFromFd and PassiveListener are
not exposed). So the front accepts on the public socket itself, asks the kernel for the caller's pid, uid
and gid, and relays the bytes to gRPC's private socket (in a 0700 directory) from a socket autobound to
a fresh abstract name. gRPC reports that name as the call's peer (``unix-abstract:NAME``), and
``credentials(peer)`` maps it back to the caller.

The public socket is 0660 in the service group, in a directory made 0750 when the front makes it. A
stale socket (its daemon was killed) is replaced; one that a live process serves is never taken: the
private directory is flocked for the daemon's life, and a connect probe names whoever answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("common.unixfront")
SUN_PATH_MAX = 107  # sun_path is 108 bytes, the terminating NUL included
BACKEND = "grpc.sock"  # gRPC's own socket, in PATH.d/ (0700)
CHUNK = 1 << 16
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class SocketInUseError(OSError):
    """The socket path is served by a live process, or is not a socket: it is never taken over."""


@dataclass(frozen=True, slots=True)
class PeerCred:
    """A connected process as the kernel recorded it at connect time."""

    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED of a connected Unix socket."""
    return PeerCred(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


def backend_of(path: str) -> str:
    """Where gRPC itself listens for the front at ``path``."""
    return os.path.join(f"{path}.d", BACKEND)


def too_long(path: str) -> str | None:
    """Why ``path`` (or its backend beside it) cannot be a socket address, or None."""
    for candidate in (path, backend_of(path)):
        if len(os.fsencode(candidate)) > SUN_PATH_MAX:
            size = len(os.fsencode(candidate))
            return f"{candidate} is {size} bytes: a Unix socket path holds 107 (108 with its NUL)"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Connections the front relays at once: per uid (one user cannot take them all) and in total."""

    per_uid: int = 32
    total: int = 256


class UnixFront:
    """The public Unix socket: accept, read SO_PEERCRED, relay to gRPC's private socket."""

    def __init__(self, path: str, *, group: str | None, limits: Limits | None = None) -> None:
        self.path = os.path.abspath(path)
        self.backend = backend_of(self.path)
        self._group, self._limits = group, limits or Limits()
        self._lock = threading.Lock()
        self._peers: dict[str, PeerCred] = {}
        self._relays: set[_Relay] = set()
        self._per_uid: dict[int, int] = {}
        self._warned: dict[int, float] = {}
        self._listener: socket.socket | None = None
        self._held: int | None = None  # the flocked private directory
        self._inode: tuple[int, int] | None = None
        self._accepting: threading.Thread | None = None
        self._closing = threading.Event()

    # --- claim and bind ---------------------------------------------------------------------------

    def open(self) -> None:
        """Make the directory, claim the path (SocketInUseError when a live process has it), bind, set modes."""
        problem = too_long(self.path)
        if problem is not None:
            raise OSError(problem)
        gid = self._gid()
        folder = Path(self.path).parent
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o750)  # mkdir's mode passes through the umask
            self._give(str(folder), gid)
        else:
            self._check_reach(folder, gid)
        self._claim()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(listener.fileno(), 0o660)  # Linux makes the file with the socket's mode: never wider
            listener.bind(self.path)
            os.chmod(self.path, 0o660)  # bind applied the umask too
            self._give(self.path, gid)
            listener.listen(64)
        except BaseException:
            listener.close()
            self._release()
            raise
        found = os.stat(self.path)
        self._listener, self._inode = listener, (found.st_dev, found.st_ino)

    def _check_reach(self, folder: Path, gid: int | None) -> None:
        """Warn when the socket's group cannot pass through a directory that was there already (never changed:
        it may be /run itself); the group's members would get "Permission denied" with nothing logged."""
        if gid is None:
            return
        found = folder.stat()
        if found.st_mode & 0o001 or (found.st_gid == gid and found.st_mode & 0o010):
            return
        log.warning("api_socket_directory_unreachable", directory=str(folder), group=self._group,
                    consequence=f"members of {self._group} cannot reach the socket",
                    remedy=f"chgrp {self._group} {folder} && chmod 0750 {folder} (or remove it: the daemon makes it)")

    def _gid(self) -> int | None:
        if self._group is None:
            return None
        try:
            return grp.getgrnam(self._group).gr_gid
        except KeyError:
            log.warning("api_socket_group_missing", group=self._group, socket=self.path,
                        consequence="only root and the daemon's own user can reach the socket",
                        remedy=f"create the group (groupadd --system {self._group}) and add the operators to it")
            return None

    def _give(self, path: str, gid: int | None) -> None:
        if gid is None:
            return
        try:
            os.chown(path, -1, gid)
        except PermissionError as exc:  # neither root nor a member of the group
            log.warning("api_socket_group_not_set", group=self._group, path=path, error=exc.strerror,
                        consequence="only root and the daemon's own user can reach the socket")

    def _claim(self) -> None:
        """Lock the private directory for this daemon's life, then clear what a dead daemon left."""
        private = os.path.dirname(self.backend)
        with contextlib.suppress(FileExistsError):
            os.mkdir(private, 0o700)
        held = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(held)
            raise SocketInUseError(f"{self.path}: another daemon serves it{self._owner()}") from exc
        self._held = held
        try:
            # A directory someone else made (a squat in a shared, sticky directory such as /tmp) lets its owner
            # swap gRPC's socket and read every call relayed to it: only our own is ever used.
            owner = os.fstat(held).st_uid
            if owner != os.geteuid():
                raise SocketInUseError(f"{private} belongs to uid {owner}, not to this daemon (uid {os.geteuid()}): "
                                       "not used; remove it, or put the socket in a directory only root writes")
            os.fchmod(held, 0o700)
            self._clear_stale()
        except BaseException:
            self._release()
            raise

    def _clear_stale(self) -> None:
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise SocketInUseError(f"{self.path} exists and is not a socket: not replaced")
            if _answers(self.path):
                raise SocketInUseError(f"{self.path}: another process serves it{self._owner()}")
            os.unlink(self.path)
            log.info("api_socket_stale_removed", socket=self.path)
        if os.path.lexists(self.backend):
            os.unlink(self.backend)

    def _owner(self) -> str:
        """`` (pid N)`` of the process serving the path, when it answers."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(self.path)
                return f" (pid {peer_cred(probe).pid})"
        except OSError:
            return ""

    # --- serve --------------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Accept and relay in a thread (gRPC listens on the backend by now)."""
        self._accepting = threading.Thread(target=self._accept, name="unixfront-accept", daemon=True)
        self._accepting.start()

    def credentials(self, peer: str) -> PeerCred | None:
        """The caller behind a gRPC peer string (None: it did not come through this front)."""
        with self._lock:
            return self._peers.get(peer)

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closing.is_set():
            try:
                client, _ = listener.accept()
            except OSError as exc:
                if self._closing.is_set():
                    return
                log.warning("api_accept_failed", socket=self.path, error=exc.strerror)
                time.sleep(0.1)  # e.g. out of descriptors: do not spin
                continue
            try:
                self._admit(client)
            except OSError as exc:
                client.close()
                log.warning("api_relay_failed", socket=self.path, error=exc.strerror)

    def _admit(self, client: socket.socket) -> None:
        cred = peer_cred(client)
        if not self._reserve(cred):
            client.close()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind("")  # autobind: a fresh abstract name, gRPC's peer string for this connection
            relay = _Relay(client, upstream, _abstract(upstream.getsockname()), cred, self._done)
        except OSError:
            upstream.close()
            self._unreserve(cred)
            raise
        with self._lock:
            self._peers[relay.peer] = cred  # before a byte flows: no call arrives unnamed
            self._relays.add(relay)
        try:
            upstream.connect(self.backend)
        except OSError:
            upstream.close()
            self._done(relay)
            raise
        relay.start()

    def _reserve(self, cred: PeerCred) -> bool:
        with self._lock:
            held = self._per_uid.get(cred.uid, 0)
            if held < self._limits.per_uid and sum(self._per_uid.values()) < self._limits.total:
                self._per_uid[cred.uid] = held + 1
                return True
            now, last = time.monotonic(), self._warned.get(cred.uid)
            loud = last is None or now - last >= 10  # one line per uid per 10 s, however long a flood lasts
            if loud:
                self._warned[cred.uid] = now
        if loud:
            log.warning("api_connection_refused", uid=cred.uid, pid=cred.pid, held=held,
                        limit_per_uid=self._limits.per_uid, limit_total=self._limits.total)
        return False

    def _unreserve(self, cred: PeerCred) -> None:
        with self._lock:
            left = self._per_uid.get(cred.uid, 1) - 1
            if left > 0:
                self._per_uid[cred.uid] = left
            else:
                self._per_uid.pop(cred.uid, None)

    def _done(self, relay: _Relay) -> None:
        with self._lock:
            self._peers.pop(relay.peer, None)
            self._relays.discard(relay)
        self._unreserve(relay.cred)

    # --- stop ---------------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """No new connection from here on; the socket's name goes (calls in flight keep their relays)."""
        if self._closing.is_set():
            return
        self._closing.set()
        listener = self._listener
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            listener.close()
        if self._accepting is not None:
            self._accepting.join(5)
        self._unlink_own()

    def close(self) -> None:
        """Stop accepting, cut every relay, remove gRPC's socket and directory, release the claim."""
        self.stop_accepting()
        with self._lock:
            relays = list(self._relays)
        for relay in relays:
            relay.abort()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.backend)
        with contextlib.suppress(OSError):  # not empty or gone: the next start clears it under the lock
            os.rmdir(os.path.dirname(self.backend))
        self._release()

    def _unlink_own(self) -> None:
        """Remove the socket's name only if it is still ours (never a successor's)."""
        try:
            found = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (found.st_dev, found.st_ino) == self._inode:
            os.unlink(self.path)

    def _release(self) -> None:
        if self._held is not None:
            os.close(self._held)  # the flock goes with the descriptor
            self._held = None


def _abstract(name: str | bytes) -> str:
    """gRPC's peer string for a socket bound to an abstract ``name`` (Python gives it with its leading NUL)."""
    text = name.decode("ascii") if isinstance(name, bytes) else name
    return "unix-abstract:" + text.removeprefix("\0")


def _answers(path: str) -> bool:
    """Whether a process accepts connections on the socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except TimeoutError:
            return True  # a backlog full of callers: someone is there
    return True


class _Relay:
    """One caller's connection and its leg to gRPC: a thread per direction, closed when both have ended."""

    def __init__(self, client: socket.socket, upstream: socket.socket, peer: str, cred: PeerCred,
                 done: Callable[[_Relay], None]) -> None:
        self.peer, self.cred = peer, cred
        self._sockets = (client, upstream)
        self._done = done
        self._left = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        """Pump both ways."""
        client, upstream = self._sockets
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), name=f"unixfront-{self.peer}",
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(CHUNK):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)  # the other side said all it will say: pass the end on
        except OSError:
            self.abort()
        finally:
            self._finish()

    def abort(self) -> None:
        """Cut both legs (each pump then ends)."""
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _finish(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            for sock in self._sockets:
                sock.close()
            self._done(self)
