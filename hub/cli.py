"""``pve-hub``: serve the hub, and the operator's commands (``apply``, ``history``, ``show``, ``status``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from common import logs
from common.config import ConfigError, add_flags, resolve
from common.grpcserver import check_listen, server_tls
from common.version import add_version
from hub.config import DEFAULT_ADDRESS, ENV_PREFIX, OPTIONS

EXIT_CODES = ("exit codes: 0 ok; 1 refused or failed (another apply came first, --check-version is not the latest, "
              "the hub is unavailable, no such version, port in use); 2 usage or configuration error (bad flag, a "
              "desired file with mistakes, an unreadable key or file)")
STATUS_EXIT_CODES = ("exit codes (Terraform-like, as pve-executor plan): 0 every node in sync; 3 drift the executors "
                     "are converging (drifted, staged, failed and retried); 4 an operator is needed (an approval "
                     "waiting, a refused or skipped guest, a NACK, a stale node, a tick that fails); 1 the hub could "
                     "not be reached or failed (no such node); 2 usage")
MAX_DSN = 4096
WAIT_TIMEOUT = 300.0  # pve-hub submit --wait: how long to wait by default
SUBMIT_EXIT_CODES = ("exit codes: 0 queued (with --wait: it ran ok; an op.revoke: it took effect); 1 refused, "
                     "revoked or failed (by the node; or by the hub: no node has its audience, the hub unavailable); "
                     "3 with --wait, still waiting after --timeout; 2 usage or configuration error (a bad flag, an "
                     "unreadable or malformed envelope file)")


def _client(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str,
            epilog: str = EXIT_CODES) -> argparse.ArgumentParser:
    command = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog)
    command.add_argument("--hub", default=DEFAULT_ADDRESS, metavar="ADDRESS",
                         help=f"the hub's HOST:PORT (default {DEFAULT_ADDRESS})")
    command.add_argument("--hub-ca", metavar="FILE", help="CA (PEM) of the hub's certificate: use TLS")
    command.add_argument("--hub-client-cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    command.add_argument("--hub-client-key", metavar="FILE", help="its private key (PEM)")
    command.add_argument("--cluster", required=True, help="the cluster (the @CLUSTER of its executors)")
    return command


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    top = argparse.ArgumentParser(prog="pve-hub", description="pve-reconcile hub: one signed desired state per "
                                  "cluster, versioned, streamed to every node", epilog=EXIT_CODES)
    add_version(top, "pve-hub")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND",
                             help="serve | apply | history | show | status | pending | submit")
    serve = sub.add_parser("serve", help="serve hub.v1.HubService over gRPC", epilog=EXIT_CODES,
                           description="serve hub.v1.HubService over gRPC until SIGTERM or SIGINT")
    add_flags(serve, OPTIONS, ENV_PREFIX)
    apply = _client(sub, "apply", "check a desired file, show the diff against the latest version, sign it as "
                                  "the next version and upload it")
    apply.add_argument("file", metavar="FILE", help="the desired file (YAML; - for stdin)")
    apply.add_argument("--key", required=True, metavar="FILE", help="your Ed25519 private key (PEM)")
    apply.add_argument("--passphrase-file", metavar="FILE", help="the key's passphrase (default: ask)")
    apply.add_argument("--role", required=True, help="the trust store role naming desired.apply you sign as")
    apply.add_argument("--message", required=True, metavar="M", help="what changes and why (one line)")
    apply.add_argument("--author", help="who (default user@host)")
    apply.add_argument("--check-version", type=int, metavar="N",
                       help="apply only if N is the latest version (0: the cluster has none yet)")
    apply.add_argument("--dry-run", action="store_true", help="check and show the diff; sign and send nothing")
    history = _client(sub, "history", "list the cluster's versions, newest first")
    history.add_argument("--limit", type=int, default=20, metavar="N", help="at most N versions (default 20)")
    show = _client(sub, "show", "print a version's desired text (stdout) and who applied it, when, why (stderr)")
    show.add_argument("version", type=int, metavar="VERSION", help="the version (0: the latest)")
    status = _client(sub, "status", "the cluster at a glance: per node the version it holds, its last ACK or NACK, "
                                    "its guests by sync state and when it last reported (a stale node stands out)",
                     epilog=STATUS_EXIT_CODES)
    status.add_argument("--node", metavar="NODE", help="one node's guests: drifted keys (declared against actual), "
                                                      "reasons, approvals waiting, recent signed ops")
    status.add_argument("--json", action="store_true", help="print JSON (the same words as the text)")
    _approvals(sub)
    return top


def _approvals(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``pending`` and ``submit``: approvals through the hub (hub.approvals)."""
    pending = _client(sub, "pending", "every node's changes waiting for a signed op, with the commands that sign "
                                      "each (offline, your own keys)")
    pending.epilog = ("exit codes: 0 ok (nothing pending too); 1 the hub could not be reached, or --descriptor "
                      "matches no entry or several; 2 usage")
    pending.add_argument("--json", action="store_true", help="as JSON: entries pve-executor op sign takes")
    pending.add_argument("--descriptor", metavar="SHA256", help="only the entry whose descriptor sha256 starts so "
                                                                "(with --json: that entry alone, for op sign)")
    submit = _client(sub, "submit", "route a signed op (or op.revoke) to the node its audience names; the node "
                                    "verifies it as its own API does (the hub carries, it cannot approve)")
    submit.epilog = SUBMIT_EXIT_CODES
    submit.add_argument("envelope", metavar="ENVELOPE", help="the signed op (op sign/cosign output; - for stdin)")
    submit.add_argument("--wait", action="store_true", help="then wait for the node's verdict and the op's fate")
    submit.add_argument("--timeout", type=float, default=WAIT_TIMEOUT, metavar="S",
                        help=f"with --wait: how long to wait (default {WAIT_TIMEOUT:g} s)")
    submit.add_argument("--json", action="store_true", help="with --wait: the outcome as JSON")


