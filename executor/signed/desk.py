"""Signed operations at the executor: propose, submit, revoke, and the clock and trust store behind them.

``OpDesk.submit`` runs the cheap, unauthenticated checks first and writes nothing before a
signature holds (docs/SAFETY.md §7): rate limit -> trust store -> verify (steps 1-11, on the
gate's clock) -> the clock-reset floor -> the nonce, read-only (step 12) -> the guest's current
facts -> ``Funnel.submit`` as OPERATOR_OP, which the gate admits only as exactly the action the op
names. The nonce is spent later, in the guest's lane, by the journal record that states the intent.
A refusal because the guest is not in the state signed for (DIGEST_STALE, BINDING_MISMATCH,
CLASS_MISMATCH), at admission or in the lane, spends it too: that state can come back, the op may
not. Any other refusal leaves it unspent: LOCKED (a backup holds the guest) is retried each tick
until the op expires; anything else drops the op, and the operator re-proposes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

import structlog

from executor.errors import TemporaryError
from executor.gate.actions import Step
from executor.gate.decisions import Refusal, descriptor, to_action
from executor.gate.gate import Gate
from executor.gate.kinds import ACTION_KINDS
from executor.gate.steps import (
    ACTION_MARKED,
    action_key,
    nonce_key,
    proposal_before,
    refused_key,
    revoked_key,
    step_from,
)
from executor.loop.desired import Declared
from executor.loop.funnel import Submission
from executor.loop.observe import Observed
from executor.pve.node import PveError, PveReader
from executor.signed.auth import could_sign, revokers, role_covers_keys
from executor.signed.clock import GateClock, mark_nonces
from executor.signed.rates import RateBuckets
from executor.signed.verifier import OpVerifier
from journal import Outcome
from safety import challenge as challenges
from safety.classify import Class, GuestFacts, Source, classify
from safety.opschema import SIGNABLE_CLASSES, canonical_params
from safety.payload import parse_payload
from safety.refusal import RefusalReason, Refused
from safety.signedop import MAX_SKEW, SIGNER_BACKDATE, Envelope, VerifiedOp, verify
from safety.truststore import TrustStore, TrustStoreHolder

log = structlog.get_logger("executor.ops")
REVOKE = "op.revoke"
OP_TTL_MAX = 24 * 3600 + MAX_SKEW  # the longest an op can live: the journal must remember nonces longer


class RateLimitedError(TemporaryError, RuntimeError):
    """Too many SubmitOp calls: refused before any parsing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpSettings:
    """Where the trust store and the gate's secrets live, and the limits."""

    state_dir: str
    trust_store: str | None = None  # unset: signed ops are off, every non-benign step is refused
    skew: float = 120.0  # op_clock_skew: how far in the future not_before may be (never on not_after)
    rate: float = 5.0  # SubmitOp calls per second and caller, sustained
    burst: int = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedProposal:
    """What ``ProposeOp`` returns: the action part to sign, its challenge, the verdict, the before-image."""

    action: bytes
    challenge: str
    cls: Class
    rule: str
    reasons: tuple[str, ...]
    before: dict[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitingOp:
    """A signed op accepted and not yet run; ``locked``: a lock held it back, retried each tick until not_after."""

    op_id: str
    vmid: int
    kind: str
    not_after: int
    locked: bool
    signers: tuple[str, ...]
    payload_sha256: str = ""  # with op_id, which op: another op may reuse an op id (its nonce key differs)


class Funnel(Protocol):
    """The single entry of every mutation (``executor.loop.funnel.Funnel`` is it): the gate admits, the queue runs."""

    def submit(self, steps: Mapping[int, Sequence[Step]], *, source: Source, observed: Observed,
               declared: Sequence[Declared], wait: bool = False, op: VerifiedOp | None = None,
               on_done: Callable[[VerifiedOp, Outcome | Refusal | None], None] | None = None,
               population: Sequence[Declared] | None = None, held: Set[int] | None = None) -> Submission:
        """Admit ``steps`` and queue what the gate admitted."""


class OpDesk:
    """The executor's counter for signed operations."""

    def __init__(self, *, reader: PveReader, gate: Gate, funnel: Funnel, verifier: OpVerifier, settings: OpSettings,
                 clock: GateClock) -> None:
        """``funnel``: where an accepted op's step is submitted (built before the desk and the engine); the
        wiring hands the engine, built after the desk, its ``held`` and ``tick``; ``verifier``: the trust store in
        force and the nonce check, shared with the gate's lane (which verifies each op again)."""
        self._reader, self._gate, self._funnel, self._verifier = reader, gate, funnel, verifier
        self.settings, self.clock = settings, clock
        self._lock = threading.Lock()
        self._hangup = threading.Event()
        self._accepted: dict[str, VerifiedOp] = {}  # by nonce key: queued or waiting for a retry, not yet run
        self._retry: set[str] = set()
        self._bucket = RateBuckets(settings.rate, settings.burst)  # per caller: a flood spends its own
        self._propose_bucket = RateBuckets(settings.rate, settings.burst)
        self.trust = verifier.trust

    # --- trust store ---------------------------------------------------------------------------

    @property
    def store(self) -> TrustStoreHolder | None:
        """The trust store holder (None: signed ops are off)."""
        return self.trust.holder

    def reload(self) -> None:
        """Load the trust store again now (a bad file keeps the last good store)."""
        self.trust.reload()

    def state(self) -> tuple[bool, int, int, str]:
        """(signed ops on, trust version, keys, why off)."""
        return self.trust.state()

    def _current(self) -> TrustStore | None:
        return self.trust.current()

    # --- propose ---------------------------------------------------------------------------------

    def propose(self, vmid: int, kind: str, params: dict[str, object], caller: str = "") -> IssuedProposal:
        """Describe an op on the guest as it is now, with a challenge; raises Refused. Mutates nothing.

        Rate-limited on its own, per ``caller`` (each call reads Proxmox twice and mints a challenge),
        so proposing never eats into what submitting may do. The before-image holds the keys the
        proposal touches and the digest it binds, never the rest of the config (matrix row 54).
        """
        if not self._propose_bucket.take(caller):
            raise RateLimitedError("ProposeOp: too many calls; try again in a second")
        reader, gate = self._reader, self._gate
        guest = reader.guests().find(vmid)
        if guest is None:
            raise Refused(RefusalReason.BINDING_MISMATCH, f"guest {vmid} is not on node {reader.node}")
        checked = canonical_params(kind, params)  # MALFORMED / UNKNOWN_KIND naming the field, before any use
        config, digest = reader.config(guest.type, vmid)
        step = step_from(kind=kind, vmid=vmid, guest_type=guest.type, params=checked, digest=digest)
        facts = GuestFacts(config=config, digest=digest, run_state=guest.status, lock=guest.lock)
        verdict = classify(to_action(step), facts, Source.OPERATOR_OP)
        if verdict.op_kind != kind:
            raise Refused(RefusalReason.BINDING_MISMATCH, f"this change is a {verdict.op_kind}: propose that kind")
        cls = gate.expected_class(step, verdict, facts)
        if cls.name not in SIGNABLE_CLASSES:
            raise Refused(RefusalReason.MALFORMED, "a benign change needs no approval: declare it instead")
        check = getattr(ACTION_KINDS.get(step.kind), "check", None)
        problem = check(step, config) if check is not None else None
        if problem is not None:
            raise Refused(RefusalReason.MALFORMED, problem)
        absent = sorted(set(step.delete) - set(config))
        if absent:  # a detach of a disk the guest lacks: nothing to sign, and a typo must not look signed-for
            verb = "detach" if kind == "config.disk_detach" else "delete"
            raise Refused(RefusalReason.MALFORMED, f"params.delete: guest {vmid} has no {', '.join(absent)}: "
                                                   f"nothing to {verb}")
        action = descriptor(step, verdict, facts, gate.audience(), cls)
        challenge = challenges.issue(self._secret(), json.loads(action), now=self.clock.now())
        return IssuedProposal(action=action, challenge=challenge, cls=cls, rule=verdict.rule, reasons=verdict.reasons,
                        before=proposal_before(config, digest, step))

    def _secret(self) -> bytes:
        secret = self._gate.settings.secret
        if not self._gate.journal_port.working or secret is None:  # the daemon keeps a secret only with a journal
            raise Refused(RefusalReason.JOURNAL_UNAVAILABLE, "the journal is not working: no signed op can run")
        return secret

    # --- submit ----------------------------------------------------------------------------------

    def submit(self, envelope: Envelope, caller: str = "") -> tuple[str, Refusal | None]:
        """Admission of a signed op (steps 1-12, then the gate); the result comes through ListOperations.

        ``caller`` names whose rate bucket pays (``common.callers``: uid, certificate or address).
        """
        if not self._bucket.take(caller):
            raise RateLimitedError("SubmitOp: too many calls; try again in a second")
        try:
            op = self._verify(envelope)
        except Refused as exc:
            return "", self._refusal(0, "", exc, logged=self._claimed(envelope))
        payload = op.payload
        try:
            self._verifier.check_nonce(op)
        except Refused as exc:
            return payload.op_id, self._op_refusal(op, exc)
        key = nonce_key(op)  # keyed as the journal keys it: another payload under this op_id is another op
        with self._lock:
            if key in self._accepted:
                twice = Refused(RefusalReason.NONCE_IN_FLIGHT, "this signed op is already accepted and queued")
                return payload.op_id, self._op_refusal(op, twice)
            self._accepted[key] = op
            self._verifier.hold(key, envelope)  # verified again in the lane
        try:
            mark_nonces(self.settings.state_dir)  # before it can spend a nonce: a lost journal is then noticed
        except OSError as exc:  # the journal's own directory: its next write would fail the same way
            self._gate.lose_journal(exc)
            self._forget(key)
            return payload.op_id, self._op_refusal(op, Refused(
                RefusalReason.JOURNAL_UNAVAILABLE, f"state_dir not writable: {exc.strerror}"))
        try:
            refusal = self._queue(op)
        except Exception:  # never leave an accepted op holding its guest out of planning
            self._forget(key)
            raise
        if refusal is not None and self._wait_if_locked(refusal, key):
            refusal = None  # accepted: it waits for the lock, retried each tick until it expires
        if refusal is not None:
            self._forget(key)
        log.info("op_submitted", op_id=payload.op_id, vmid=payload.vmid, op_kind=payload.kind,
                 decision="refused" if refusal else "accepted", signers=list(op.signers))
        return payload.op_id, refusal

    def _verify(self, envelope: Envelope) -> VerifiedOp:
        store = self._current()
        if store is None:
            raise Refused(RefusalReason.TRUST_STORE_INVALID, self.state()[3])
        if not self._gate.journal_port.working:
            raise Refused(RefusalReason.JOURNAL_UNAVAILABLE, "the journal is not working: only benign steps run")
        now = self.clock.now()
        op = verify(envelope, store, now=now, audience=self._gate.audience(),
                    challenge_key=self._gate.settings.secret, skew=self.settings.skew)
        if op.payload.not_before + SIGNER_BACKDATE < int(self.clock.floor):  # payload times are whole seconds
            # Nonces compacted while the clock ran ahead cannot be trusted: only ops signed since the reset.
            raise Refused(RefusalReason.EXPIRED, f"signed before {int(self.clock.floor)}, when this executor's "
                                                 "state began or its clock was reset")
        return op

    def _queue(self, op: VerifiedOp) -> Refusal | None:
        """Read the guest, hand the op's step to the funnel; the gate's admission decides."""
        payload = op.payload
        reader = self._reader
        try:
            guest = reader.guests().find(payload.vmid)
            if guest is None:
                raise Refused(RefusalReason.DIGEST_STALE, f"guest {payload.vmid} is not on node {reader.node}")
            config = reader.config(guest.type, payload.vmid)
        except PveError as exc:
            return self._op_refusal(op, Refused(RefusalReason.LOCKED, f"cannot read the guest now: {exc}"))
        except Refused as exc:  # the guest is gone: not the guest signed for
            if not self._gate.spend(op, exc.reason.value, exc.detail, guest_type=None, facts=None):
                exc = Refused(RefusalReason.JOURNAL_UNAVAILABLE, f"{exc.detail}, and spending the op failed")
            return self._op_refusal(op, exc)
        step = step_from(kind=payload.kind, vmid=payload.vmid, guest_type=payload.guest_type, params=payload.params,
                         digest=payload.precondition.digest)
        ran = self._gate.records.last_refusal(action_key(op)) if payload.kind in ACTION_MARKED else None
        if ran is not None:
            stale = Refused(RefusalReason.DIGEST_STALE, ran[1])
            if not self._gate.spend(op, stale.reason.value, ran[1], guest_type=guest.type, facts=None):
                stale = Refused(RefusalReason.JOURNAL_UNAVAILABLE, f"{ran[1]}, and spending the op failed")
            return self._op_refusal(op, stale)
        store = self._current()
        role = store.roles.get(payload.role) if store is not None else None
        facts = GuestFacts(config=config[0], digest=config[1], run_state=guest.status, lock=guest.lock)
        denied = (role_covers_keys(role, step, facts) if role is not None
                  else Refused(RefusalReason.ROLE_DENIES, f"role {payload.role} is not in the trust store in force"))
        if denied is not None:
            return self._op_refusal(op, denied)
        observed = Observed(guests={guest.vmid: guest}, configs={guest.vmid: config}, elsewhere=frozenset())
        submission = self._funnel.submit({payload.vmid: [step]}, source=Source.OPERATOR_OP, observed=observed,
                                         declared=[], op=op, on_done=self._done)
        refused = submission.admission.refused
        return refused[0] if refused else None

    def _done(self, op: VerifiedOp, result: Outcome | Refusal | None) -> None:
        """The lane's word on an op: ran, failed or crashed (None) -> forgotten; LOCKED -> retried next tick."""
        key = nonce_key(op)
        if not (isinstance(result, Refusal) and self._wait_if_locked(result, key)):
            self._forget(key)

    def _wait_if_locked(self, refusal: Refusal, key: str) -> bool:
        """A LOCKED refusal (a backup, a migration) puts the op up for the next tick's retry: True if it did."""
        if refusal.reason != RefusalReason.LOCKED.value:
            return False
        with self._lock:
            if key in self._accepted:
                self._retry.add(key)
        return True

    def _forget(self, key: str) -> None:
        with self._lock:
            self._accepted.pop(key, None)
            self._verifier.release(key)
            self._retry.discard(key)

    def held(self) -> set[int]:
        """Guests with an accepted op not yet run: left out of planning, like a busy guest."""
        with self._lock:
            return {op.payload.vmid for op in self._accepted.values()}

    def waiting(self) -> list[WaitingOp]:
        """Signed ops accepted and not yet run (``op status``): queued in their lane, or held back by a lock."""
        with self._lock:
            return [WaitingOp(op_id=op.payload.op_id, vmid=op.payload.vmid, kind=op.payload.kind,
                              not_after=op.payload.not_after, locked=key in self._retry, signers=op.signers,
                              payload_sha256=op.payload_sha256)
                    for key, op in self._accepted.items()]

    def accepted(self) -> int:
        """Signed ops accepted and not yet run."""
        with self._lock:
            return len(self._accepted)

    def tick(self) -> None:
        """Each tick: reload a changed (or SIGHUP'd) trust store; requeue ops a lock held back; drop expired ones."""
        if self._hangup.is_set():
            self._hangup.clear()
            self.reload()
        self.trust.reload_if_changed()
        now = self.clock.now()
        with self._lock:
            due = [(key, self._accepted[key]) for key in sorted(self._retry)]
            self._retry.clear()
        for key, op in due:
            if now >= op.payload.not_after:
                log.warning("op_expired_waiting", op_id=op.payload.op_id, vmid=op.payload.vmid)
                self._forget(key)
                continue
            try:
                refusal = self._queue(op)
            except Exception as exc:  # one op's trouble never stops the tick (nor the daemon)
                log.error("op_requeue_failed", op_id=op.payload.op_id, error=repr(exc))
                self._forget(key)
                continue
            if refusal is not None and not self._wait_if_locked(refusal, key):
                self._forget(key)

    def hang_up(self) -> None:
        """SIGHUP: reload the trust store at the next tick (a signal handler does no I/O)."""
        self._hangup.set()

    # --- revoke ----------------------------------------------------------------------------------

    def revoke(self, envelope: Envelope, caller: str = "") -> tuple[str, Refusal | None]:
        """A signed ``op.revoke`` marks the named op revoked for good (a veto): it can never run after.

        When the target is accepted here, the revoker must be its kind's peer: the revocation names
        the target's guest, and the revoker's role allows the target's kind and class (docs/SAFETY.md §6.7).
        """
        if not self._bucket.take(caller):
            raise RateLimitedError("RevokeOp: too many calls; try again in a second")
        try:
            revocation = self._verify(envelope)
            if revocation.payload.kind != REVOKE:
                raise Refused(RefusalReason.BINDING_MISMATCH, f"RevokeOp takes an {REVOKE} op, not "
                                                              f"{revocation.payload.kind}")
            target = str(revocation.payload.params["op_id"])
            prior = self._gate.records.last_refusal(revoked_key(target))
            by = set(revokers(prior[1])) if prior is not None else set()
            if by >= set(revocation.signers):
                raise Refused(RefusalReason.OP_REVOKED, f"op {target} is already revoked by these keys")
            covered = self._may_revoke(revocation, target)
        except Refused as exc:
            return "", self._refusal(0, REVOKE, exc)
        # The detail names every revoker so far (a veto that counts for nothing never hides one that counts):
        # an op submitted later is vetoed only if one of them could sign it.
        if not self._gate.journal_write(lambda j: j.refuse(
                vmid=revocation.payload.vmid, kind=REVOKE, reason=RefusalReason.OP_REVOKED.value,
                detail=json.dumps({"by": sorted(by | set(revocation.signers))}), op_id=target,
                key=revoked_key(target))):
            return "", self._refusal(0, REVOKE, Refused(RefusalReason.JOURNAL_UNAVAILABLE,
                                                        "the veto could not be journaled"))
        for key in covered:
            self._forget(key)
        log.warning("op_revoked", op_id=target, by=list(revocation.signers))
        return target, None

    def _may_revoke(self, revocation: VerifiedOp, target: str) -> list[str]:
        """The accepted ops under ``target`` the revokers could sign (docs/SAFETY.md §6.7): the ones the veto stops.

        ROLE_DENIES when ops under that id wait here and the revokers could sign none of them. An op not
        submitted yet is unknown: the veto is recorded with its signers and weighed when it arrives.
        """
        with self._lock:
            known = [(key, op) for key, op in self._accepted.items() if op.payload.op_id == target]
        store = self._current()
        if not known or store is None:
            return []
        covered = [key for key, op in known if could_sign(store, revocation.signers, op.payload)]
        if not covered:
            goal = known[0][1].payload
            raise Refused(RefusalReason.ROLE_DENIES, f"no revoker could have signed op {target} "
                                                     f"({goal.kind} {goal.class_} on guest {goal.vmid})")
        return covered

    def _claimed(self, envelope: Envelope) -> dict[str, object]:
        """What a refused envelope says of itself, for the log line: its key ids and, when the payload parses,
        its guest, kind, op id and role, with the role's threshold (need) and the signers holding it (have)."""
        keyids = sorted({signature.keyid for signature in envelope.signatures})
        fields: dict[str, object] = {"keyids": keyids}
        try:
            payload = parse_payload(envelope.payload)
        except Refused:
            return fields
        fields.update(vmid=payload.vmid, op_kind=payload.kind, op_id=payload.op_id, role=payload.role)
        store = self._current()
        role = store.roles.get(payload.role) if store is not None else None
        if store is not None and role is not None:
            holders = {k for k in keyids if k in store.keys and role.name in store.keys[k].roles}
            fields.update(need=role.threshold, have=len(holders))
        return fields

    def _op_refusal(self, op: VerifiedOp, exc: Refused) -> Refusal:
        """``_refusal`` of a verified op: journaled under the op (its id and payload hash)."""
        payload = op.payload
        return self._refusal(payload.vmid, payload.kind, exc, payload.op_id, sha256=op.payload_sha256)

    def _refusal(self, vmid: int, kind: str, exc: Refused, op_id: str = "",
                 logged: Mapping[str, object] | None = None, *, sha256: str = "") -> Refusal:
        """A Refusal for the API; counted and logged; journaled only once a signature held (``op_id``).

        Unauthenticated junk never reaches the journal: a flood of it costs counters and log lines.
        ``logged``: what the envelope claims (``_claimed``), logged only: nothing unverified is journaled.
        """
        metrics = self._gate.metrics
        metrics.gate_decisions.labels("unknown", "refused", exc.reason.value.lower()).inc()
        fields: dict[str, object] = {"vmid": vmid, "op_kind": kind, "op_id": op_id, **(logged or {})}
        log.warning("op_refused", reason=exc.reason.value, detail=exc.detail, **fields)
        if op_id:
            self._gate.journal_write(lambda j: j.refuse_if_new(
                vmid=vmid, kind=kind, reason=exc.reason.value, detail=exc.detail, op_id=op_id,
                key=refused_key(op_id, sha256, exc.reason.value)))
        return Refusal(vmid=vmid, op_kind=kind, cls=Class.DESTRUCTIVE, reason=exc.reason.value, detail=exc.detail,
                       op_id=op_id, payload_sha256=sha256)
