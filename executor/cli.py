"""``pve-executor``: the node daemon (run), a dry run (plan) and a round-trip check (selftest)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from common import logs
from executor.pve import Connection, Credentials, PveError


class UsageError(ValueError):
    """A bad flag or environment value: exit code 2 with this message."""


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("PVE_EXECUTOR_" + name, default)


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", default=_env("NODE"), help="this node's name in the cluster [PVE_EXECUTOR_NODE]")
    parser.add_argument("--pve-url", default=_env("PVE_URL", "https://127.0.0.1:8006"),
                        help="https://HOST:PORT of the Proxmox API [PVE_EXECUTOR_PVE_URL]")
    parser.add_argument("--pve-user", default=_env("PVE_USER"), help="USER@REALM for password login")
    parser.add_argument("--pve-password-file", default=_env("PVE_PASSWORD_FILE"),
                        help="file holding the password (or PVE_EXECUTOR_PVE_PASSWORD)")
    parser.add_argument("--pve-token-id", default=_env("PVE_TOKEN_ID"), help="USER@REALM!ID of an API token")
    parser.add_argument("--pve-token-file", default=_env("PVE_TOKEN_FILE"),
                        help="file holding the token secret (or PVE_EXECUTOR_PVE_TOKEN_SECRET)")
    parser.add_argument("--pve-ca-file", default=_env("PVE_CA_FILE"), help="CA certificate to verify the API with")
    parser.add_argument("--pve-insecure", action="store_true", default=_env("PVE_INSECURE") == "1",
                        help="do not verify the API's TLS certificate (never in production)")
    parser.add_argument("--pve-timeout", type=float, default=float(_env("PVE_TIMEOUT", "30") or 30),
                        help="seconds per Proxmox request (default %(default)s)")
    parser.add_argument("--planner", default=_env("PLANNER", "127.0.0.1:50051"), help="planner HOST:PORT")
    parser.add_argument("--desired", default=_env("DESIRED"), help="desired-state YAML file (none: manage nothing)")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default=_env("LOG_FORMAT", "auto"))


def parser() -> argparse.ArgumentParser:
    """Flags; each also reads a PVE_EXECUTOR_* environment variable."""
    top = argparse.ArgumentParser(prog="pve-executor", description="pve-reconcile node executor")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="converge this node: recover, then tick every --interval")
    _connection_flags(run)
    run.add_argument("--state-dir", default=_env("STATE_DIR", "/var/lib/pve-reconcile"), help="journal directory")
    run.add_argument("--interval", type=float, default=float(_env("INTERVAL", "30") or 30), help="seconds per tick")
    run.add_argument("--max-parallel", type=int, default=int(_env("MAX_PARALLEL", "4") or 4),
                     help="guests mutated at once (default %(default)s)")
    run.add_argument("--listen", default=_env("LISTEN", "127.0.0.1:50052"), help="executor API HOST:PORT")
    run.add_argument("--shutdown-timeout", type=int, default=int(_env("SHUTDOWN_TIMEOUT", "60") or 60),
                     help="seconds a graceful shutdown gets before the forced stop")
    run.add_argument("--no-force-stop", action="store_true", help="never force a stop after the shutdown timeout")
    run.add_argument("--grace", type=float, default=float(_env("GRACE", "30") or 30),
                     help="seconds queued work gets to finish on SIGTERM")
    run.add_argument("--once", action="store_true", help="recover, run one tick, wait for it, exit (1 if it failed)")
    plan = sub.add_parser("plan", help="dry run: show what would change, mutate nothing")
    _connection_flags(plan)
    plan.add_argument("--json", action="store_true", help="the plan as JSON")
    check = sub.add_parser("selftest", help="write a description to a scratch guest, read it back, restore it")
    _connection_flags(check)
    check.add_argument("--vmid", type=int, required=True, help="a scratch guest whose description may be changed")
    return top


def _secret(path: str | None, env_name: str, what: str) -> str | None:
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read {what} file {path}: {exc.strerror}") from None
    return _env(env_name)


def connection(args: argparse.Namespace) -> Connection:
    """The Proxmox connection the flags describe (UsageError when incomplete)."""
    if not args.node:
        raise UsageError("--node is required (PVE_EXECUTOR_NODE)")
    url = urlsplit(args.pve_url)
    if url.scheme != "https" or not url.hostname:
        raise UsageError(f"--pve-url must be https://HOST:PORT, got {args.pve_url!r}")
    if args.pve_token_id:
        secret = _secret(args.pve_token_file, "PVE_TOKEN_SECRET", "token")
        if not secret or "!" not in args.pve_token_id:
            raise UsageError("--pve-token-id USER@REALM!ID needs --pve-token-file or PVE_EXECUTOR_PVE_TOKEN_SECRET")
        credentials = Credentials(user=args.pve_token_id, token_secret=secret)
    elif args.pve_user:
        password = _secret(args.pve_password_file, "PVE_PASSWORD", "password")
        if not password:
            raise UsageError("--pve-user needs --pve-password-file or PVE_EXECUTOR_PVE_PASSWORD")
        credentials = Credentials(user=args.pve_user, password=password)
    else:
        raise UsageError("give --pve-token-id (recommended) or --pve-user")
    if args.pve_ca_file and not Path(args.pve_ca_file).is_file():
        raise UsageError(f"--pve-ca-file {args.pve_ca_file}: no such file")
    return Connection(host=url.hostname, port=url.port or 8006, node=args.node, credentials=credentials,
                      ca_file=args.pve_ca_file, insecure=args.pve_insecure, timeout=args.pve_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pve-executor``."""
    args = parser().parse_args(argv)
    logs.configure(args.log_format)
    from executor import daemon  # noqa: PLC0415 (keeps `--help` fast)

    try:
        conn = connection(args)
        if args.command == "plan":
            return daemon.show_plan(args, conn)
        if args.command == "selftest":
            return daemon.run_selftest(args, conn)
        return daemon.run(args, conn)
    except UsageError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 2
    except PveError as exc:
        print(f"pve-executor: Proxmox: {exc}", file=sys.stderr)
        return 1
