"""The refusals standing now: each logged once, when it appears or its reason changes, and when it clears.

A tick plans the same refused step again every interval; a ``gate_refused`` event per tick would bury
the one refusal that is new. A refusal stands per guest and op kind; a signed op's refusal (it has an
op_id) is logged every time, since the op is never planned again. The gauge
``pve_executor_gate_refusals_standing`` counts the standing ones; ``pve_executor_gate_decisions`` still
counts every decision of every tick.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import structlog

from executor.gate.actions import Step
from executor.gate.decisions import Refusal

log = structlog.get_logger("executor.gate")


class StandingRefusals:
    """(vmid, op kind) -> the reason, detail and step last logged for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._standing: dict[tuple[int, str], tuple[str, str, object]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._standing)

    def note(self, refusal: Refusal, step: Step | None = None, **fields: object) -> None:
        """Log ``refusal`` of ``step`` (with ``fields``) unless the same one stands already; it stands from now on.

        The same reason for another value (memory 4096, then 8192) is another refusal: the step's
        values count, not its digest (a write elsewhere in the config changes no refusal).
        """
        if not refusal.op_id:
            what = (step.kind, step.set, step.delete, step.params) if step is not None else None
            key, value = (refusal.vmid, refusal.op_kind), (refusal.reason, refusal.detail, what)
            with self._lock:
                if self._standing.get(key) == value:
                    return
                self._standing[key] = value
        log.warning("gate_refused", vmid=refusal.vmid, op_kind=refusal.op_kind, reason=refusal.reason,
                    detail=refusal.detail, **({"op_id": refusal.op_id} if refusal.op_id else {}), **fields)

    def clear(self, vmid: int, op_kinds: Iterable[str]) -> None:
        """The guest's steps of ``op_kinds`` were not refused (they ran): what stood for them is over."""
        kinds = set(op_kinds)
        self._drop(lambda key: key[0] == vmid and key[1] in kinds)

    def keep_only(self, keep: Callable[[tuple[int, str]], bool]) -> None:
        """Drop (and log as cleared) every standing refusal ``keep`` does not keep."""
        self._drop(lambda key: not keep(key))

    def _drop(self, drop: Callable[[tuple[int, str]], bool]) -> None:
        with self._lock:
            gone = sorted(key for key in self._standing if drop(key))
            for key in gone:
                del self._standing[key]
        for vmid, op_kind in gone:
            log.info("gate_refusal_cleared", vmid=vmid, op_kind=op_kind)
