"""The journal's in-memory state, folded from record bodies (replay and live appends alike)."""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from journal.records import (
    APPLIED,
    AT,
    BEGUN,
    BEGUN_KEY,
    ENDED,
    FIELDS,
    OP,
    OUTCOMES,
    REFUSED,
    REFUSED_DETAIL,
    REFUSED_REASON,
    TASK,
    Applied,
    Body,
    Outcome,
    TaskStarted,
    fields_of,
    mark,
)

BURN_PREFIX = "op:"
"""Keys starting with this are nonces: spent by their ``begin``, whatever the outcome, never released."""


def is_burn_key(key: str) -> bool:
    """Whether ``key`` is a nonce that no outcome releases."""
    return key.startswith(BURN_PREFIX)


@dataclass(frozen=True, slots=True, kw_only=True)
class InFlight:
    """An operation begun and not ended: what the executor re-checks on restart."""

    op_id: str
    vmid: int
    kind: str
    payload: dict[str, Any]
    key: str | None
    begun_at: float
    upid: str | None = None


@dataclass(frozen=True, slots=True)
class KeyState:
    """An idempotency key: its payload hash, its operation, how that ended (None: in flight), when."""

    payload_hash: bytes
    op_id: str
    outcome: Outcome | None
    at: float


class State:
    """Operations in flight, idempotency keys and the last refusal per key, kept as raw bodies.

    Replay builds no objects beyond the key states. ``high_water`` is the largest record ``at``
    folded so far.
    """

    def __init__(self, keep_recent: int) -> None:
        self.ops: dict[str, Body] = {}
        self.upids: dict[str, str] = {}
        self.keys: dict[str, KeyState] = {}
        self.refusals: dict[str, Body] = {}
        # Which burn keys and refusal keys name an operation (``of_op``): added as records fold, rebuilt by
        # compaction; an entry may be stale (the key since dropped or taken over), so each is checked when read.
        self.burns_by_op: dict[str, set[str]] = {}
        self.refusals_by_op: dict[str, set[str]] = {}
        self.recent: collections.deque[Body] = collections.deque(maxlen=keep_recent)
        self.high_water = 0.0

    def apply(self, body: Body) -> None:
        """Fold one durable record (idempotent: compaction may leave records replayed twice)."""
        kind, at, number, fields = body
        if at > self.high_water:  # noqa: PLR1730 (max() costs 7x the compare, once per record at replay)
            self.high_water = at
        # Unpacking names each type's fields (see records.py) and checks their count: a ValueError
        # here is reported by the scan as an undecodable record.
        if kind == BEGUN:
            raw_op, _, key, payload = fields
            op = raw_op.decode() if raw_op is not None else ""
            self.ops[op] = body
            if key is not None and payload is not None:
                self._key(key.decode(), KeyState(hashlib.sha256(payload).digest(), op, None, at))
        elif kind == TASK:
            raw_op, upid = fields
            op = raw_op.decode() if raw_op is not None else ""
            if op in self.ops and upid is not None:
                self.upids[op] = upid.decode()
        elif kind == ENDED:
            raw_op, _ = fields
            self._end(raw_op.decode() if raw_op is not None else "", OUTCOMES[number], at)
        elif kind == APPLIED:
            raw_op, key, digest = fields
            if key is not None and digest is not None:
                op = raw_op.decode() if raw_op is not None else ""
                self._key(key.decode(), KeyState(digest, op, OUTCOMES[number], at))
        elif kind == REFUSED:
            raw_op, _, _, _, key = fields
            if key is not None:
                self._refusal(key.decode(), raw_op, body)
        else:
            return  # MARK only carries the high-water mark; a type from a newer version is not ours to read
        self.recent.append(body)

    def _key(self, key: str, state: KeyState) -> None:
        """A key's state as folded; a burn key indexed by its operation (``burns_of``)."""
        self.keys[key] = state
        if is_burn_key(key):
            self.burns_by_op.setdefault(state.op_id, set()).add(key)

    def _refusal(self, key: str, op: bytes | None, body: Body) -> None:
        """A key's last refusal as folded; indexed by the operation it names, if any (``refusals_of``)."""
        self.refusals[key] = body
        if op is not None:
            self.refusals_by_op.setdefault(op.decode(), set()).add(key)

    def _end(self, op: str, outcome: Outcome, at: float) -> None:
        begun = self.ops.pop(op, None)
        self.upids.pop(op, None)
        if begun is None or (raw_key := begun[FIELDS][BEGUN_KEY]) is None:
            return
        key = raw_key.decode()
        if outcome is Outcome.FAILED and not is_burn_key(key):
            self.keys.pop(key, None)  # a failed one-shot may be retried; a spent nonce may not
        elif (known := self.keys.get(key)) is not None:
            self.keys[key] = KeyState(known.payload_hash, op, outcome, at)

    def last_refusal(self, key: str) -> tuple[str, str, float] | None:
        """The reason, detail and time of the last refusal journaled under ``key``."""
        body = self.refusals.get(key)
        if body is None:
            return None
        fields = body[FIELDS]
        reason, detail = fields[REFUSED_REASON], fields[REFUSED_DETAIL]
        return (reason.decode() if reason is not None else "", detail.decode() if detail is not None else "",
                body[AT])

    def burns_of(self, op: str) -> dict[str, KeyState]:
        """The burn keys operation ``op`` holds (in flight) or spent, by key (expired ones included: the caller
        filters by its clock)."""
        found = {key: state for key in self.burns_by_op.get(op, ()) if (state := self.keys.get(key)) is not None
                 and state.op_id == op}
        return dict(sorted(found.items(), key=lambda item: item[1].at))

    def refusals_of(self, op: str) -> list[tuple[str, Body]]:
        """The last refusal under each key that names operation ``op`` (key, body), oldest first."""
        found = [(key, body) for key in self.refusals_by_op.get(op, ())
                 if (body := self.refusals.get(key)) is not None and body[FIELDS][OP] == op.encode()]
        return sorted(found, key=lambda item: item[1][AT])

    def in_flight(self) -> list[InFlight]:
        """Operations in flight, oldest first, decoded."""
        flights = []
        for op, (_, at, vmid, fields) in self.ops.items():
            _, kind, key, payload = fields
            flights.append(InFlight(op_id=op, vmid=vmid, kind=kind.decode() if kind else "",
                                    payload=json.loads(payload) if payload else {},
                                    key=key.decode() if key is not None else None, begun_at=at,
                                    upid=self.upids.get(op)))
        return sorted(flights, key=lambda f: f.begun_at)

    def live(self, expired: Callable[[float], bool]) -> list[Body]:
        """What compaction keeps, forgetting what ``expired`` (given a record's time) says is out of the window.

        The high-water mark; in-flight begun (and task) records; ended keys (burn keys whatever
        their outcome); the last refusal per key.
        """
        bodies: list[Body] = [mark(self.high_water)]
        for op, begun in sorted(self.ops.items(), key=lambda item: item[1][AT]):
            bodies.append(begun)
            if (upid := self.upids.get(op)) is not None:
                bodies.append(fields_of(TaskStarted(op_id=op, upid=upid, at=begun[AT])))
        for key, state in list(self.keys.items()):
            if state.outcome is None:
                continue
            if expired(state.at):
                del self.keys[key]
                continue
            bodies.append(fields_of(Applied(key=key, payload_hash=state.payload_hash, op_id=state.op_id,
                                            outcome=state.outcome, at=state.at)))
        for key, body in list(self.refusals.items()):
            if expired(body[AT]):
                del self.refusals[key]
            else:
                bodies.append(body)
        self._reindex()
        return bodies

    def _reindex(self) -> None:
        """Rebuild the by-operation indexes from the keys and refusals kept (compaction drops the rest)."""
        self.burns_by_op, self.refusals_by_op = {}, {}
        for key, state in self.keys.items():
            if is_burn_key(key):
                self.burns_by_op.setdefault(state.op_id, set()).add(key)
        for key, body in self.refusals.items():
            if (raw_op := body[FIELDS][OP]) is not None:
                self.refusals_by_op.setdefault(raw_op.decode(), set()).add(key)
