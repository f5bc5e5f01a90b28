"""The hub's server lifecycle: store, servicer, health, reflection, metrics; serve; drain on signal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from common import grpcserver
from common.grpcserver import ServerTls
from common.metrics import MetricsEndpoint, serve_metrics
from common.signals import stop_on_signals
from hub.metrics import HubMetrics
from hub.service import DEFAULT_HEARTBEAT, SERVICE_NAME, HubServicer
from hub.store import Store
from hub.v1 import hub_pb2_grpc as pb_grpc
from safety import desireddoc

if TYPE_CHECKING:
    from hub.web.server import WebEndpoint

log = structlog.get_logger("hub.server")
# Above the largest signed document envelope (desireddoc.MAX_ENVELOPE), with room for the message around it.
MAX_MESSAGE_BYTES = desireddoc.MAX_ENVELOPE + (1 << 20)
SPARE_WORKERS = 16  # threads for unary calls beyond the Watch streams (each stream holds one thread)


@dataclass(frozen=True, slots=True, kw_only=True)
class Running:
    """A started hub: its gRPC server and port, servicer, metrics and their endpoint."""

    grpc: grpcserver.Running
    servicer: HubServicer
    metrics: HubMetrics
    metrics_endpoint: MetricsEndpoint | None
    web_endpoint: WebEndpoint | None = None

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.grpc.port


def start(listen: str, store: Store, *, tls: ServerTls | None = None, metrics_listen: str | None = None,
          heartbeat: float = DEFAULT_HEARTBEAT, max_watchers: int = 1024, web_listen: str | None = None) -> Running:
    """Bind ``listen`` (port 0 picks one), start, and mark SERVING; the caller closes ``store`` after ``stop``."""
    metrics = HubMetrics()
    servicer = HubServicer(store, metrics=metrics, heartbeat=heartbeat, mutual_tls=bool(tls and tls.client_ca),
                           max_watchers=max_watchers)
    metrics.watch_fleet(servicer.fleet)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    running = grpcserver.start(listen, lambda server: pb_grpc.add_HubServiceServicer_to_server(servicer, server),
                               (SERVICE_NAME,), tls=tls, workers=max_watchers + SPARE_WORKERS, options=options)
    endpoint: MetricsEndpoint | None = None
    try:
        endpoint = serve_metrics(metrics_listen, metrics.registry) if metrics_listen else None
        web = _serve_web(web_listen, store, servicer, heartbeat) if web_listen else None
    except OSError:
        if endpoint is not None:
            endpoint.stop()
        servicer.close()
        running.stop(0)
        servicer.release()
        raise
    host = listen.rsplit(":", 1)[0]
    log.info("hub_listening", address=f"{host}:{running.port}", tls=tls is not None,
             mutual_tls=bool(tls and tls.client_ca), heartbeat=heartbeat, max_watchers=max_watchers,
             **({"metrics": f"{metrics_listen.rsplit(':', 1)[0]}:{endpoint.port}"} if endpoint and metrics_listen
                else {}),
             **({"web": f"http://{web_listen.rsplit(':', 1)[0]}:{web.port}/"} if web and web_listen else {}))
    return Running(grpc=running, servicer=servicer, metrics=metrics, metrics_endpoint=endpoint, web_endpoint=web)


def _serve_web(listen: str, store: Store, servicer: HubServicer, heartbeat: float) -> WebEndpoint:
    """The web page (imported here: it needs the operator's modules, which import this one)."""
    from hub.web.fleet import Fleet  # noqa: PLC0415
    from hub.web.server import serve_web  # noqa: PLC0415

    # The page reads as Status does: the store on the servicer's store threads, and its Watch activity.
    return serve_web(listen, Fleet(store, servicer.feeds.read, servicer._watched, heartbeat))


def stop(running: Running, grace: float) -> None:
    """NOT_SERVING, end the Watch streams, let unary calls finish within ``grace``."""
    running.grpc.health.enter_graceful_shutdown()
    if running.web_endpoint is not None:  # before the store threads it reads through stop
        running.web_endpoint.stop()
    running.servicer.close()
    running.grpc.stop(grace)
    running.servicer.release()
    if running.metrics_endpoint is not None:
        running.metrics_endpoint.stop()
    log.info("hub_stopped")


def serve(listen: str, store: Store, *, grace: float = 10.0, **options: object) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    done = stop_on_signals()
    running = start(listen, store, **options)  # type: ignore[arg-type]
    done.wait()
    stop(running, grace)
