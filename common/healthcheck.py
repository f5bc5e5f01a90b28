"""``pve-healthcheck [ADDRESS]``: exit 0 when the gRPC health service says SERVING (container checks).

ADDRESS is HOST:PORT or ``unix:PATH`` (the executor's socket). Without one it reads ``PVE_HEALTH_ADDRESS``,
so an exec-form ``HEALTHCHECK`` (no shell to expand a variable) can point it at either service.
Prints the serving status (SERVING, NOT_SERVING, ...).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import ConfigError
from common.grpcserver import OWN_SUBCHANNELS, ClientTls, channel_credentials, pair
from common.version import add_version

ADDRESS_VARIABLE = "PVE_HEALTH_ADDRESS"
HEALTH_EXIT_CODES = "exit codes: 0 SERVING; 1 anything else (NOT_SERVING, unreachable, TLS refused); 2 bad arguments"


def parser() -> argparse.ArgumentParser:
    """The flags; the client TLS flags are spelled as the other commands' (``--ca``, ``--client-cert``, ...)."""
    top = argparse.ArgumentParser(prog="pve-healthcheck", description=__doc__, epilog=HEALTH_EXIT_CODES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version(top, "pve-healthcheck")
    top.add_argument("address", nargs="?", default=os.environ.get(ADDRESS_VARIABLE) or None,
                     help=f"HOST:PORT or unix:PATH of a pve-reconcile service (default: ${ADDRESS_VARIABLE})")
    top.add_argument("--service", default="", help="service name ('' = the whole server)")
    top.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    for flag, old, what in (("--ca", "--tls-ca", "CA (PEM) of the server's certificate: turns TLS on"),
                            ("--client-cert", "--tls-cert", "client certificate (PEM) for mutual TLS"),
                            ("--client-key", "--tls-key", "client key (PEM) for mutual TLS")):
        dest = flag.removeprefix("--").replace("-", "_")
        top.add_argument(flag, dest=dest, metavar="PEM", help=what)
        top.add_argument(old, dest=dest, help=argparse.SUPPRESS)  # the old spelling still works
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Check one service's health; 0 SERVING, 1 anything else, 2 bad arguments."""
    args = parser().parse_args(argv)
    if not args.address:
        print(f"pve-healthcheck: address: give HOST:PORT or unix:PATH, or set {ADDRESS_VARIABLE}", file=sys.stderr)
        return 2
    try:
        pair(args.client_cert, args.client_key, ("client_cert", "client_key"))
        tls = (ClientTls(ca=args.ca, cert=args.client_cert, key=args.client_key,
                         names=("ca", "client_cert", "client_key"))
               if args.ca or args.client_cert or args.client_key else None)
        channel = (grpc.secure_channel(args.address, channel_credentials(tls), options=[OWN_SUBCHANNELS]) if tls
                   else grpc.insecure_channel(args.address, options=[OWN_SUBCHANNELS]))
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
