"""The planner's server lifecycle: build (servicer, health, reflection), serve, drain on signal."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1.health import HealthServicer

from common import grpcserver
from common.grpcserver import ServerTls
from common.metrics import MetricsEndpoint, serve_metrics
from common.signals import stop_on_signals
from planner.metrics import PlannerMetrics
from planner.service import SERVICE_NAME, PlannerServicer
from planner.v1 import planner_pb2 as pb

log = structlog.get_logger("planner.server")
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _deterministic(message: pb.PlanResponse) -> bytes:
    """Serialize with sorted map keys: the same plan is the same bytes."""
    return message.SerializeToString(deterministic=True)


def add_planner(server: grpc.Server, servicer: PlannerServicer) -> None:
    """Register the servicer with deterministic response serialization."""
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.Plan, request_deserializer=pb.PlanRequest.FromString, response_serializer=_deterministic,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Plan": handler}),))


@dataclass(frozen=True, slots=True, kw_only=True)
class Running:
    """A started planner: its gRPC server and port, health, metrics and their endpoint."""

    grpc: grpcserver.Running
    metrics: PlannerMetrics
    metrics_endpoint: MetricsEndpoint | None

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.grpc.port

    @property
    def health(self) -> HealthServicer:
        """The health servicer."""
        return self.grpc.health


def start(listen: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, workers: int = 8,
          tls: ServerTls | None = None, metrics_listen: str | None = None) -> Running:
    """Bind ``listen`` (port 0 picks one), start, and mark SERVING once ready."""
    metrics = PlannerMetrics()
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    running = grpcserver.start(listen, lambda server: add_planner(server, PlannerServicer(metrics)), (SERVICE_NAME,),
                               tls=tls, workers=workers, options=options)
    try:
        endpoint = serve_metrics(metrics_listen, metrics.registry) if metrics_listen else None
    except OSError:
        running.stop(0)  # the gRPC port is released before the caller reports the taken one
        raise
    host = listen.rsplit(":", 1)[0]
    log.info("planner_listening", address=f"{host}:{running.port}", tls=tls is not None,
             mutual_tls=bool(tls and tls.client_ca), max_message_bytes=max_message_bytes,
             **({"metrics": f"{metrics_listen.rsplit(':', 1)[0]}:{endpoint.port}"} if endpoint and metrics_listen
                else {}))
    return Running(grpc=running, metrics=metrics, metrics_endpoint=endpoint)


def stop(running: Running, grace: float) -> None:
    """NOT_SERVING first so balancers move away, then let in-flight calls finish within ``grace``."""
    running.grpc.stop(grace)
    if running.metrics_endpoint is not None:
        running.metrics_endpoint.stop()
    log.info("planner_stopped")


def serve(listen: str, *, grace: float = 10.0, **options: object) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    done = stop_on_signals()
    running = start(listen, **options)  # type: ignore[arg-type]
    done.wait()
    stop(running, grace)
