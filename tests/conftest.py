"""Fixtures: real planner servers on loopback (plaintext or mutual TLS), the executor's parts against fakepve."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import settings

from common.grpcserver import ServerTls
from executor.app.wiring import Parts, assemble, writer_for
from executor.gate.decisions import GateSettings
from executor.gate.kinds import CallSettings
from executor.loop.desired import Declared, DesiredProvider, StaticProvider
from executor.loop.engine import Engine
from executor.loop.funnel import Settings
from executor.loop.hub import HubProvider
from executor.loop.planner_client import PlannerClient
from executor.loop.queue import GuestQueue
from executor.pve.node import Connection, Credentials, ProxmoxNode
from executor.signed.desk import OpSettings
from journal import Journal
from planner import server
from safety.classify import Source
from tests.certs import Pki, make_pki
from tests.pve_memory import MemoryPve

# No per-example deadline (this machine's speed varies by 2x); in CI the examples are derandomized,
# so a red run can be reproduced and a green one is not luck.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(name="planner")
def _planner() -> Iterator[server.Running]:
    """A real planner on 127.0.0.1 with a free port."""
    running = server.start("127.0.0.1:0")
    try:
        yield running
    finally:
        server.stop(running, grace=1)


@pytest.fixture(name="pki", scope="module")
def _pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA with server and client certificates, and a rogue CA (made once per test module)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(name="mtls_planner")
def _mtls_planner(pki: Pki) -> Iterator[server.Running]:
    """A real planner on 127.0.0.1 serving TLS that requires a client certificate signed by the test CA."""
    running = server.start("127.0.0.1:0", tls=ServerTls(cert=pki.server_cert, key=pki.server_key,
                                                        client_ca=pki.ca))
    yield running
    server.stop(running, 1)


@pytest.fixture(name="channel")
def _channel(planner: server.Running) -> Iterator[grpc.Channel]:
    """A real client channel to the planner fixture, sized for large snapshots."""
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{planner.port}", options=options) as channel:
        yield channel


@pytest.fixture(name="connect")
def _connect(fakepve: Any, fakepve_cafile: str) -> Callable[..., Connection]:
    """Connection settings for the fakepve fixture (password login, its CA verified)."""
    def make(**overrides: Any) -> Connection:
        options: dict[str, Any] = {"host": "127.0.0.1", "port": fakepve.port, "node": "pve1",
                                   "credentials": Credentials(user="root@pam", password="secret"),
                                   "ca_file": fakepve_cafile}
        options.update(overrides)
        return Connection(**options)
    return make


@pytest.fixture(name="node")
def _node(connect: Callable[..., Connection]) -> ProxmoxNode:
    """The real Proxmox adapter, logged in to fakepve over HTTPS."""
    return ProxmoxNode(connect())


@pytest.fixture(name="make_engine")
def _make_engine(node: ProxmoxNode, planner: server.Running, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """Engines built by the daemon's own wiring (``assemble``) over the real adapter, a real planner on
    loopback and a real journal; closed after."""
    made: list[tuple[Engine, GuestQueue]] = []
    yield _engine_maker(node, lambda reader: writer_for(getattr(reader, "session", node.session)), planner,
                        tmp_path, made)
    _close(made)


@pytest.fixture(name="pve")
def _pve() -> MemoryPve:
    """The in-memory Proxmox stand-in (``tests.pve_memory``): reader and writer, every call counted."""
    return MemoryPve()


@pytest.fixture(name="make_memory_engine")
def _make_memory_engine(pve: MemoryPve, planner: server.Running,
                        tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """``make_engine``'s engines over the in-memory stand-in (its reader and writer) instead of HTTPS."""
    made: list[tuple[Engine, GuestQueue]] = []
    yield _engine_maker(pve, lambda _reader: pve, planner, tmp_path, made)
    _close(made)


def _engine_maker(node: Any, default_writer: Callable[[Any], Any], planner: server.Running, tmp_path: Path,
                  made: list[tuple[Engine, GuestQueue]]) -> Callable[..., Engine]:
    """The engine factory of ``make_engine`` over the reader ``node`` (``default_writer`` makes its writer)."""

    def make(desired: list[Declared], *, max_parallel: int = 4, journal: bool = True, pve: Any = None,
             writer: Any = None, source: Source = Source.LOCAL_FILE, planner_target: str | None = None,
             provider: DesiredProvider | None = None, planner_client: PlannerClient | None = None,
             journal_dir: Path | None = None, holders: tuple[Callable[[], set[int]], ...] = (),
             desk: Callable[[Path], OpSettings] | None = None, parts: list[Parts] | None = None,
             **settings: Any) -> Engine:
        """``pve`` replaces the reader and ``writer`` the gate's writer (e.g. to widen a race window);
        ``provider`` the static one over ``desired``; ``planner_client`` the one to the test planner;
        ``journal_dir``: the journal opens there. ``desk`` adds an op desk whose settings it makes from the
        state dir (the journal's directory, else tmp_path/state); ``parts`` receives everything built."""
        calls = CallSettings(**{k: settings.pop(k) for k in ("shutdown_timeout", "force_stop") if k in settings})
        gate_settings = GateSettings(calls=calls, secret=b"test-gate-secret".ljust(32, b"."),
                                     **{k: settings.pop(k) for k in ("task_timeout", "max_stops_per_tick", "audience",
                                                                     "stop_window", "lost_grace")
                                        if k in settings})
        reader = pve or node
        writer = writer or default_writer(reader)
        where = journal_dir or (tmp_path / f"journal-{len(made)}" if journal else None)
        opened = Journal.open(where) if where is not None else None
        state_dir = opened.directory if opened is not None else tmp_path / "state"
        if desk is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
        built = assemble(reader=reader, writer=writer, journal=opened, gate=gate_settings, holders=holders,
                         planner=planner_client or PlannerClient(planner_target or f"127.0.0.1:{planner.port}"),
                         provider=provider or StaticProvider(desired, source=source), queue=GuestQueue(max_parallel),
                         engine=Settings(**{"backoff_base": 0.0, **settings}),
                         ops=desk(Path(state_dir)) if desk is not None else None)
        made.append((built.engine, built.queue))
        if parts is not None:
            parts.append(built)
        return built.engine

    return make


def _close(made: list[tuple[Engine, GuestQueue]]) -> None:
    for engine, queue in made:
        queue.close(5)
        engine.close()
        if engine.journal is not None:
            engine.journal.close()


@pytest.fixture(name="pg_server", scope="session")
def _pg_server() -> Iterator[Any]:
    """A real PostgreSQL server (initdb in a temp dir, a unix socket there) for the session; stopped by PID.

    Under pytest-xdist (make test) each worker that runs a PostgreSQL test starts its own: its own temp dir and
    unix socket there (no TCP port), its own PID to stop; nothing is shared between workers."""
    import shutil  # noqa: PLC0415  (only the hub's tests need PostgreSQL and psycopg)

    from tests import pgserver  # noqa: PLC0415
    if shutil.which("initdb") is None:
        pytest.skip("PostgreSQL's initdb is not on PATH")
    server = pgserver.start()
    try:
        yield server
    finally:
        pgserver.stop(server)


@pytest.fixture(name="providers")
def _providers() -> Iterator[list[HubProvider]]:
    """The hub providers a test made (append each): closed at its end."""
    made: list[HubProvider] = []
    yield made
    for provider in made:
        provider.close()
