"""One lifecycle for both gRPC services: servicer + health + reflection, TLS or not, stop with grace."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.config import ConfigError


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
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """gRPC server credentials (client certificates required when a client CA is given)."""
    ca = _read(tls.client_ca, "tls_client_ca") if tls.client_ca else None
    return grpc.ssl_server_credentials([(_read(tls.key, "tls_key"), _read(tls.cert, "tls_cert"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """gRPC channel credentials (system CAs unless ``ca``; a client certificate when given)."""
    pair(tls.cert, tls.key, ("tls_client_cert", "tls_client_key"))
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "tls_ca") if tls.ca else None,
        private_key=_read(tls.key, "tls_client_key") if tls.key else None,
        certificate_chain=_read(tls.cert, "tls_client_cert") if tls.cert else None)


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
    """A started server, its bound port and its health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    names: tuple[str, ...] = ()

    def set_serving(self, serving: bool) -> None:
        """SERVING or NOT_SERVING for the server and each of its services (e.g. while recovering)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.names):
            self.health.set(name, status)

    def stop(self, grace: float) -> None:
        """NOT_SERVING first so balancers move away, then let in-flight calls finish within ``grace``."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def start(listen: str, register: Callable[[grpc.Server], None], service_names: Sequence[str], *,
          tls: ServerTls | None = None, workers: int = 8, options: Sequence[tuple[str, Any]] = ()) -> Running:
    """Build, bind (port 0 picks one), start, and mark SERVING; OSError when the address cannot be bound."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.so_reuseport", 0), *options])
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((*service_names, health_name, reflection.SERVICE_NAME), server)
    try:
        port = server.add_secure_port(listen, server_credentials(tls)) if tls else server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot bind {listen}")
    server.start()
    running = Running(server, port, health_servicer, tuple(service_names))
    running.set_serving(True)
    return running
