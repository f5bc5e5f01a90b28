"""``pve-executor plan``: the dry run, through the same read path, planner call and gate as ``run``.

The gate is built without a writer (nothing can be mutated) and without a journal (the dry run
writes nothing; a missing journal does not turn approvals into JOURNAL_UNAVAILABLE there); each
admitted step then goes through the lane's authorization reads, as ``run`` would make them.
Everything a planner chose (keys, details) is printed with control characters escaped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from google.protobuf.json_format import MessageToDict

from executor.app.wiring import dry_gate, dry_inputs, provider
from executor.config import ExecutorSettings
from executor.gate.actions import by_guest
from executor.gate.decisions import Admission, declaration_of
from executor.gate.gate import Gate
from executor.loop.desired import DesiredStateError, provider_source
from executor.loop.observe import STAGED_NOTE, Observed, PendingSections, StagedKey, observe, staged
from executor.loop.planner_client import PlannerError
from executor.pve.node import PveError
from planner.v1 import planner_pb2 as pb

log = structlog.get_logger("executor.dryrun")


@dataclass(frozen=True, slots=True)
class DryRun:
    """What ``run`` would do now: the plan, what the gate would make of it, and the read it came from."""

    plan: pb.PlanResponse
    admission: Admission
    observed: Observed
    staged: dict[int, tuple[StagedKey, ...]] = field(default_factory=dict)  # held by PVE for the next restart


def dry_run(settings: ExecutorSettings) -> DryRun:
    """The read path, plan and gate of a tick, with no writer: nothing can be mutated."""
    desired = provider(settings)
    declared = desired.desired()  # local, cheap input first: a typo is reported before any network
    source = provider_source(desired)
    reader, planner = dry_inputs(settings)
    try:
        observed = observe(reader, declared, sections=PendingSections())
        plan = planner.plan(*observed.request(declared))
    finally:
        planner.close()
    gate = dry_gate(reader, settings)
    mine = [d for d in declared if d.vmid not in observed.elsewhere]
    declarations = {d.vmid: declaration_of(d.vmid, d.state, d.config, d.description) for d in mine}
    planned = by_guest(plan.actions)
    admission = gate.admit(planned, observed=observed, declared=declarations,
                           source=source, record=False, held=frozenset())
    return DryRun(plan, _authorized(gate, admission), observed, staged(observed, mine, planned))


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
        elif judged.decision == "deferred":  # the stop limit, or held behind a refused step of the guest
            note += f" deferred: {printable(judged.detail)}"
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
    for vmid, error in sorted(result.observed.unreadable.items()):
        lines.append(paint(f"guest {vmid}: skipped (unreadable): {printable(error)}", "33"))
    lines += _staged_lines(result, paint)
    if result.observed.elsewhere:
        lines.append(f"{len(result.observed.elsewhere)} declared guest(s) on other nodes, left to their executors")
    if result.staged:
        lines.append(f"{len(result.staged)} guest(s) {STAGED_NOTE}: nothing to write")
    return "\n".join(lines) if lines else "nothing to do: the node matches the desired state"


def _staged_lines(result: DryRun, paint: Callable[[str, str], str]) -> list[str]:
    """Each guest whose declared change PVE already holds for the next restart: marked, its keys now -> next."""
    lines = []
    for vmid, keys in sorted(result.staged.items()):
        lines.append(paint(f"guest {vmid}: {STAGED_NOTE}", "36"))
        for k in keys:
            now, then = (repr(v) if v is not None else "<absent>" for v in (k.now, k.next))
            lines.append(f"    {printable(k.key)}: {printable(now)} -> {printable(then)}")
    return lines


def as_json(result: DryRun) -> dict[str, Any]:
    """The plan as the planner returned it, plus the gate's verdict and decision per step, and descriptors."""
    body = MessageToDict(result.plan, preserving_proto_field_name=True)
    body["verdicts"] = [
        {"vmid": j.step.vmid, "action": j.step.kind, "class": j.verdict.cls.name, "op_kind": j.verdict.op_kind,
         "rule": j.verdict.rule, "reasons": list(j.verdict.reasons), "decision": j.decision,
         **({"refusal": j.reason, "detail": j.detail} if j.decision == "refused" else
            {"detail": j.detail} if j.decision == "deferred" else {})}
        for j in result.admission.judged]
    body["pending"] = [{"action": json.loads(p.descriptor), "challenge": p.challenge, "class": p.cls.name,
                        "rule": p.rule, "reasons": list(p.reasons), "descriptor_sha256": p.descriptor_sha256}
                       for p in result.admission.pending]
    body["elsewhere"] = sorted(result.observed.elsewhere)
    body["staged"] = {str(vmid): [{"key": k.key, "now": k.now, "next": k.next} for k in keys]
                      for vmid, keys in sorted(result.staged.items())}
    body["unreadable"] = {str(vmid): error for vmid, error in sorted(result.observed.unreadable.items())}
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
