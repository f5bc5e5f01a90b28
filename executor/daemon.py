"""The daemon's lifecycle, and the dry-run and self-test commands.

run: install the signal handlers first (a SIGTERM during start-up or recovery stops cleanly);
open the journal (journal-less with a loud warning if it cannot open: then only benign actions
run); serve the API (health NOT_SERVING, Reconcile refused) while recovery resolves in-flight
operations; then tick every interval until SIGTERM/SIGINT; then stop ticking, drain the queue
within the grace period, close the journal. A stop during recovery leaves what is unresolved in
flight in the journal, for the next start to resolve.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from google.protobuf.json_format import MessageToDict

from common.config import ConfigError
from common.grpcserver import Running
from common.metrics import serve_metrics
from common.signals import stop_on_signals
from executor.actions import by_guest
from executor.cli import api_tls, connection, planner_tls
from executor.config import ExecutorSettings
from executor.desired import DesiredProvider, DesiredStateError, EmptyProvider, FileProvider, provider_source
from executor.engine import Engine, Settings, TickOutcome
from executor.gate import Admission, Gate, GateSettings, declaration_of
from executor.kinds import CallSettings
from executor.metrics import ExecutorMetrics
from executor.observe import Observed, observe
from executor.ops import OP_TTL_MAX, GateClock, OpDesk, OpSettings, clock_reset, gate_secret
from executor.planner_client import PlannerClient, PlannerError
from executor.pve import Connection, ProxmoxNode, PveError
from executor.pvewrite import ProxmoxWriter
from executor.queue import GuestQueue
from executor.recovery import RecoveryInterruptedError, recover
from executor.selftest import selftest
from executor.server import start_api
from journal import Journal, JournalOpenError
from planner.v1 import planner_pb2 as pb

log = structlog.get_logger("executor.daemon")


def provider(settings: ExecutorSettings) -> DesiredProvider:
    """FileProvider for --desired, else EmptyProvider (manage nothing)."""
    if not settings.desired:
        return EmptyProvider()
    try:
        return FileProvider(settings.desired)
    except OSError as exc:
        raise DesiredStateError(f"{settings.desired}: cannot read: {exc.strerror}") from None


def open_journal(state_dir: str) -> Journal | None:
    """The journal, or None (with a loud warning) when it cannot open."""
    try:
        return Journal.open(state_dir)
    except JournalOpenError as exc:
        log.error("journal_unavailable_benign_only", state_dir=state_dir, error=str(exc),
                  consequence="only benign actions run; in-flight operations will not survive a crash")
        return None


@dataclass(slots=True)
class Parts:
    """What a daemon (or a one-shot command) is made of; ``close`` releases it all."""

    reader: ProxmoxNode
    planner: PlannerClient
    queue: GuestQueue
    engine: Engine
    desk: OpDesk

    def close(self, grace: float) -> None:
        """Drain the queue within ``grace``, then close the planner channel and the journal."""
        unfinished = self.queue.close(grace)
        if unfinished:
            log.warning("shutdown_unfinished", jobs=[f"{j.vmid}:{j.label}" for j in unfinished])
        self.engine.close()
        self.planner.close()
        if self.engine.journal is not None:
            self.engine.journal.close()


def build(settings: ExecutorSettings, conn: Connection, desired: DesiredProvider, journal: Journal | None,
          metrics: ExecutorMetrics | None = None) -> Parts:
    """Wire the parts: the writer goes to the gate and nowhere else."""
    metrics = metrics or ExecutorMetrics()
    if journal is not None and journal.retention <= OP_TTL_MAX:
        raise ConfigError("state_dir", f"the journal keeps nonces {journal.retention:.0f} s: it must outlive the "
                                       f"longest signed op ({OP_TTL_MAX:.0f} s)")
    reader = ProxmoxNode(conn, on_error=metrics.pve_error)
    clock = GateClock(lambda: gate.journal, settings.state_dir)
    gate = Gate(reader=reader, writer=ProxmoxWriter(reader.session), journal=journal, metrics=metrics,
                wall=clock.now,
                settings=GateSettings(calls=CallSettings(shutdown_timeout=settings.shutdown_timeout,
                                                         force_stop=settings.force_stop),
                                      max_stops_per_tick=settings.max_stops_per_tick, audience=settings.executor_id,
                                      secret=gate_secret(settings.state_dir) if journal is not None else None))
    planner = PlannerClient(settings.planner, tls=planner_tls(settings))
    queue = GuestQueue(settings.max_parallel)
    engine = Engine(pve=reader, gate=gate, planner=planner, provider=desired, queue=queue, settings=Settings(),
                    metrics=metrics)
    desk = OpDesk(engine=engine, clock=clock, settings=OpSettings(state_dir=settings.state_dir,
                                                                   trust_store=settings.trust_store,
                                                                   skew=settings.op_clock_skew))
    return Parts(reader, planner, queue, engine, desk)


def run(settings: ExecutorSettings, conn: Connection) -> int:
    """``pve-executor run``."""
    stop = stop_on_signals()  # first: a SIGTERM from here on is a clean stop
    try:
        desired = provider(settings)
    except DesiredStateError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 2
    tls = api_tls(settings)
    metrics = ExecutorMetrics()
    parts = build(settings, conn, desired, open_journal(settings.state_dir), metrics)
    engine = parts.engine
    endpoint = serve_metrics(settings.metrics_listen, metrics.registry) if settings.metrics_listen else None
    if endpoint is not None and settings.metrics_listen:
        log.info("metrics_listening", address=f"{settings.metrics_listen.rsplit(':', 1)[0]}:{endpoint.port}")
    api = None if settings.once else start_api(engine, settings.listen, tls=tls, desk=parts.desk)
    reload_on_hangup(parts.desk)
    try:
        if not _recover(engine, parts.reader, api, stop):
            return 0 if stop.is_set() else 1
        if settings.once:
            summary = engine.tick(wait=True)
            return 0 if summary.outcome is TickOutcome.OK else 1
        while not stop.is_set():
            engine.tick()
            stop.wait(settings.interval)
        return 0
    finally:
        if api is not None:
            api.stop(5.0)
        parts.close(settings.grace)
        if endpoint is not None:
            endpoint.stop()


def reload_on_hangup(desk: OpDesk) -> None:
    """SIGHUP reloads the trust store (a bad file keeps the last good store)."""
    signal.signal(signal.SIGHUP, lambda _signum, _frame: desk.reload())


def _recover(engine: Engine, reader: ProxmoxNode, api: Running | None, stop: threading.Event) -> bool:
    """Resolve the journal's in-flight operations; False when stopped or Proxmox stayed unavailable."""
    journal = engine.journal
    if journal is None:
        return True
    engine.recovering.set()
    if api is not None:
        api.set_serving(False)
    try:
        recover(journal, reader, stop=stop)
    except RecoveryInterruptedError as exc:
        event = "shutdown_during_recovery" if stop.is_set() else "recovery_incomplete"
        log.warning(event, error=str(exc), left_in_flight=len(journal.in_flight()))
        return False
    engine.recovering.clear()
    if api is not None:
        api.set_serving(True)
    return True


