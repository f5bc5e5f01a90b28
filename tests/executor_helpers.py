"""Helpers of the executor tests: its command line, fakepve's requests counted, race windows widened."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from proxmoxer import ProxmoxAPI

from executor.pve.node import GuestState, ProxmoxNode

ROOT = Path(__file__).resolve().parent.parent


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m *args`` in the project root, no PVE_PLANNER_/PVE_EXECUTOR_ setting inherited but ``env``'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PVE_PLANNER_", "PVE_EXECUTOR_"))}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False, env={**clean, **(env or {})})


def requests_to(fakepve: Any, method: str, suffix: str, since: int = 0) -> list[str]:
    """Paths of the ``method`` requests fakepve received (from index ``since``) ending with ``suffix``."""
    return [p for m, p, _ in fakepve.requests[since:] if m == method and p.endswith(suffix)]


def starts(fakepve: Any, vmid: int | None = None, since: int = 0) -> list[str]:
    """The POST .../status/start requests fakepve received, optionally for one guest."""
    found = requests_to(fakepve, "POST", "/status/start", since)
    return [p for p in found if vmid is None or p.endswith(f"/{vmid}/status/start")]


def mutations(fakepve: Any, since: int = 0) -> list[tuple[str, str, Any]]:
    """Every mutating request fakepve received (logins aside)."""
    return [r for r in fakepve.requests[since:] if r[0] in ("POST", "PUT", "DELETE") and "/access/" not in r[1]]


# unused_port() hands out ports below the kernel's ephemeral range: bind(0) (every in-process server, fakepve)
# and outgoing connections take theirs from that range, so they never land on a port handed out here between its
# release and the daemon binding it. Each pytest-xdist worker gets its own slice (two workers never hand out the
# same port) and starts at a random offset in it (two serial runs on one machine rarely meet; the probe catches it).
_SLICE = 1000
_SLICES = 8


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def worker_slice() -> range:
    """The ports this pytest process may hand out: its xdist worker's slice (worker gw0's when serial)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    start = max(1024, _ephemeral_low() - _SLICE * _SLICES) + _SLICE * (index % _SLICES)
    return range(start, start + _SLICE)


class _Ports:
    """Walks this process's slice from a random offset, each port once (a port handed out stays ours)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: int | None = None

    def take(self) -> int:
        """The next port of the slice that nothing holds on loopback."""
        ports = worker_slice()
        with self._lock:
            if self._next is None:
                self._next = random.randrange(len(ports))
            for _ in range(len(ports)):
                port = ports[self._next % len(ports)]
                self._next += 1
                if _free(port):
                    return port
        raise RuntimeError(f"no free port left in {ports.start}-{ports.stop - 1}")


def _free(port: int) -> bool:
    """Whether nothing holds ``port`` on loopback (no SO_REUSEADDR: a listener or TIME_WAIT there refuses us)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_PORTS = _Ports()


def unused_port() -> int:
    """A loopback port nothing listens on, not handed out before in this run (see ``worker_slice``).

    Nothing else of this run takes it after its release: a daemon told to ``--listen`` there gets it, and a
    client sent there meets "connection refused".
    """
    return _PORTS.take()


def start_task(fakepve: Any, cafile: str, vmid: int, node: str = "pve1") -> str:
    """POST a QEMU guest's status/start straight to fakepve (not through the adapter); the task's UPID."""
    api = ProxmoxAPI("127.0.0.1", port=fakepve.port, user="root@pam", password="secret", verify_ssl=cafile,
                     service="PVE")
    return str(api.nodes(node).qemu(vmid).status.start.post())


class Rendezvous:
    """Holds the first ``parties`` callers until all have arrived or ``timeout`` passes; later ones pass.

    Two reads that overlap (the defect) meet here and go on together; reads that never overlap (the
    fix) cost the first one ``timeout`` once.
    """

    def __init__(self, parties: int, timeout: float) -> None:
        self._parties, self._timeout = parties, timeout
        self._arrived = 0
        self._cond = threading.Condition()

    def arrive(self) -> bool:
        """Wait for the others; True when they all came in time."""
        with self._cond:
            self._arrived += 1
            if self._arrived > self._parties:
                return True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._arrived >= self._parties, self._timeout)


class HeldReads:
    """The real adapter, but a guest list is held after it was read: every one (``every``) or the next."""

    def __init__(self, node: ProxmoxNode, every: Callable[[], object] | None = None) -> None:
        self._node, self.node = node, node.node
        self._every = every
        self._next: Callable[[], object] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    def hold_next(self, hook: Callable[[], object]) -> None:
        """Run ``hook`` after the next guest list is read (once)."""
        self._next = hook

    def guests(self) -> list[GuestState]:
        """Read, then run the hooks (the list grows older while they wait)."""
        found = self._node.guests()
        hook, self._next = self._next, None
        for run in (hook, self._every):
            if run is not None:
                run()
        return found


def cli(pve_url: str, cafile: str, planner: str, tmp_path: Path, *args: str, node: str = "pve1") -> list[str]:
    """The pve-executor command line for ``node`` at ``pve_url``, the password in a file, JSON logs."""
    password = tmp_path / "password"
    password.write_text("secret\n")
    return [sys.executable, "-m", "executor", *args, "--node", node, "--pve-url", pve_url, "--pve-user", "root@pam",
            "--pve-password-file", str(password), "--pve-ca-file", cafile, "--planner", planner,
            "--log-format", "json"]


class LineReader:
    """Collects a child's stream line by line in a thread (so a running daemon's log can be watched)."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def events(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The JSON log events, once the stream has ended (or ``timeout``); non-JSON lines left out."""
        self._thread.join(timeout)
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def run_daemon_until(command: list[str], done: Callable[[list[str]], bool], *, timeout: float, what: str) -> LineReader:
    """Run the daemon ``command`` until ``done`` says so of its log lines, then SIGTERM it (it must exit 0).

    Fails with ``what`` if ``timeout`` passes first, or with its last lines if it dies. Returns its log.
    """
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    log = LineReader(child.stderr)
    try:
        deadline = time.monotonic() + timeout
        while not done(log.lines):
            assert child.poll() is None, "the daemon died: " + "".join(log.lines[-5:])
            assert time.monotonic() < deadline, what
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return log