def _read_dsn(path: str) -> str:
    """The connection string in ``path`` (never logged: it may hold a password)."""
    try:
        text = Path(path).read_text(encoding="utf-8")[:MAX_DSN + 1]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("postgres_dsn_file", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    dsn = text.strip()
    if not dsn or len(dsn) > MAX_DSN:
        raise ConfigError("postgres_dsn_file", f"{path} must hold one libpq connection string")
    return dsn


def _serve(args: argparse.Namespace) -> int:
    from hub import server  # noqa: PLC0415 (keeps the client commands and --help fast)
    from hub.store import PostgresStore, SqliteStore, Store, StoreError  # noqa: PLC0415

    try:
        config = resolve(OPTIONS, args, ENV_PREFIX)
        check_listen(config, ("listen", "metrics_listen", "web_listen"))
        settings = config.namespace()
        tls = server_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        dsn = _read_dsn(settings.postgres_dsn_file) if settings.postgres_dsn_file else None
    except ConfigError as exc:
        print(f"pve-hub: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.render())
        return 0
    logs.configure(settings.log_format)
    try:
        store: Store = PostgresStore(dsn) if dsn else SqliteStore.in_dir(settings.state_dir)
    except (StoreError, OSError) as exc:
        where = "the PostgreSQL store (--postgres-dsn-file)" if dsn else f"the store in {settings.state_dir}"
        print(f"pve-hub: cannot open {where}: {exc}", file=sys.stderr)
        return 1
    try:
        server.serve(settings.listen, store, grace=settings.grace, tls=tls, metrics_listen=settings.metrics_listen,
                     heartbeat=settings.heartbeat, max_watchers=settings.max_watchers, web_listen=settings.web_listen)
    except ConfigError as exc:
        print(f"pve-hub: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port taken: one line, no traceback
        print(f"pve-hub: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def _operator(args: argparse.Namespace) -> int:
    from common.config import ConfigError  # noqa: PLC0415
    from hub import approvals, client  # noqa: PLC0415
    from opctl.doc import OpError  # noqa: PLC0415

    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "apply": client.apply, "history": client.history, "show": client.show, "status": client.status,
        "pending": approvals.pending, "submit": approvals.submit}
    try:
        return commands[args.command](args)
    except (OpError, ConfigError) as exc:
        print(f"pve-hub {args.command}: {exc}", file=sys.stderr)
        return 2
    except client.Failed as exc:
        print(f"pve-hub {args.command}: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pve-hub``."""
    args = parser().parse_args(argv)
    return _serve(args) if args.command == "serve" else _operator(args)
