"""``pve-healthcheck [ADDRESS]``: exit 0 when the gRPC health service says SERVING (container checks).

ADDRESS is HOST:PORT or ``unix:PATH`` (the executor's socket). Without one it reads ``PVE_HEALTH_ADDRESS``,
so an exec-form ``HEALTHCHECK`` (no shell to expand a variable) can point it at either service.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import ConfigError
from common.grpcserver import ClientTls, channel_credentials

ADDRESS_VARIABLE = "PVE_HEALTH_ADDRESS"


def main(argv: Sequence[str] | None = None) -> int:
    """Check one service's health; 0 SERVING, 1 anything else, 2 bad arguments."""
    parser = argparse.ArgumentParser(prog="pve-healthcheck", description=__doc__)
    parser.add_argument("address", nargs="?", default=os.environ.get(ADDRESS_VARIABLE) or None,
                        help=f"HOST:PORT or unix:PATH of a pve-reconcile service (default: ${ADDRESS_VARIABLE})")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--tls-ca", help="CA of the server certificate (TLS)")
    parser.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="client key (mutual TLS)")
    args = parser.parse_args(argv)
    if not args.address:
        print(f"pve-healthcheck: address: give HOST:PORT or unix:PATH, or set {ADDRESS_VARIABLE}", file=sys.stderr)
        return 2
    try:
        tls = ClientTls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) if args.tls_ca or args.tls_cert else None
        channel = (grpc.secure_channel(args.address, channel_credentials(tls)) if tls
                   else grpc.insecure_channel(args.address))
    except ConfigError as exc:
        print(f"pve-healthcheck: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout).status
        except grpc.RpcError as exc:
            print(f"pve-healthcheck: {args.address}: {exc.code().name}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(name)
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
