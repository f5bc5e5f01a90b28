"""``pve-planner``: command line of the planner service."""

from __future__ import annotations

import argparse
import os
import sys

from planner import logs, server


def parser() -> argparse.ArgumentParser:
    """The argument parser (flags default from PVE_PLANNER_* environment variables)."""
    env = os.environ.get
    top = argparse.ArgumentParser(prog="pve-planner", description="pve-reconcile planner service")
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve planner.v1.PlannerService over gRPC")
    serve.add_argument("--listen", default=env("PVE_PLANNER_LISTEN", "127.0.0.1:50051"),
                       help="HOST:PORT to bind; port 0 picks a free one (default %(default)s)")
    serve.add_argument("--max-message-mb", type=int, default=int(env("PVE_PLANNER_MAX_MESSAGE_MB", "256")),
                       help="largest request/response in MiB (default %(default)s; 50,000 guests ~ 40)")
    serve.add_argument("--grace", type=float, default=float(env("PVE_PLANNER_GRACE", "10")),
                       help="seconds in-flight calls get on SIGTERM (default %(default)s)")
    serve.add_argument("--workers", type=int, default=int(env("PVE_PLANNER_WORKERS", "8")),
                       help="server thread pool size (default %(default)s)")
    serve.add_argument("--log-format", choices=("auto", "json", "console"),
                       default=env("PVE_PLANNER_LOG_FORMAT", "auto"),
                       help="auto: console on a TTY, JSON lines otherwise")
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pve-planner``."""
    args = parser().parse_args(argv)
    logs.configure(args.log_format)
    if args.max_message_mb <= 0 or args.workers <= 0 or args.grace < 0:
        print("pve-planner: --max-message-mb and --workers must be positive, --grace not negative",
              file=sys.stderr)
        return 2
    try:
        server.serve(args.listen, grace=args.grace, max_message_bytes=args.max_message_mb << 20,
                     workers=args.workers)
    except OSError as exc:
        print(f"pve-planner: {exc}", file=sys.stderr)
        return 1
    return 0
