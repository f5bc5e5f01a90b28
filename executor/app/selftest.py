"""``pve-executor selftest``: a description written to a scratch guest reads back equal, normalized.

Writes a marked, multi-line description (with the trailing newline and CRLF that PVE rewrites)
to the named guest, reads it back, asks the planner whether the read-back value still matches
what was written (the planner's normalizers decide, over the real contract), then restores the
original description, or removes it if there was none. Every write carries the digest just read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from executor.gate.actions import SET_CONFIG, Step
from executor.loop.desired import Declared
from executor.loop.funnel import Funnel
from executor.loop.observe import observe
from executor.loop.planner_client import PlannerClient, actual_to_proto, desired_to_proto
from executor.pve.node import PveError, PveReader
from safety.classify import Source


@dataclass(frozen=True, slots=True)
class SelftestResult:
    """What the self-test saw."""

    ok: bool
    written: str
    read_back: str
    restored: bool
    detail: str


def _write(funnel: Funnel, pve: PveReader, vmid: int, values: dict[str, str], delete: list[str]) -> None:
    """One description write through the funnel (the gate admits it as SELFTEST)."""
    declared = [Declared(vmid=vmid, description=values.get("description", ""))]  # exactly what is written
    observed = observe(pve, declared)
    guest = observed.guests[vmid]
    _, digest = observed.configs[vmid]
    step = Step(vmid=vmid, guest_type=guest.type, kind=SET_CONFIG, set=tuple(sorted(values.items())),
                delete=tuple(delete), digest=digest)
    submission = funnel.submit({vmid: [step]}, source=Source.SELFTEST, observed=observed, declared=declared,
                               wait=True)
    if submission.admission.refused:
        raise PveError(f"the gate refused the write: {submission.admission.refused[0].detail}")
    if submission.tracker.failed or submission.tracker.remaining:
        why = "; ".join(submission.tracker.errors) or "see the action log line"
        raise PveError(f"the description write failed: {why}")


def selftest(funnel: Funnel, pve: PveReader, planner: PlannerClient, vmid: int) -> SelftestResult:
    """Run the round trip on ``vmid`` through ``funnel`` (``pve`` reads, ``planner`` judges) and restore it."""
    guest = pve.guests().find(vmid)
    if guest is None:
        return SelftestResult(False, "", "", False, f"guest {vmid} is not on node {pve.node}")
    if guest.lock:
        return SelftestResult(False, "", "", False, f"guest {vmid} is locked ({guest.lock})")
    original = pve.config(guest.type, vmid)[0].get("description")
    written = f"pve-reconcile selftest {int(time.time())}\r\nsecond line  \n"
    restored = False
    try:
        _write(funnel, pve, vmid, {"description": written}, [])
        config, digest = pve.config(guest.type, vmid)
        read_back = config.get("description", "")
        plan = planner.plan(desired_to_proto([Declared(vmid=vmid, description=written)]),
                            [actual_to_proto(guest, (config, digest))])
        ok = not plan.actions and not plan.skipped
        detail = "round trip equal after normalization" if ok else f"planner still sees drift: {plan}"
    finally:
        if original is None:
            _write(funnel, pve, vmid, {}, ["description"])
        else:
            _write(funnel, pve, vmid, {"description": original}, [])
        restored = pve.config(guest.type, vmid)[0].get("description") == original
    return SelftestResult(ok and restored, written, read_back, restored, detail)
