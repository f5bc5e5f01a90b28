"""The daemon's lifecycle, and the dry-run command.

run: open the journal (journal-less with a loud warning if it cannot open), recover in-flight
operations, then tick every interval until SIGTERM/SIGINT; then stop ticking, drain the queue
within the grace period, close the journal.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import structlog
from google.protobuf.json_format import MessageToDict

from common.metrics import serve_metrics
from common.signals import stop_on_signals
from executor.desired import DesiredProvider, DesiredStateError, EmptyProvider, FileProvider
from executor.engine import Engine, Settings, TickOutcome
from executor.metrics import ExecutorMetrics
from executor.planner_client import (
    RUN_STATES,
    PlannerClient,
    PlannerUnavailableError,
    actual_to_proto,
    desired_to_proto,
)
from executor.pve import Connection, ProxmoxNode, Pve
from executor.queue import GuestQueue
from executor.recovery import recover
from executor.selftest import selftest
from executor.server import start_api
from journal import Journal, JournalOpenError
from planner.v1 import planner_pb2 as pb

log = structlog.get_logger("executor.daemon")


def provider(args: argparse.Namespace) -> DesiredProvider:
    """FileProvider for --desired, else EmptyProvider (manage nothing)."""
    if not args.desired:
        return EmptyProvider()
    try:
        return FileProvider(args.desired)
    except OSError as exc:
        raise DesiredStateError(f"{args.desired}: cannot read: {exc.strerror}") from None


def open_journal(state_dir: str) -> Journal | None:
    """The journal, or None (with a loud warning) when it cannot open."""
    try:
        return Journal.open(state_dir)
    except JournalOpenError as exc:
        log.error("journal_unavailable_running_without_it", state_dir=state_dir, error=str(exc),
                  consequence="in-flight operations will not survive a crash")
        return None


def run(args: argparse.Namespace, conn: Connection) -> int:
    """``pve-executor run``."""
    try:
        desired = provider(args)
    except DesiredStateError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 2
    metrics = ExecutorMetrics()
    pve = ProxmoxNode(conn, on_error=metrics.pve_error)
    journal = open_journal(args.state_dir)
    if journal is not None:
        recover(journal, pve)
    queue = GuestQueue(args.max_parallel)
    planner = PlannerClient(args.planner, tls=args.planner_credentials)
    settings = Settings(shutdown_timeout=args.shutdown_timeout, force_stop=args.force_stop)
    engine = Engine(pve=pve, planner=planner, provider=desired, queue=queue, journal=journal, settings=settings,
                    metrics=metrics)
    endpoint = serve_metrics(args.metrics_listen, metrics.registry) if args.metrics_listen else None
    if endpoint is not None:
        log.info("metrics_listening", address=f"{args.metrics_listen.rsplit(':', 1)[0]}:{endpoint.port}")
    try:
        if args.once:
            summary = engine.tick(wait=True)
            return 0 if summary.outcome is TickOutcome.OK else 1
        return _loop(engine, args)
    finally:
        unfinished = queue.close(args.grace)
        if unfinished:
            log.warning("shutdown_unfinished", jobs=[f"{j.vmid}:{j.label}" for j in unfinished])
        engine.close()
        planner.close()
        if endpoint is not None:
            endpoint.stop()
        if engine.journal is not None:
            engine.journal.close()


def _loop(engine: Engine, args: argparse.Namespace) -> int:
    stop = stop_on_signals()
    api = start_api(engine, args.listen, tls=args.api_tls)
    try:
        while not stop.is_set():
            engine.tick()
            stop.wait(args.interval)
    finally:
        api.stop(5.0)
    return 0


def read_plan(pve: Pve, planner: PlannerClient, desired: DesiredProvider) -> tuple[Any, dict[int, dict[str, str]]]:
    """The plan for the node now, and the configs read (to show current values)."""
    declared = desired.desired()
    guests = {g.vmid: g for g in pve.guests() if g.status in RUN_STATES}
    configs = {d.vmid: pve.config(guests[d.vmid].type, d.vmid) for d in declared
               if d.vmid in guests and (d.config is not None or d.description is not None)}
    actual = [actual_to_proto(guests[d.vmid], configs.get(d.vmid)) for d in declared if d.vmid in guests]
    plan = planner.plan(desired_to_proto(declared), actual)
    return plan, {vmid: config for vmid, (config, _) in configs.items()}


def render(plan: Any, configs: dict[int, dict[str, str]], color: bool) -> str:
    """The plan as a person reads it: per guest, key, current and desired."""
    def paint(text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if color else text

    lines = []
    for action in plan.actions:
        kind = action.WhichOneof("kind")
        if kind == "set_config":
            lines.append(paint(f"guest {action.vmid}: set config", "1"))
            current = configs.get(action.vmid, {})
            for key, value in sorted(action.set_config.set.items()):
                old = paint(repr(current.get(key, "<absent>")), "31")
                lines.append(f"    {key}: {old} -> {paint(repr(value), '32')}")
            for key in action.set_config.delete:
                lines.append(f"    {key}: {paint(repr(current.get(key, '')), '31')} -> {paint('<deleted>', '32')}")
        else:
            lines.append(paint(f"guest {action.vmid}: {kind}", "1"))
    for skip in plan.skipped:
        reason = pb.SkipReason.Name(skip.reason)
        lines.append(paint(f"guest {skip.vmid}: skipped ({reason.removeprefix('SKIP_REASON_').lower()}): "
                           f"{skip.detail}", "33"))
    return "\n".join(lines) if lines else "nothing to do: the node matches the desired state"


def run_selftest(args: argparse.Namespace, conn: Connection) -> int:
    """``pve-executor selftest``: 0 when the normalized round trip holds and the guest is restored."""
    try:
        result = selftest(ProxmoxNode(conn), PlannerClient(args.planner, tls=args.planner_credentials), args.vmid)
    except PlannerUnavailableError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 1
    print(f"wrote     {result.written!r}\nread back {result.read_back!r}\n{result.detail}\n"
          f"original description {'restored' if result.restored else 'NOT restored'}")
    print("selftest: ok" if result.ok else "selftest: FAILED")
    return 0 if result.ok else 1


def show_plan(args: argparse.Namespace, conn: Connection) -> int:
    """``pve-executor plan``: read, plan, print; mutate nothing."""
    try:
        planner = PlannerClient(args.planner, tls=args.planner_credentials)
        plan, configs = read_plan(ProxmoxNode(conn), planner, provider(args))
    except (DesiredStateError, PlannerUnavailableError) as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(plan, preserving_proto_field_name=True), indent=2, sort_keys=True))
    else:
        print(render(plan, configs, sys.stdout.isatty()))
    return 0
