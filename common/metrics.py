"""The Prometheus scrape endpoint: a small HTTP server for one registry."""

from __future__ import annotations

from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from common.grpcserver import bind_error


@dataclass(frozen=True, slots=True)
class MetricsEndpoint:
    """A running /metrics server."""

    server: WSGIServer
    port: int

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(listen: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve ``registry`` at http://HOST:PORT/metrics (port 0 picks one); OSError "cannot listen on ..." if taken."""
    host, _, port = listen.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
    except OSError as exc:
        raise bind_error(listen, exc) from exc
    return MetricsEndpoint(server, int(server.server_port))
