"""A real PostgreSQL server for tests and benchmarks: initdb in a temp dir, postgres on a unix socket there.

Run as ``nobody`` when we are root (PostgreSQL refuses to run as root); stopped by its PID.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

SUPERUSER = "hub"
# A test server trades durability for speed; a benchmark asks for the real thing.
FAST = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")


@dataclass(frozen=True)
class PgServer:
    """A running server: its root dir, the postgres process, and how to reach its ``postgres`` database."""

    root: Path
    process: subprocess.Popen[bytes]
    socket_dir: Path

    def conninfo(self, dbname: str = "postgres") -> str:
        """The libpq connection string for ``dbname`` on this server."""
        return f"host={self.socket_dir} port=5432 user={SUPERUSER} dbname={dbname}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (an identifier of ours) and return its connection string."""
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a name the tests make, not input
        return self.conninfo(name)


def _as_user() -> dict[str, Any]:
    """Popen arguments that drop root to ``nobody`` (nothing when we are not root)."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("nobody")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def start(*, durable: bool = False, timeout: float = 30.0) -> PgServer:
    """initdb a fresh cluster in a new temp dir and start postgres on a unix socket in it; wait until it answers."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if not initdb or not postgres:
        raise FileNotFoundError("initdb and postgres (PostgreSQL server binaries) are not on PATH")
    root = Path(tempfile.mkdtemp(prefix="pve-reconcile-pg-"))
    drop = _as_user()
    if drop:
        os.chown(root, drop["user"], drop["group"])
    data, sockets = root / "data", root / "sock"
    subprocess.run([initdb, "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-locale",
                    "--no-sync", "--no-instructions"], cwd=root, check=True, capture_output=True, **drop)
    sockets.mkdir()
    if drop:
        os.chown(sockets, drop["user"], drop["group"])
    with open(root / "server.log", "wb") as out:
        process = subprocess.Popen([postgres, "-D", str(data), "-k", str(sockets), "-c", "listen_addresses=",
                                    *(() if durable else FAST)], cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                   **drop)
    server = PgServer(root, process, sockets)
    _wait_ready(server, timeout)
    return server


def _wait_ready(server: PgServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(server.conninfo(), connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                log = (server.root / "server.log").read_text(errors="replace")
                stop(server)
                raise RuntimeError(f"postgres did not start:\n{log}") from None
            time.sleep(0.05)


def stop(server: PgServer) -> None:
    """Fast shutdown by PID (SIGINT), SIGKILL after 10 s; then remove the temp dir."""
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGINT)
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait()
    shutil.rmtree(server.root, ignore_errors=True)
