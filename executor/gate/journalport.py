"""The executor's journal port: the journal (``LiveJournal``), or ``NO_JOURNAL`` when there is none.

The wiring builds one port (``journal_port``) and hands the same object to the gate, the gate's
clock and the op desk; when a write fails, ``lost`` switches it to ``NO_JOURNAL`` in place, so no
holder needs to ask the gate which journal is current. Without a journal only benign steps run.
What is only *read* (the operations in flight, recent records, a key's last refusal, the
high-water mark) holds nothing there, so a reader needs no check; a write does
nothing and says so (False); an intent journaled for a signed op, or a nonce checked, raises
``NoJournalError``: a signed op needs a working journal. The policy points ask ``working``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import structlog

from executor.gate.decisions import Refusal, spends
from executor.gate.files import INTACT_MARK
from executor.gate.steps import nonce_key, refused_key
from journal import InFlight, Journal, JournalError, KeyState, Record, RefusalRecord
from safety.classify import GuestFacts
from safety.signedop import VerifiedOp

log = structlog.get_logger("executor.gate")  # the gate's events, wherever the write is made


class JournalReads(Protocol):
    """The journal's read side, as the loop, the lane, the op desk, the gate's clock and the API use it."""

    @property
    def high_water(self) -> float:
        """The largest record time seen."""

    def in_flight(self) -> list[InFlight]:
        """Operations begun and not ended."""

    def recent(self, limit: int = 100) -> list[Record]:
        """The last ``limit`` records, oldest first."""

    def last_refusal(self, key: str) -> tuple[str, str] | None:
        """The last refusal recorded under ``key`` (reason, detail), if any."""

    def keys_of(self, op_id: str) -> dict[str, KeyState]:
        """The nonces operation ``op_id`` holds in flight or spent, by key (``Journal.keys_of``)."""

    def refusals_of(self, op_id: str) -> list[RefusalRecord]:
        """The last refusal under each key whose refusal names ``op_id`` (``Journal.refusals_of``)."""


class NoJournalError(Exception):
    """There is no working journal: what needs one (a signed op's intent, its nonce) is refused."""


class JournalPort(JournalReads, Protocol):
    """The journal as the gate, the lane and the op desk write it: ``LiveJournal`` or ``NO_JOURNAL``."""

    @property
    def working(self) -> bool:
        """True for a journal that opened and has not failed: only then may anything but benign steps run."""

    @property
    def journal(self) -> Journal | None:
        """The journal itself, for recovery (None: there is none)."""

    def write(self, write: Callable[[Journal], object]) -> bool:
        """Apply ``write`` to the journal (False: there is none); a failed write raises ``JournalError``."""

    def begin(self, *, vmid: int, kind: str, payload: Mapping[str, Any], key: str | None,
              op_id: str | None = None) -> str:
        """Journal an intent; its op id, ``op_id`` when given (``NoJournalError`` for a keyed intent where there is
        no journal)."""

    def check_key(self, key: str) -> None:
        """Raise when ``key`` was spent or is in flight (``NoJournalError``: there is no journal to ask)."""

    def lost(self) -> None:
        """A write failed: unlink the intact mark, so the next start sets the clock floor."""

    def close(self) -> None:
        """Close the journal."""


class SwitchedJournal:
    """The port the wiring builds: the journal until a write fails (``lost``), ``NO_JOURNAL`` from then on."""

    def __init__(self, port: JournalPort) -> None:
        """``port``: a ``LiveJournal``, or ``NO_JOURNAL`` when the journal could not open."""
        self._port = port

    @property
    def working(self) -> bool:
        """True until the journal is lost (or if it never opened, never)."""
        return self._port.working

    @property
    def journal(self) -> Journal | None:
        """The journal itself (None once lost)."""
        return self._port.journal

    @property
    def high_water(self) -> float:
        """The journal's largest record time (0 without one)."""
        return self._port.high_water

    def in_flight(self) -> list[InFlight]:
        """Operations begun and not ended."""
        return self._port.in_flight()

    def recent(self, limit: int = 100) -> list[Record]:
        """The last ``limit`` records."""
        return self._port.recent(limit)

    def last_refusal(self, key: str) -> tuple[str, str] | None:
        """The last refusal under ``key``."""
        return self._port.last_refusal(key)

    def keys_of(self, op_id: str) -> dict[str, KeyState]:
        """The nonces of ``op_id``."""
        return self._port.keys_of(op_id)

    def refusals_of(self, op_id: str) -> list[RefusalRecord]:
        """The refusals naming ``op_id``."""
        return self._port.refusals_of(op_id)

    def write(self, write: Callable[[Journal], object]) -> bool:
        """One write (False: no journal)."""
        return self._port.write(write)

    def begin(self, *, vmid: int, kind: str, payload: Mapping[str, Any], key: str | None,
              op_id: str | None = None) -> str:
        """One intent (see ``JournalPort.begin``)."""
        return self._port.begin(vmid=vmid, kind=kind, payload=payload, key=key, op_id=op_id)

    def check_key(self, key: str) -> None:
        """The journal's answer for ``key``."""
        self._port.check_key(key)

    def lost(self) -> None:
        """Benign-only from now on: ``NO_JOURNAL`` in place of the journal, whose intact mark is unlinked."""
        port, self._port = self._port, NO_JOURNAL
        port.lost()

    def close(self) -> None:
        """Close the journal (nothing once it is lost: as before, a lost journal is left as it is)."""
        self._port.close()


class LiveJournal:
    """A working journal; ``timer`` times each append (the journal-append histogram)."""

    working = True

    def __init__(self, journal: Journal,
                 timer: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext) -> None:
        """``journal``: opened by the wiring."""
        self.journal: Journal | None = journal
        self._journal, self._timer = journal, timer

    @property
    def high_water(self) -> float:
        """The journal's largest record time."""
        return self._journal.high_water

    def in_flight(self) -> list[InFlight]:
        """Operations begun and not ended."""
        return self._journal.in_flight()

    def recent(self, limit: int = 100) -> list[Record]:
        """The last ``limit`` records."""
        return self._journal.recent(limit)

    def last_refusal(self, key: str) -> tuple[str, str] | None:
        """The last refusal under ``key``."""
        return self._journal.last_refusal(key)

    def keys_of(self, op_id: str) -> dict[str, KeyState]:
        """The nonces of ``op_id``."""
        return self._journal.keys_of(op_id)

    def refusals_of(self, op_id: str) -> list[RefusalRecord]:
        """The refusals naming ``op_id``."""
        return self._journal.refusals_of(op_id)

    def write(self, write: Callable[[Journal], object]) -> bool:
        """One timed write; a ``JournalError`` goes to the caller (the gate loses the journal)."""
        with self._timer():
            write(self._journal)
        return True

    def begin(self, *, vmid: int, kind: str, payload: Mapping[str, Any], key: str | None,
              op_id: str | None = None) -> str:
        """One timed, durable intent."""
        with self._timer():
            return self._journal.begin(vmid=vmid, kind=kind, payload=payload, key=key, op_id=op_id)

    def check_key(self, key: str) -> None:
        """The journal's answer for ``key`` (spent, in flight, or free)."""
        self._journal.check_key(key)

    def lost(self) -> None:
        """Unlink the intact mark (an unlink needs no free space)."""
        with contextlib.suppress(OSError):
            (Path(self._journal.directory) / INTACT_MARK).unlink(missing_ok=True)

    def close(self) -> None:
        """Close the journal."""
        self._journal.close()


class NoJournal:
    """No journal: nothing in flight, nothing recorded, a high-water mark of 0, nothing written."""

    high_water = 0.0
    working = False
    journal: Journal | None = None

    def in_flight(self) -> list[InFlight]:
        """Nothing is in flight where nothing was begun."""
        return []

    def recent(self, limit: int = 100) -> list[Record]:
        """No records."""
        return []

    def last_refusal(self, key: str) -> tuple[str, str] | None:
        """No refusal was recorded."""
        return None

    def keys_of(self, op_id: str) -> dict[str, KeyState]:
        """No nonce was spent."""
        return {}

    def refusals_of(self, op_id: str) -> list[RefusalRecord]:
        """No refusal was recorded."""
        return []

    def write(self, write: Callable[[Journal], object]) -> bool:
        """Nothing is written."""
        return False

    def begin(self, *, vmid: int, kind: str, payload: Mapping[str, Any], key: str | None,
              op_id: str | None = None) -> str:
        """A benign step runs unjournaled under a fresh id; a keyed (signed) one cannot."""
        if key is not None:
            raise NoJournalError("the journal is not working")
        return op_id or os.urandom(8).hex()

    def check_key(self, key: str) -> None:
        """No journal can say a nonce is unspent."""
        raise NoJournalError("the journal is not working")

    def lost(self) -> None:
        """Nothing to mark."""

    def close(self) -> None:
        """Nothing to close."""


NO_JOURNAL: JournalPort = NoJournal()


class JournalWrites:
    """The journal's writes as the gate and its lane make them: a write that fails loses the journal.

    Built by the gate over its port and handed to its lane, so both write, spend and lose through one object.
    """

    def __init__(self, port: JournalPort) -> None:
        """``port``: the gate's journal port (switched to ``NO_JOURNAL`` in place by ``lose``)."""
        self._port = port

    def write(self, write: Callable[[Journal], object]) -> bool:
        """One journal write (True: written); a failure switches the port to benign-only."""
        try:
            return self._port.write(write)
        except JournalError as exc:
            self.lose(exc)
            return False

    def lose(self, exc: JournalError | OSError) -> None:
        """From here on only benign steps are admitted (JOURNAL_UNAVAILABLE for the rest).

        The journal's intact mark goes too (an unlink needs no free space): a write that failed may have
        been a spent nonce, so the next start refuses every op signed before it (``executor.signed.clock.gate_secret``).
        """
        log.error("journal_failed_benign_only_from_now", error=str(exc))
        self._port.lost()

    def refusal(self, refusal: Refusal) -> None:
        """Journal ``refusal`` unless its guest and kind (a signed op's: the op) were last refused for the same reason
        (across restarts)."""
        # A signed op's refusal is keyed by the op (op status reads it), a step's by its guest and kind.
        key = (refused_key(refusal.op_id, refusal.payload_sha256, refusal.reason)
               if refusal.op_id and refusal.payload_sha256 else f"{refusal.vmid}:{refusal.op_kind}")
        self.write(lambda j: j.refuse_if_new(vmid=refusal.vmid, kind=refusal.op_kind, reason=refusal.reason,
                                             detail=refusal.detail, key=key, op_id=refusal.op_id or None))

    def spend(self, op: VerifiedOp, reason: str, detail: str, *, guest_type: str | None,
              facts: GuestFacts | None) -> bool:
        """Spend ``op``'s nonce if it was refused for the guest's state (``decisions.spends``): it never runs later.

        ``guest_type`` and ``facts``: the guest as read for the refusal (None: not on this node). One durable
        journal record, before the refusal is answered: a replay, now or after a restart, is NONCE_SPENT.
        False when the op had to be spent and could not be: the caller answers JOURNAL_UNAVAILABLE, the journal
        is lost, and the next start sets the clock floor (``lose``), so the op never runs.
        """
        if not spends(reason, op, guest_type, facts):
            return True
        return self.write(lambda j: j.burn(nonce_key(op), op_id=op.payload.op_id, why=f"{reason}: {detail}"))


def journal_port(journal: Journal | None,
                 timer: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext) -> JournalPort:
    """The port over what ``open_journal`` gave: the journal, or ``NO_JOURNAL`` when it could not open."""
    return SwitchedJournal(NO_JOURNAL if journal is None else LiveJournal(journal, timer))
