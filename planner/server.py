"""The planner's server lifecycle: build (servicer, health, reflection), serve, drain on signal."""

from __future__ import annotations

import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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
    """A started server, its bound port and its health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer


def start(listen: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, workers: int = 8) -> Running:
    """Bind ``listen`` (port 0 picks one), start, and mark SERVING once ready."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    add_planner(server, PlannerServicer())
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot bind {listen}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = listen.rsplit(":", 1)[0]
    log.info("planner_listening", address=f"{host}:{port}", max_message_bytes=max_message_bytes)
    return Running(server=server, port=port, health=health_servicer)


def stop(running: Running, grace: float) -> None:
    """NOT_SERVING first so balancers move away, then let in-flight calls finish within ``grace``."""
    running.health.enter_graceful_shutdown()
    running.server.stop(grace).wait()
    log.info("planner_stopped")


def serve(listen: str, *, grace: float = 10.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
          workers: int = 8) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    done = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    running = start(listen, max_message_bytes=max_message_bytes, workers=workers)
    done.wait()
    stop(running, grace)
