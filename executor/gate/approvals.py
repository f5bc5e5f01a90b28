"""The gate's approval book: the refused steps waiting for a signed approval, and the refusal counts.

Entries are keyed by guest, op kind and descriptor digest; an entry seen again keeps when it was first
seen. One lock covers the entries and the counts, so a status read sees them from one instant and an
op admitted while a tick swaps the list never finds its approval missing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

from executor.gate.actions import Step
from executor.gate.decisions import PendingApproval, descriptor
from safety.classify import Class, GuestFacts, Verdict


def _key(entry: PendingApproval) -> str:
    return f"{entry.vmid}:{entry.op_kind}:{entry.descriptor_sha256}"


class ApprovalBook:
    """Pending approvals and how many steps were refused or deferred (both only grow)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, PendingApproval] = {}
        self.refused_total = 0
        self.deferred_total = 0

    def record(self, *, refused: int, deferred: int, pending: Sequence[PendingApproval],
               keep: Callable[[PendingApproval], bool] | None = None) -> None:
        """A tick's (or a batch's) outcome in one swap: the counts, then ``pending`` listed.

        ``keep``: when given, the entries already listed that stay (the others are pruned first).
        """
        with self._lock:
            self.refused_total += refused
            self.deferred_total += deferred
            listed = self._pending
            if keep is not None:
                listed = {k: p for k, p in listed.items() if keep(p)}
            for entry in pending:
                old = self._pending.get(_key(entry))
                listed[_key(entry)] = replace(entry, first_seen=old.first_seen) if old is not None else entry
            self._pending = listed

    def keep(self, entry: PendingApproval) -> None:
        """List ``entry`` for approval (keeping when it was first seen)."""
        with self._lock:
            old = self._pending.get(_key(entry))
            self._pending[_key(entry)] = replace(entry, first_seen=old.first_seen) if old is not None else entry

    def listed_for(self, vmid: int, op_kind: str) -> list[PendingApproval]:
        """The entries for ``vmid`` and ``op_kind``."""
        with self._lock:
            return [p for p in self._pending.values() if p.vmid == vmid and p.op_kind == op_kind]

    def expected_class(self, step: Step, verdict: Verdict, facts: GuestFacts, audience: Callable[[], str]) -> Class:
        """The class a signed op for ``step`` must carry: the verdict's, or a pending approval's when higher.

        A remote source's stops beyond the blast radius were listed as APPROVAL; signing that exact
        descriptor approves it, although the same stop from an operator alone is benign. ``audience`` is
        read only when an entry is listed.
        """
        listed = self.listed_for(step.vmid, verdict.op_kind)
        classes = [p.cls for p in listed if p.descriptor == descriptor(step, verdict, facts, audience(), p.cls)]
        return max([verdict.cls, *classes])

    def entries(self) -> list[PendingApproval]:
        """Every entry, by vmid, then op kind, then descriptor digest."""
        with self._lock:
            return sorted(self._pending.values(), key=lambda p: (p.vmid, p.op_kind, p.descriptor_sha256))

    def count_refused(self) -> None:
        """One more refusal (made in a lane)."""
        with self._lock:
            self.refused_total += 1

    def counts(self) -> tuple[int, int, int]:
        """(entries listed, refused, deferred), read together."""
        with self._lock:
            return len(self._pending), self.refused_total, self.deferred_total
