"""``pve-executor plan``: the dry run, through the same read path, planner call and gate as ``run``.

The gate is built without a writer (nothing can be mutated) and without a journal (the dry run
writes nothing; a missing journal does not turn approvals into JOURNAL_UNAVAILABLE there); each
admitted step then goes through the lane's authorization reads, as ``run`` would make them.
Everything a planner chose (keys, details) is printed with control characters escaped.

The output ends with a summary line, and the exit code tells a script what it says (Terraform's
``-detailed-exitcode``, always on): 0 nothing to change, 3 changes ``run`` would make, 4 an operator is
needed (a step needing APPROVAL or refused, a guest skipped), 1 Proxmox or the planner failed, 2 a bad flag
or desired file. Text and ``--json`` use the same words (``CHANGE``/``REFUSED``/``DEFERRED``, ``SKIPPED``,
``elsewhere``, the classes ``BENIGN``/``APPROVAL``/``DESTRUCTIVE``, ``<absent>`` for a missing key, JSON null).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import structlog

from executor.app.wiring import dry_gate, dry_inputs, provider
from executor.config import ExecutorSettings
from executor.gate.actions import SET_CONFIG, Step, by_guest
from executor.gate.decisions import APPROVABLE, Admission, Judged, declaration_of
from executor.gate.gate import Gate
from executor.loop.desired import DesiredStateError, check_types, mistakes, provider_source
from executor.loop.observe import STAGED_NOTE, Observed, PendingSections, StagedKey, observe, staged
from executor.loop.planner_client import PlannerError
from executor.pve.node import PveError
from planner.v1 import planner_pb2 as pb
from safety.keys import BENIGN_KEY

log = structlog.get_logger("executor.dryrun")


@dataclass(frozen=True, slots=True)
class DryRun:
    """What ``run`` would do now: the plan, what the gate would make of it, and the read it came from."""

    plan: pb.PlanResponse
    admission: Admission
    observed: Observed
    # Declared changes PVE already holds for the next restart (a running guest's memory): no step writes them.
    staged: Mapping[int, tuple[StagedKey, ...]] = field(default_factory=dict)


def dry_run(settings: ExecutorSettings) -> DryRun:
    """The read path, plan and gate of a tick, with no writer: nothing can be mutated.

    A config key the guest's type does not take (the node says which type it is) is a DesiredStateError,
    raised before the planner is asked: nothing is planned from a file with a mistake.
    """
    desired = provider(settings)
    declared = desired.desired()  # local, cheap input first: a typo is reported before any network
    source = provider_source(desired)
    reader, planner = dry_inputs(settings)
    try:
        observed = observe(reader, declared, sections=PendingSections())
        check_types(declared, {vmid: guest.type for vmid, guest in observed.guests.items()})
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


# The words of `plan`, the same in its text and its --json (a step's class is BENIGN, APPROVAL or DESTRUCTIVE).
# Guests on other nodes are only counted (on a cluster, one desired file may name hundreds of them).
CHANGE, REFUSED, DEFERRED, SKIPPED = "CHANGE", "REFUSED", "DEFERRED", "SKIPPED"
ABSENT = "<absent>"  # a key the guest does not have, or that the step deletes
APPROVAL_HINT = ("Steps needing APPROVAL wait in the running daemon's `pve-executor pending`; "
                 "sign one with `pve-executor op sign --pending N`.")
DECISIONS = {"admitted": CHANGE, "refused": REFUSED, "deferred": DEFERRED}
# Exit codes of `plan` (Terraform's -detailed-exitcode, always on): 1 and 2 are every command's.
EXIT_NO_CHANGES, EXIT_ERROR, EXIT_USAGE, EXIT_CHANGES, EXIT_ATTENTION = 0, 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class Summary:
    """The counts the last line of ``plan`` gives (and ``--json``'s ``summary``)."""

    change: int  # steps ``run`` would make now
    approval: int  # steps refused until an operator approves them (``pve-executor pending``)
    refused: int  # steps refused for another reason (locked, out of scope, protected...)
    deferred: int  # steps a later tick makes: stops over the stop limit, steps held behind a refused one
    skipped: int  # declared guests the planner skipped (not found, locked...) or whose entry did not parse
    elsewhere: int  # declared guests on another node, left to its executor
    staged: int = 0  # guests whose declared change PVE holds for their next restart: nothing to write

    @property
    def exit_code(self) -> int:
        """0 nothing to change; 3 ``run`` would make changes; 4 an operator is needed (approval, refused, skipped)."""
        if self.approval or self.refused or self.skipped:
            return EXIT_ATTENTION
        return EXIT_CHANGES if self.change or self.deferred else EXIT_NO_CHANGES

    def line(self) -> str:
        """``Plan: 2 to change, 1 needing APPROVAL, 0 refused for other reasons, 1 skipped, 1 elsewhere.``"""
        deferred = f", {self.deferred} deferred" if self.deferred else ""
        staged = f", {self.staged} staged" if self.staged else ""
        return (f"Plan: {self.change} to change, {self.approval} needing APPROVAL, "
                f"{self.refused} refused for other reasons{deferred}, "
                f"{self.skipped} skipped, {self.elsewhere} elsewhere{staged}.")


def summarize(result: DryRun) -> Summary:
    """Count the plan's steps by decision and its guests left alone."""
    judged = result.admission.judged
    refused = [j for j in judged if j.decision == "refused"]
    approval = sum(1 for j in refused if j.reason in APPROVABLE)
    return Summary(change=sum(1 for j in judged if j.decision == "admitted"), approval=approval,
                   refused=len(refused) - approval, deferred=sum(1 for j in judged if j.decision == "deferred"),
                   skipped=len(result.plan.skipped) + len(result.observed.unreadable),
                   elsewhere=len(result.observed.elsewhere), staged=len(result.staged))


def printable(text: str) -> str:
    """``text`` with every control character escaped: a planner cannot erase or forge lines of ``plan``."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(value: str | None) -> str:
    """A value as ``plan`` prints it: quoted (so spaces and commas are plain), ``<absent>`` bare."""
    return ABSENT if value is None else printable(repr(value))


def short_reason(judged: Judged) -> str:
    """One reason for a refused step: the rule that classed it, not one reason per key."""
    rule = judged.verdict.rule
    if judged.detail.startswith(f"{rule}: ") or not judged.detail:
        return rule
    return judged.detail.split("; ")[0]


def changes(result: DryRun, step: Step) -> list[tuple[str, str | None, str | None]]:
    """Each key a config step writes or deletes: (key, current or None, desired or None for a delete)."""
    current = result.observed.configs.get(step.vmid, ({}, ""))[0]
    return sorted([(key, current.get(key), value) for key, value in step.set]
                  + [(key, current.get(key), None) for key in step.delete], key=lambda change: change[0])


def _key_note(judged: Judged, key: str) -> str:
    """What follows a key's line: on a refused step, the key's own reason."""
    if judged.decision != "refused":
        return ""
    why = next((r.removeprefix(f"{key}: ") for r in judged.verdict.reasons if r.startswith(f"{key}: ")), "")
    return f"  ({printable(why)})" if why and not why.endswith(BENIGN_KEY.why) else ""  # only what holds it


def render_step(result: DryRun, judged: Judged, paint: Callable[[str, str], str]) -> list[str]:
    """A step's head line (guest, action, class, decision) and, for a config step, one line per key."""
    step = judged.step
    head = f"guest {step.vmid}: {'set config' if step.kind == SET_CONFIG else printable(step.kind)} " \
           f"[{judged.verdict.cls.name}]"
    if judged.decision == "refused":
        head += f" {REFUSED} {judged.reason}: {printable(short_reason(judged))}"
    elif judged.decision == "deferred":
        head += f" {DEFERRED}: {printable(judged.detail)}"  # the stop limit, or held behind a refused step
    lines = [paint(head, "1" if judged.reason is None else "1;31")]
    for key, old, new in changes(result, step):
        lines.append(f"    {printable(key)}: {paint(shown(old), '31')} -> {paint(shown(new), '32')}"
                     f"{_key_note(judged, key)}")
    return lines


def skipped(result: DryRun) -> list[tuple[int, str, str, list[str]]]:
    """Guests left alone: (vmid, SKIP reason or UNREADABLE, detail, keys), by vmid."""
    found = [(s.vmid, pb.SkipReason.Name(s.reason).removeprefix("SKIP_REASON_"), s.detail, list(s.keys))
             for s in result.plan.skipped]
    found += [(vmid, "UNREADABLE", error, []) for vmid, error in result.observed.unreadable.items()]
    return sorted(found, key=lambda item: item[0])


def render(result: DryRun, color: bool) -> str:
    """The plan as a person reads it: per step its class and decision, per key current -> desired; a summary."""
    def paint(text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if color else text

    lines = [line for judged in result.admission.judged for line in render_step(result, judged, paint)]
    for vmid, reason, detail, keys in skipped(result):
        named = f" ({', '.join(printable(k) for k in keys)})" if keys else ""
        lines.append(paint(f"guest {vmid}: {SKIPPED} {reason}{named}", "33"))
        lines.append(f"    {printable(detail)}")
    for vmid, held in sorted(result.staged.items()):  # nothing to write: PVE applies them at the restart
        lines.append(paint(f"guest {vmid}: {STAGED_NOTE}", "36"))
        lines += [f"    {printable(k.key)}: {shown(k.now)} -> {shown(k.next)}" for k in held]
    total = summarize(result)
    if not lines:
        return f"{total.line()} The node matches the desired state."
    if total.approval:
        lines += ["", APPROVAL_HINT]
    return "\n".join([*lines, "", total.line()])


def as_json(result: DryRun) -> dict[str, Any]:
    """The plan in ``plan``'s own words: steps, skipped and elsewhere guests, approvals, summary, exit code."""
    total = summarize(result)
    steps = [{"vmid": j.step.vmid, "guest_type": j.step.guest_type, "action": j.step.kind,
              "class": j.verdict.cls.name, "decision": DECISIONS[j.decision], "refusal": j.reason,
              "why": short_reason(j) if j.decision == "refused" else None, "detail": j.detail,
              "op_kind": j.verdict.op_kind, "rule": j.verdict.rule, "reasons": list(j.verdict.reasons),
              "changes": [{"key": key, "from": old, "to": new}
                          for key, old, new in changes(result, j.step)]}
             for j in result.admission.judged]
    pending = [{"action": json.loads(p.descriptor), "challenge": p.challenge, "class": p.cls.name, "refusal": p.reason,
                "rule": p.rule, "reasons": list(p.reasons), "descriptor_sha256": p.descriptor_sha256}
               for p in result.admission.pending]
    return {"steps": steps, "pending": pending,
            "skipped": [{"vmid": vmid, "reason": reason, "detail": detail, "keys": keys}
                        for vmid, reason, detail, keys in skipped(result)],
            "elsewhere": sorted(result.observed.elsewhere),
            "staged": [{"vmid": vmid, "changes": [{"key": k.key, "from": k.now, "to": k.next} for k in keys]}
                       for vmid, keys in sorted(result.staged.items())],
            "summary": {"change": total.change, "approval": total.approval, "refused": total.refused,
                        "deferred": total.deferred, "skipped": total.skipped, "elsewhere": total.elsewhere,
                        "staged": total.staged},
            "exit_code": total.exit_code}


def use_color(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set to anything but the empty string."""
    return stream.isatty() and not environ.get("NO_COLOR")


def show_plan(settings: ExecutorSettings) -> int:
    """``pve-executor plan``: read, plan, classify, print; mutate nothing. Exit 0, 3 or 4 (``Summary.exit_code``),
    1 when Proxmox or the planner fails, 2 for a desired file with mistakes (each printed with file:line)."""
    try:
        result = dry_run(settings)
    except DesiredStateError as exc:
        for line in mistakes(exc, "nothing planned"):
            print(f"pve-executor: {line}", file=sys.stderr)
        return EXIT_USAGE
    except PlannerError as exc:
        print(f"pve-executor: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if settings.json:
        print(json.dumps(as_json(result), indent=2, sort_keys=True))
    else:
        print(render(result, use_color(sys.stdout, os.environ)))
    return summarize(result).exit_code
