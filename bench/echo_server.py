"""A bare gRPC server on the Plan method path: the transport baseline for bench_planner.

``--mode echo`` parses the PlanRequest and sends it back; ``--mode sink`` parses it and answers an
empty PlanResponse (transport of the request alone). Prints its port on stdout, serves until killed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc

from planner.v1 import planner_pb2 as pb

MAX = 512 * 1024 * 1024


def main() -> int:
    """Serve the baseline until SIGTERM."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--mode", choices=("echo", "sink"), default="echo")
    args = parser.parse_args()
    options = [("grpc.max_receive_message_length", MAX), ("grpc.max_send_message_length", MAX)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    if args.mode == "echo":
        handler = grpc.unary_unary_rpc_method_handler(
            lambda request, _ctx: request, request_deserializer=pb.PlanRequest.FromString,
            response_serializer=pb.PlanRequest.SerializeToString)
    else:
        handler = grpc.unary_unary_rpc_method_handler(
            lambda _request, _ctx: pb.PlanResponse(), request_deserializer=pb.PlanRequest.FromString,
            response_serializer=pb.PlanResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("planner.v1.PlannerService",
                                                                          {"Plan": handler}),))
    port = server.add_insecure_port(args.listen)
    server.start()
    print(port, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
