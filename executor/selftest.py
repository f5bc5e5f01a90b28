"""``pve-executor selftest``: a description written to a scratch guest reads back equal, normalized.

Writes a marked, multi-line description (with the trailing newline and CRLF that PVE rewrites)
to the named guest, reads it back, asks the planner whether the read-back value still matches
what was written (the planner's normalizers decide, over the real contract), then restores the
original description, or removes it if there was none. Every write carries the digest just read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from executor.desired import Declared
from executor.planner_client import PlannerClient, actual_to_proto, desired_to_proto
from executor.pve import Pve, PveError, TaskResult, wait_task


@dataclass(frozen=True, slots=True)
class SelftestResult:
    """What the self-test saw."""

    ok: bool
    written: str
    read_back: str
    restored: bool
    detail: str


def _write(pve: Pve, guest_type: str, vmid: int, values: dict[str, str], delete: list[str]) -> None:
    _, digest = pve.config(guest_type, vmid)
    upid = pve.set_config(guest_type, vmid, values, delete, digest)
    if upid:
        outcome = wait_task(pve, upid, deadline=time.monotonic() + 120)
        if outcome.result is not TaskResult.OK:
            raise PveError(f"config task ended: {outcome.exitstatus}")


def selftest(pve: Pve, planner: PlannerClient, vmid: int) -> SelftestResult:
    """Run the round trip on ``vmid`` and restore it."""
    guest = next((g for g in pve.guests() if g.vmid == vmid), None)
    if guest is None:
        return SelftestResult(False, "", "", False, f"guest {vmid} is not on node {pve.node}")
    if guest.lock:
        return SelftestResult(False, "", "", False, f"guest {vmid} is locked ({guest.lock})")
    original = pve.config(guest.type, vmid)[0].get("description")
    written = f"pve-reconcile selftest {int(time.time())}\r\nsecond line  \n"
    restored = False
    try:
        _write(pve, guest.type, vmid, {"description": written}, [])
        config, digest = pve.config(guest.type, vmid)
        read_back = config.get("description", "")
        plan = planner.plan(desired_to_proto([Declared(vmid=vmid, description=written)]),
                            [actual_to_proto(guest, (config, digest))])
        ok = not plan.actions and not plan.skipped
        detail = "round trip equal after normalization" if ok else f"planner still sees drift: {plan}"
    finally:
        if original is None:
            _write(pve, guest.type, vmid, {}, ["description"])
        else:
            _write(pve, guest.type, vmid, {"description": original}, [])
        restored = pve.config(guest.type, vmid)[0].get("description") == original
    return SelftestResult(ok and restored, written, read_back, restored, detail)