def reset_clock(settings: ExecutorSettings) -> int:
    """``pve-executor clock-reset``: the daemon must be stopped (the journal's lock says so)."""
    try:
        journal = Journal.open(settings.state_dir)
    except JournalOpenError as exc:
        print(f"pve-executor: clock-reset: {exc} (stop the daemon first)", file=sys.stderr)
        return 2
    with journal:
        offset, floor = clock_reset(settings.state_dir, journal)
    print(f"clock reset: the journal's high-water mark is read {offset:.0f} s lower; "
          f"signed ops from before {floor:.0f} are refused")
    return 0


def run_selftest(settings: ExecutorSettings, conn: Connection) -> int:
    """``pve-executor selftest``: 0 when the normalized round trip holds and the guest is restored."""
    journal = open_journal(settings.state_dir) if settings.state_dir else None
    parts = build(settings, conn, EmptyProvider(), journal)
    try:
        result = selftest(parts.engine, settings.vmid or 0)
    except PlannerError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 1
    finally:
        parts.close(30.0)
    print(f"wrote     {result.written!r}\nread back {result.read_back!r}\n{result.detail}\n"
          f"original description {'restored' if result.restored else 'NOT restored'}")
    print("selftest: ok" if result.ok else "selftest: FAILED")
    return 0 if result.ok else 1


@dataclass(frozen=True, slots=True)
class DryRun:
    """What ``run`` would do now: the plan, what the gate would make of it, and the read it came from."""

    plan: pb.PlanResponse
    admission: Admission
    observed: Observed


def dry_run(settings: ExecutorSettings) -> DryRun:
    """The read path, plan and gate of a tick, with no writer: nothing can be mutated."""
    desired = provider(settings)
    declared = desired.desired()  # local, cheap input first: a typo is reported before any network
    source = provider_source(desired)
    reader = ProxmoxNode(connection(settings))
    planner = PlannerClient(settings.planner, tls=planner_tls(settings))
    try:
        observed = observe(reader, declared)
        plan = planner.plan(*observed.request(declared))
    finally:
        planner.close()
    secret = Path(settings.state_dir) / "gate.secret"  # read, never created: the dry run writes nothing
    gate = Gate(reader=reader, writer=None, journal=None, dry_run=True,
                settings=GateSettings(max_stops_per_tick=settings.max_stops_per_tick, audience=settings.executor_id,
                                      secret=secret.read_bytes() if secret.is_file() else None))
    mine = [d for d in declared if d.vmid not in observed.elsewhere]
    declarations = {d.vmid: declaration_of(d.vmid, d.state, d.config, d.description) for d in mine}
    admission = gate.admit(by_guest(plan.actions), observed=observed, declared=declarations,
                           source=source, record=False)
    return DryRun(plan, _authorized(gate, admission), observed)


