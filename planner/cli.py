"""``pve-planner``: command line of the planner service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common import logs
from common.config import ConfigError, add_flags, resolve
from common.grpcserver import check_listen, server_tls
from common.version import EXIT_CODES, add_version
from planner import server
from planner.config import ENV_PREFIX, OPTIONS


def parser() -> argparse.ArgumentParser:
    """The argument parser; every setting also comes from the TOML file or a PVE_PLANNER_* variable."""
    top = argparse.ArgumentParser(prog="pve-planner", description="pve-reconcile planner service", epilog=EXIT_CODES)
    add_version(top, "pve-planner")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND", help="serve: run the planner")
    serve = sub.add_parser("serve", help="serve planner.v1.PlannerService over gRPC", epilog=EXIT_CODES,
                           description="serve planner.v1.PlannerService over gRPC until SIGTERM or SIGINT")
    add_flags(serve, OPTIONS, ENV_PREFIX)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pve-planner``."""
    args = parser().parse_args(argv)
    try:
        config = resolve(OPTIONS, args, ENV_PREFIX)
        check_listen(config, ("listen", "metrics_listen"), unix=("listen",))
        settings = config.namespace()
        tls = server_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except ConfigError as exc:
        print(f"pve-planner: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.render())
        return 0
    logs.configure(settings.log_format)
    try:
        server.serve(settings.listen, grace=settings.grace, max_message_bytes=settings.max_message_mb << 20,
                     workers=settings.workers, tls=tls, metrics_listen=settings.metrics_listen)
    except ConfigError as exc:
        print(f"pve-planner: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port taken: one line, no traceback
        print(f"pve-planner: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
