"""One lifecycle for both gRPC services: servicer + health + reflection, TLS or not, stop with grace.

``unix:PATH`` serves a Unix socket through a front (``common.unixfront``) that knows each caller's uid;
HOST:PORT binds TCP as before.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.callers import CallerInterceptor
from common.config import Config, ConfigError
from common.unixfront import UnixFront


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTls:
    """A server certificate and key; with ``client_ca``, clients must present a certificate it signed."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTls:
    """How a client verifies a server (``ca``) and, for mutual TLS, proves itself (``cert``, ``key``)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    # The settings the three files came from, as the operator spells them: a bad file's error names its flag.
    names: tuple[str, str, str] = ("tls_ca", "tls_client_cert", "tls_client_key")


PLANNER_CLIENT = ("planner_ca", "planner_client_cert", "planner_client_key")  # the executor's, towards the planner


def pair(cert: str | None, key: str | None, names: tuple[str, str]) -> None:
    """The one TLS rule every service shares: a certificate and its key go together."""
    if bool(cert) != bool(key):
        raise ConfigError(names[0], f"{names[0]} and {names[1]} go together")


def server_tls(cert: str | None, key: str | None, client_ca: str | None) -> ServerTls | None:
    """A server's TLS settings checked (None: plaintext); a client CA makes it mutual and needs the pair."""
    pair(cert, key, ("tls_cert", "tls_key"))
    if client_ca and not cert:
        raise ConfigError("tls_client_ca", "mutual TLS needs tls_cert and tls_key too")
    return ServerTls(cert=cert, key=key, client_ca=client_ca) if cert and key else None


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """gRPC server credentials (client certificates required when a client CA is given)."""
    ca = _read(tls.client_ca, "tls_client_ca") if tls.client_ca else None
    return grpc.ssl_server_credentials([(_read(tls.key, "tls_key"), _read(tls.cert, "tls_cert"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


# gRPC Python shares one subchannel per address across every channel of a process: a channel made after a
# failed connection to that address (a peer that was down, a port used before) inherits its backoff and fails
# at once with the stale "Connection refused". Each client keeps its own.
OWN_SUBCHANNELS = ("grpc.use_local_subchannel_pool", 1)


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """gRPC channel credentials (system CAs unless ``ca``; a client certificate when given)."""
    ca, cert, key = tls.names
    pair(tls.cert, tls.key, (cert, key))
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, ca) if tls.ca else None,
        private_key=_read(tls.key, key) if tls.key else None,
        certificate_chain=_read(tls.cert, cert) if tls.cert else None)


def socket_path(listen: str) -> str | None:
    """The path of a ``unix:PATH`` (or ``unix:///PATH``) address; None for HOST:PORT."""
    if not listen.startswith("unix:"):
        return None
    path = listen.removeprefix("unix:")
    return path[2:] if path.startswith("//") else path


def listen_problem(listen: str, *, unix: bool = True) -> str | None:
    """What is wrong with a listen address (None: HOST:PORT, or ``unix:PATH`` when ``unix``)."""
    if socket_path(listen) is not None:
        return None if unix else f"{listen!r}: a Unix socket is not possible here; give HOST:PORT"
    host, colon, port = listen.rpartition(":")
    if not colon or not port:
        return f"{listen!r} has no port: give HOST:PORT, e.g. {listen.rstrip(':') or '127.0.0.1'}:50051"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return f"{listen!r}: an IPv6 host goes in brackets, e.g. [::1]:50051"
    if not port.isdigit() or int(port) > 65535:
        return f"{listen!r}: the port must be a number from 0 to 65535, got {port!r}"
    return None


def check_listen(config: Config, keys: Sequence[str], *, unix: Sequence[str] = ()) -> None:
    """ConfigError naming the setting and where it came from (e.g. ``--listen``) for a bad address among ``keys``."""
    for key in keys:
        value = config.values.get(key)
        if value:
            problem = listen_problem(str(value), unix=key in unix)
            if problem is not None:
                raise ConfigError(key, problem, config.sources.get(key, ""))


def bind_error(listen: str, cause: OSError | None = None) -> OSError:
    """An OSError that says in one line why ``listen`` cannot be bound ("address in use", ...)."""
    if cause is None and socket_path(listen) is None:
        host, _, port = listen.rpartition(":")
        try:  # gRPC does not say why a bind failed: ask the kernel the same question
            family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            cause = exc
        except ValueError:
            pass
    code = cause.errno if cause is not None and cause.errno else errno.EADDRNOTAVAIL
    reason = "address in use" if code == errno.EADDRINUSE else (
        os.strerror(code).lower() if cause is not None and cause.errno else "cannot bind")
    return OSError(code, f"cannot listen on {listen}: {reason}")


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT binds only loopback (127.0.0.0/8, ::1, localhost)."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Running:
    """A started server, its bound port (1 on a socket) and its health servicer; ``front`` on a Unix socket."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    names: tuple[str, ...] = ()
    front: UnixFront | None = None

    def set_serving(self, serving: bool) -> None:
        """SERVING or NOT_SERVING for the server and each of its services (e.g. while recovering)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.names):
            self.health.set(name, status)

    def stop(self, grace: float) -> None:
        """NOT_SERVING first so balancers move away, then let in-flight calls finish within ``grace``."""
        self.health.enter_graceful_shutdown()
        if self.front is not None:
            self.front.stop_accepting()  # no new caller; those in flight keep their relays for the grace
        self.server.stop(grace).wait()
        if self.front is not None:
            self.front.close()


def start(listen: str, register: Callable[[grpc.Server], None], service_names: Sequence[str], *,
          tls: ServerTls | None = None, workers: int = 8, options: Sequence[tuple[str, Any]] = (),
          socket_group: str | None = None, audited: frozenset[str] | None = None) -> Running:
    """Build, bind (port 0 picks one; ``unix:PATH`` a socket), start, and mark SERVING.

    OSError when the address cannot be bound (``unixfront.SocketInUseError`` when a live process serves
    the socket). ``audited``: name each call's caller and log these methods with it (``common.callers``);
    a socket always names its callers. ``socket_group``: the group the socket (0660) is given.
    """
    path = socket_path(listen)
    front = UnixFront(path, group=socket_group) if path is not None else None
    if front is not None:
        front.open()
    try:
        running = _serve(front.backend if front else None, listen, register, service_names, tls=tls,
                         workers=workers, options=options, front=front, audited=audited)
    except BaseException:
        if front is not None:
            front.close()
        raise
    if front is not None:
        front.serve()
    running.set_serving(True)
    return running


def _serve(backend: str | None, listen: str, register: Callable[[grpc.Server], None], service_names: Sequence[str],
           *, tls: ServerTls | None, workers: int, options: Sequence[tuple[str, Any]], front: UnixFront | None,
           audited: frozenset[str] | None) -> Running:
    interceptors = [CallerInterceptor(front, audited or frozenset())] if front or audited is not None else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors,
                         options=[("grpc.so_reuseport", 0), *options])
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((*service_names, health_name, reflection.SERVICE_NAME), server)
    address = f"unix:{backend}" if backend else listen
    try:
        port = server.add_secure_port(address, server_credentials(tls)) if tls else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise bind_error(listen)
    server.start()
    return Running(server, port, health_servicer, tuple(service_names), front)