def _authorized(gate: Gate, admission: Admission) -> Admission:
    """The admission as the lanes would leave it: the lane's reads and checks, as ``run`` makes them."""
    admitted, refused, judged = {}, list(admission.refused), list(admission.judged)
    for vmid, steps in admission.admitted.items():
        kept = []
        for step in steps:
            position = next(i for i, j in enumerate(judged) if j.step.vmid == vmid and j.reason is None
                            and j.step.kind == step.step.kind and j.step.set == step.step.set)
            try:
                refusal = gate.lane.authorize(step)
            except PveError as exc:  # run would fail this step without a call: so does the dry run
                judged[position] = replace(judged[position], reason="FAILED", detail=f"cannot authorize: {exc}")
                break
            if refusal is not None:
                refused.append(refusal)
                judged[position] = replace(judged[position], reason=refusal.reason, detail=refusal.detail)
                break  # as in the lane: the guest's later steps wait for a later tick
            kept.append(step)
        if kept:
            admitted[vmid] = kept
    return replace(admission, admitted=admitted, refused=tuple(refused), judged=tuple(judged),
                   pending=admission.pending + tuple(gate.pending()))


def printable(text: str) -> str:
    """``text`` with every control character escaped: a planner cannot erase or forge lines of ``plan``."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render(result: DryRun, color: bool) -> str:
    """The plan as a person reads it: per guest, key, current and desired, and each action's class."""
    def paint(text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if color else text

    lines = []
    for judged in result.admission.judged:
        step, verdict = judged.step, judged.verdict
        note = f"[{verdict.cls.name.lower()}]"
        if judged.decision == "refused":
            note += f" REFUSED {judged.reason.lower() if judged.reason else ''}: {printable(judged.detail)}"
        elif judged.decision == "deferred":
            note += " deferred to a later tick (stop limit)"
        head = "set config" if step.kind == "set_config" else printable(step.kind)
        lines.append(paint(f"guest {step.vmid}: {head} {note}", "1" if judged.reason is None else "1;31"))
        current = result.observed.configs.get(step.vmid, ({}, ""))[0]
        for key, value in step.set:
            old = paint(repr(current.get(key, "<absent>")), "31")
            lines.append(f"    {printable(key)}: {old} -> {paint(repr(value), '32')}")
        for key in step.delete:
            old = paint(repr(current.get(key, "")), "31")
            lines.append(f"    {printable(key)}: {old} -> {paint('<deleted>', '32')}")
    for skip in result.plan.skipped:
        reason = pb.SkipReason.Name(skip.reason)
        lines.append(paint(f"guest {skip.vmid}: skipped ({reason.removeprefix('SKIP_REASON_').lower()}): "
                           f"{printable(skip.detail)}", "33"))
    if result.observed.elsewhere:
        lines.append(f"{len(result.observed.elsewhere)} declared guest(s) on other nodes, left to their executors")
    return "\n".join(lines) if lines else "nothing to do: the node matches the desired state"


def as_json(result: DryRun) -> dict[str, Any]:
    """The plan as the planner returned it, plus the gate's verdict and decision per step, and descriptors."""
    body = MessageToDict(result.plan, preserving_proto_field_name=True)
    body["verdicts"] = [
        {"vmid": j.step.vmid, "action": j.step.kind, "class": j.verdict.cls.name, "op_kind": j.verdict.op_kind,
         "rule": j.verdict.rule, "reasons": list(j.verdict.reasons), "decision": j.decision,
         **({"refusal": j.reason, "detail": j.detail} if j.decision == "refused" else {})}
        for j in result.admission.judged]
    body["pending"] = [{"action": json.loads(p.descriptor), "challenge": p.challenge, "class": p.cls.name,
                        "rule": p.rule, "reasons": list(p.reasons), "descriptor_sha256": p.descriptor_sha256}
                       for p in result.admission.pending]
    body["elsewhere"] = sorted(result.observed.elsewhere)
    return body


def show_plan(settings: ExecutorSettings) -> int:
    """``pve-executor plan``: read, plan, classify, print; mutate nothing."""
    try:
        result = dry_run(settings)
    except DesiredStateError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 2
    except PlannerError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return 1
    if settings.json:
        print(json.dumps(as_json(result), indent=2, sort_keys=True))
    else:
        print(render(result, sys.stdout.isatty()))
    return 0
