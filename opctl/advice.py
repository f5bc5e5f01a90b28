"""What an operator does about each refusal of a signed op (``op status``, ``pve-hub submit --wait``).

Standard library only: ``pve-hub`` reads it too, and the hub imports no executor code.
"""

from __future__ import annotations

from collections.abc import Mapping

# What an operator does about each refusal: the reason names what happened, this says what next.
ADVICE: Mapping[str, str] = {
    "PROTECTED": "the guest has protection=1: clear it with its own signed config.protection_off op "
                 "(op propose --vmid {vmid} config.protection_off), then propose this op again",
    "LOCKED": "the guest was locked (backup, migration, snapshot): the op waited until it expired; "
              "propose it again once the lock is gone",
    "DIGEST_STALE": "the guest changed since the op was proposed: op propose again and sign the new proposal",
    "BINDING_MISMATCH": "the guest is no longer in the state signed for: op propose again",
    "CLASS_MISMATCH": "the executor now judges the op another class: op propose again and sign what it shows",
    "EXPIRED": "the op's validity ended before it ran: sign a fresh proposal (op propose, op sign)",
    "NOT_YET_VALID": "the signer's clock runs ahead of the executor's: check both clocks, then sign again",
    "THRESHOLD_NOT_MET": "more distinct keys holding the role must sign: op cosign with another key",
    "ROLE_DENIES": "the role signed as does not allow this kind, class, audience or guest: sign as a role "
                   "that does (trust check lists them)",
    "UNKNOWN_KEY": "a signing key is not in the executor's trust store: add it, or sign with a key it holds",
    "KEY_EXPIRED": "a signing key has expired: sign with a valid key",
    "KEY_REVOKED": "a signing key is revoked: sign with another key",
    "SIGNATURE_INVALID": "the envelope was changed after signing: sign the proposal again",
    "WRONG_AUDIENCE": "the op is for another executor: propose it on the node that holds the guest",
    "CHALLENGE_INVALID": "a DESTRUCTIVE op needs a fresh challenge from this executor: op propose again "
                         "(a challenge lives one hour)",
    "NONCE_SPENT": "this signed op was already used: an op runs once; propose and sign a new one",
    "NONCE_IN_FLIGHT": "the same op is running now: wait for it (op status OP_ID --wait)",
    "OP_REVOKED": "a signed op.revoke vetoed it: it never runs",
    "JOURNAL_UNAVAILABLE": "the executor's journal is not working (its log says why): fix the state directory, "
                           "restart it, then submit again",
    "TRUST_STORE_INVALID": "the executor has no valid trust store (its log says why): fix it (trust check FILE)",
    "MALFORMED": "the op's parameters are not valid for this guest: op propose again with valid ones",
    "TTL_TOO_LONG": "sign with a shorter --ttl",
}


def advice(reason: str, vmid: int | None = None) -> str:
    """What to do about a refusal ``reason`` (a RefusalReason name) of an op for guest ``vmid``."""
    text = ADVICE.get(reason, "see the detail; docs/SAFETY.md lists every refusal")
    return text.replace("{vmid}", str(vmid) if vmid else "VMID")
