"""The op verifier: a signed op checked again in the lane, right before its nonce is spent.

Built by the wiring before the gate (whose lane calls ``reverify``) and the op desk (which hands it
each accepted op's envelope and asks it for the nonce check at submission), so neither holds the
other: it needs only the trust store in force, the gate's clock, the journal port and the audience.
"""

from __future__ import annotations

from collections.abc import Callable

from executor.gate.actions import Step
from executor.gate.journalport import JournalPort, NoJournalError
from executor.gate.steps import nonce_key, revoked_key
from executor.signed.auth import could_sign, revokers, role_covers_keys
from executor.signed.clock import GateClock
from executor.signed.trust import TrustKeeper
from journal import KeyInFlightError, NonceSpentError
from safety.classify import GuestFacts
from safety.refusal import RefusalReason, Refused
from safety.signedop import Envelope, VerifiedOp, verify


class OpVerifier:
    """The trust store in force, the accepted ops' envelopes, and the checks made against them."""

    def __init__(self, *, trust: TrustKeeper, clock: GateClock, journal: JournalPort, audience: Callable[[], str],
                 skew: float) -> None:
        """``trust``: the keeper the op desk reloads; ``journal``: the wiring's port; ``skew``: op_clock_skew."""
        self.trust, self.clock, self._journal, self._audience, self._skew = trust, clock, journal, audience, skew
        self._envelopes: dict[str, Envelope] = {}  # by nonce key: the ops the desk accepted and has not forgotten

    def hold(self, key: str, envelope: Envelope) -> None:
        """Keep an accepted op's envelope, to verify it again in the lane."""
        self._envelopes[key] = envelope  # one dict operation: atomic under the GIL, like the desk's own

    def release(self, key: str) -> None:
        """The desk forgot the op: it is no longer accepted here."""
        self._envelopes.pop(key, None)

    def reverify(self, op: VerifiedOp, step: Step, facts: GuestFacts) -> Refused | None:
        """In the lane, right before the nonce is spent: the op against the trust store in force now.

        A key revoked, expired or stripped of its role, an op revoked, or a store rolled back while
        the op waited for a lock all stop it here (the challenge was checked at submission). Then the
        role must name the op kind of every non-benign key of a config op, not only the strictest.
        """
        store = self.trust.current()
        envelope = self._envelopes.get(nonce_key(op))
        if store is not None and envelope is None:  # forgotten: a veto (op.revoke) while it waited says why
            try:
                self._check_veto(op)
            except Refused as exc:
                return exc
        if store is None or envelope is None:
            return Refused(RefusalReason.TRUST_STORE_INVALID, self.trust.state()[3] or "the op is not accepted here")
        try:
            verify(envelope, store, now=self.clock.now(), audience=self._audience(), challenge_key=None,
                   skew=self._skew, check_challenge=False)
            self.check_nonce(op)  # a veto that came while the op waited
        except Refused as exc:
            return exc
        return role_covers_keys(store.roles[op.payload.role], step, facts)  # verify() found the role

    def _check_veto(self, op: VerifiedOp) -> None:
        """OP_REVOKED when an op.revoke whose signers could sign ``op`` was journaled for its id."""
        op_id = op.payload.op_id
        veto = self._journal.last_refusal(revoked_key(op_id))
        store = self.trust.current()
        if veto is not None and store is not None and could_sign(store, revokers(veto[1]), op.payload):
            raise Refused(RefusalReason.OP_REVOKED, f"op {op_id} was revoked")

    def check_nonce(self, op: VerifiedOp) -> None:
        """Step 12, read-only: an op revoked, or whose nonce was spent (ran, failed, was cut short), never runs."""
        journal = self._journal
        op_id = op.payload.op_id
        self._check_veto(op)
        try:
            journal.check_key(nonce_key(op))
        except NonceSpentError as exc:  # failed: it ran and failed, or it was refused for the guest's state
            raise Refused(RefusalReason.NONCE_SPENT, f"op {op_id} was already used ({exc.outcome.value}): "
                                                     "sign a new proposal") from exc
        except KeyInFlightError as exc:
            raise Refused(RefusalReason.NONCE_IN_FLIGHT, f"op {op_id} is running now") from exc
        except NoJournalError as exc:  # journal-less: no veto is read, and no journal can say the nonce is unspent
            raise Refused(RefusalReason.JOURNAL_UNAVAILABLE, "the journal is not working") from exc
