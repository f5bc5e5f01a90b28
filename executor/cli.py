"""``pve-executor``: the node daemon (run), a dry run (plan) and a round-trip check (selftest)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common import logs
from common.config import ConfigError, Option, add_flags, resolve
from executor.app.connect import connection
from executor.config import CONNECTION, ENV_PREFIX, EXTRAS, PLAN, RUN, STATE, ExecutorSettings
from executor.pve.node import PveError
from opctl import cli as opcli

PLAN_EXIT_CODES = """exit codes:
  0  nothing to change: the node matches the desired state
  1  Proxmox or the planner failed
  2  a bad flag, config or desired file (each mistake named with file:line; nothing planned)
  3  changes to make: `run` would make them
  4  an operator is needed: a step needs APPROVAL or is refused, or a guest is skipped

colour only on a terminal, never when NO_COLOR is set"""


def parser() -> argparse.ArgumentParser:
    """Flags; every setting also comes from the TOML file or a PVE_EXECUTOR_* variable."""
    top = argparse.ArgumentParser(prog="pve-executor", description="pve-reconcile node executor")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="converge this node: recover, then tick every --interval")
    add_flags(run, (*CONNECTION, *RUN), ENV_PREFIX)
    run.add_argument("--once", action="store_true", help="recover, run one tick, wait for it, exit (1 if it failed)")
    plan = sub.add_parser("plan", help="dry run: show what would change, mutate nothing", epilog=PLAN_EXIT_CODES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(plan, (*CONNECTION, *PLAN), ENV_PREFIX)
    plan.add_argument("--json", action="store_true",
                      help="the plan as JSON: steps, pending, skipped, elsewhere, summary, exit_code")
    check = sub.add_parser("selftest", help="write a description to a scratch guest, read it back, restore it")
    add_flags(check, CONNECTION, ENV_PREFIX)
    check.add_argument("--vmid", type=int, required=True, help="a scratch guest whose description may be changed")
    reset = sub.add_parser("clock-reset", help="after a clock that ran ahead (daemon stopped): let the gate's clock "
                                               "follow the wall clock again; ops signed before now are refused")
    add_flags(reset, STATE, ENV_PREFIX)
    opcli.add_parsers(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - one exit per command and per error
    """Entry point of ``pve-executor``."""
    args = parser().parse_args(argv)
    if args.command in opcli.COMMANDS:  # the operator's commands talk to the executor API, never to Proxmox
        return opcli.main(args)
    options: tuple[Option, ...] = (*CONNECTION, *RUN) if args.command == "run" else CONNECTION
    from executor.app import daemon  # noqa: PLC0415 (keeps `--help` fast)

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
            from executor.app import dryrun  # noqa: PLC0415 (keeps `--help` fast)

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
