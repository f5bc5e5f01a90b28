"""``pve-executor``: the node daemon (run), a dry run (plan) and a round-trip check (selftest)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from common import logs
from common.config import ConfigError, Option, add_flags, resolve
from common.grpcserver import ClientTls, ServerTls, is_loopback, pair, server_tls, socket_path
from common.unixfront import too_long
from executor import opcli
from executor.config import CONNECTION, ENV_PREFIX, EXTRAS, PLAN, RUN, STATE, ExecutorSettings
from executor.pve import Connection, Credentials, PveError


def parser() -> argparse.ArgumentParser:
    """Flags; every setting also comes from the TOML file or a PVE_EXECUTOR_* variable."""
    top = argparse.ArgumentParser(prog="pve-executor", description="pve-reconcile node executor")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="converge this node: recover, then tick every --interval")
    add_flags(run, (*CONNECTION, *RUN), ENV_PREFIX)
    run.add_argument("--once", action="store_true", help="recover, run one tick, wait for it, exit (1 if it failed)")
    plan = sub.add_parser("plan", help="dry run: show what would change, mutate nothing")
    add_flags(plan, (*CONNECTION, *PLAN), ENV_PREFIX)
    plan.add_argument("--json", action="store_true", help="the plan as JSON")
    check = sub.add_parser("selftest", help="write a description to a scratch guest, read it back, restore it")
    add_flags(check, CONNECTION, ENV_PREFIX)
    check.add_argument("--vmid", type=int, required=True, help="a scratch guest whose description may be changed")
    reset = sub.add_parser("clock-reset", help="after a clock that ran ahead (daemon stopped): let the gate's clock "
                                               "follow the wall clock again; ops signed before now are refused")
    add_flags(reset, STATE, ENV_PREFIX)
    opcli.add_parsers(sub)
    return top


def _secret(path: str | None, value: str | None, key: str) -> str | None:
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    return value


def connection(settings: ExecutorSettings) -> Connection:
    """The Proxmox connection the settings describe (ConfigError when incomplete)."""
    if not settings.node:
        raise ConfigError("node", "required (--node or PVE_EXECUTOR_NODE)")
    url = urlsplit(settings.pve_url)
    if url.scheme != "https" or not url.hostname:
        raise ConfigError("pve_url", f"must be https://HOST:PORT, got {settings.pve_url!r}")
    if settings.pve_token_id:
        secret = _secret(settings.pve_token_file, settings.pve_token_secret, "pve_token_file")
        if not secret or "!" not in settings.pve_token_id:
            raise ConfigError("pve_token_id", "USER@REALM!ID needs pve_token_file (or PVE_EXECUTOR_PVE_TOKEN_SECRET)")
        credentials = Credentials(user=settings.pve_token_id, token_secret=secret)
    elif settings.pve_user:
        password = _secret(settings.pve_password_file, settings.pve_password, "pve_password_file")
        if not password:
            raise ConfigError("pve_user", "needs pve_password_file (or PVE_EXECUTOR_PVE_PASSWORD)")
        credentials = Credentials(user=settings.pve_user, password=password)
    else:
        raise ConfigError("pve_token_id", "give pve_token_id (recommended) or pve_user")
    if settings.pve_ca_file and not Path(settings.pve_ca_file).is_file():
        raise ConfigError("pve_ca_file", f"{settings.pve_ca_file}: no such file")
    return Connection(host=url.hostname, port=url.port or 8006, node=settings.node, credentials=credentials,
                      ca_file=settings.pve_ca_file, insecure=settings.pve_insecure, timeout=settings.pve_timeout)


def planner_tls(settings: ExecutorSettings) -> ClientTls | None:
    """TLS towards the planner, when asked for (a client certificate makes it mutual)."""
    pair(settings.planner_client_cert, settings.planner_client_key, ("planner_client_cert", "planner_client_key"))
    if not (settings.planner_tls or settings.planner_ca or settings.planner_client_cert):
        return None
    return ClientTls(ca=settings.planner_ca, cert=settings.planner_client_cert, key=settings.planner_client_key)


def api_tls(settings: ExecutorSettings) -> ServerTls | None:
    """TLS of the executor API; beyond loopback it must be mutual: Reconcile mutates. A socket is local."""
    tls = server_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    path = socket_path(settings.listen)
    if path is not None:
        problem = too_long(path) if path else f"{settings.listen}: give unix:PATH"
        if problem is not None:
            raise ConfigError("listen", problem)
        return tls
    if not is_loopback(settings.listen) and not (tls and tls.client_ca):
        raise ConfigError("listen", f"{settings.listen} is beyond loopback: the executor API (Reconcile mutates) "
                                    "then requires tls_cert, tls_key and tls_client_ca (mutual TLS)")
    return tls


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - one exit per command and per error
    """Entry point of ``pve-executor``."""
    args = parser().parse_args(argv)
    if args.command in opcli.COMMANDS:  # the operator's commands talk to the executor API, never to Proxmox
        return opcli.main(args)
    options: tuple[Option, ...] = (*CONNECTION, *RUN) if args.command == "run" else CONNECTION
    from executor import daemon  # noqa: PLC0415 (keeps `--help` fast)

    options = {"plan": (*CONNECTION, *PLAN), "clock-reset": STATE}.get(args.command, options)
    try:
        config = resolve(options, args, ENV_PREFIX, others={o.key for o in (*CONNECTION, *RUN)})
        settings = ExecutorSettings.from_config(config, **{k: v for k, v in vars(args).items() if k in EXTRAS})
        if args.print_config:
            print(config.render())
            return 0
        logs.configure(settings.log_format)
        if args.command == "clock-reset":
            return daemon.reset_clock(settings)
        if args.command == "plan":
            from executor import dryrun  # noqa: PLC0415 (keeps `--help` fast)

            return dryrun.show_plan(settings)
        conn = connection(settings)
        if args.command == "selftest":
            return daemon.run_selftest(settings, conn)
        return daemon.run(settings, conn)
    except ConfigError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 2
    except PveError as exc:
        print(f"pve-executor: Proxmox: {exc}", file=sys.stderr)
        return 1
