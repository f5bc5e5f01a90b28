"""``pve-executor``: the node daemon (run), a dry run (plan), who it is (whoami), a round-trip check (selftest)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common import logs
from common.config import ConfigError, Option, add_flags, resolve
from common.grpcserver import check_listen
from common.version import EXIT_CODES, add_version
from executor.app.connect import connection
from executor.config import CONNECTION, ENV_PREFIX, EXTRAS, PLAN, RUN, STATE, ExecutorSettings
from executor.pve.node import PveError
from opctl import cli as opcli

ALL = (*CONNECTION, *RUN)
STATE_DIR = tuple(o for o in RUN if o.key == "state_dir")
WHOAMI = (*CONNECTION, *(o for o in RUN if o.key in ("state_dir", "trust_store", "executor_id")))
# The settings each command reads (the one config file holds them all: each command skips the others').
OPTIONS: dict[str, tuple[Option, ...]] = {"run": ALL, "plan": (*CONNECTION, *PLAN), "whoami": WHOAMI,
                                          "selftest": (*CONNECTION, *STATE_DIR), "clock-reset": STATE}
ALIASES = {"status": "whoami"}
PLAN_EXIT_CODES = """exit codes: 0 nothing to change: the node matches the desired state
  1  Proxmox or the planner failed
  2  a bad flag, config or desired file (each mistake named with file:line; nothing planned)
  3  changes to make: `run` would make them
  4  an operator is needed: a step needs APPROVAL or is refused, or a guest is skipped

colour only on a terminal, never when NO_COLOR is set"""


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str,
             aliases: Sequence[str] = (), exit_codes: str = EXIT_CODES) -> argparse.ArgumentParser:
    """A subcommand with its settings' flags and the exit codes in its ``--help``."""
    command = sub.add_parser(name, help=summary, description=summary, epilog=exit_codes, aliases=list(aliases),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(command, OPTIONS[name], ENV_PREFIX)
    return command


def parser() -> argparse.ArgumentParser:
    """Flags; every setting also comes from the TOML file or a PVE_EXECUTOR_* variable."""
    top = argparse.ArgumentParser(prog="pve-executor", description="pve-reconcile node executor", epilog=EXIT_CODES)
    add_version(top, "pve-executor")
    sub = top.add_subparsers(dest="command", required=True, metavar="<command>",
                             help="run | plan | whoami | selftest | clock-reset | keys | trust | pending | op | "
                                  "desired")
    run = _command(sub, "run", "converge this node: recover, then tick every --interval (one executor per "
                               "state directory: a second one refuses to start)")
    run.add_argument("--once", action="store_true", help="recover, run one tick, wait for it, exit (1 if it failed)")
    plan = _command(sub, "plan", "dry run: show what would change, mutate nothing", exit_codes=PLAN_EXIT_CODES)
    plan.add_argument("--json", action="store_true",
                      help="the plan as JSON: steps, pending, skipped, elsewhere, staged, summary, exit_code")
    who = _command(sub, "whoami", "this executor's audience (executor_id), trust store and the roles naming it, "
                                  "state directory and journal, Proxmox reachability; exit 1 if something is wrong",
                   aliases=("status",))
    who.add_argument("--json", action="store_true", help="the report as JSON")
    check = _command(sub, "selftest", "write a description to a scratch guest, read it back, restore it")
    check.add_argument("--vmid", type=int, required=True, help="a scratch guest whose description may be changed")
    _command(sub, "clock-reset", "after a clock that ran ahead (daemon stopped): let the gate's clock "
                                 "follow the wall clock again; ops signed before now are refused")
    opcli.add_parsers(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - one exit per command and per error
    """Entry point of ``pve-executor``."""
    args = parser().parse_args(argv)
    if args.command in opcli.COMMANDS:  # the operator's commands talk to the executor API, never to Proxmox
        return opcli.main(args)
    command = ALIASES.get(args.command, args.command)
    from executor.app import daemon  # noqa: PLC0415 (keeps `--help` fast)

    try:
        config = resolve(OPTIONS[command], args, ENV_PREFIX, others={o.key for o in ALL})
        check_listen(config, ("listen", "metrics_listen"), unix=("listen",))
        settings = ExecutorSettings.from_config(config, **{k: v for k, v in vars(args).items() if k in EXTRAS})
        if args.print_config:
            print(config.render())
            return 0
        logs.configure(settings.log_format)
        if command == "clock-reset":
            return daemon.reset_clock(settings)
        if command == "plan":
            from executor.app import dryrun  # noqa: PLC0415 (keeps `--help` fast)

            return dryrun.show_plan(settings)
        conn = connection(settings)
        if command == "whoami":
            from executor.app import whoami  # noqa: PLC0415 (keeps `--help` fast)

            return whoami.run_whoami(settings, conn)
        if command == "selftest":
            return daemon.run_selftest(settings, conn)
        return daemon.run(settings, conn)
    except ConfigError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 2
    except PveError as exc:
        print(f"pve-executor: Proxmox: {exc}", file=sys.stderr)
        return 1
