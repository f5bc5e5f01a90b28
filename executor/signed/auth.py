"""Who may do what with a signed op, beyond the signature checks of ``safety.signedop``.

``role_covers_keys``: a config op is named after its strictest key, so its role must also name the
kind of every other non-benign key it writes. ``could_sign``: a veto counts only from a key that
could have signed the op it vetoes (docs/SAFETY.md §6.7).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from executor.gate.actions import SET_CONFIG, Step
from safety.classify import Action, Class, GuestFacts, Source, classify
from safety.payload import OpPayload
from safety.refusal import RefusalReason, Refused
from safety.truststore import Role, TrustStore


def could_sign(store: TrustStore, signers: Iterable[str], payload: OpPayload) -> bool:
    """Whether one of ``signers`` holds a role allowing ``payload``'s kind, class, audience and guest."""
    for kid in signers:
        key = store.keys.get(kid)
        for name in key.roles if key is not None else ():
            role = store.roles.get(name)
            if (role is not None and payload.kind in role.kinds and payload.class_ in role.classes
                    and role.allows_audience(payload.audience) and role.allows_vmid(payload.vmid)):
                return True
    return False


def revokers(detail: str) -> list[str]:
    """The key ids a journaled veto names (none for a detail written otherwise)."""
    try:
        found = json.loads(detail).get("by", [])
    except (ValueError, AttributeError):
        return []
    return [str(kid) for kid in found] if isinstance(found, list) else []


def role_covers_keys(role: Role, step: Step, facts: GuestFacts) -> Refused | None:
    """ROLE_DENIES unless ``role`` names the op kind of each non-benign key the step writes or deletes.

    An op's kind is its strictest key's; a role granting ``config.nic_identity`` must not also lower
    ``protection`` or delete ``unused0`` in the same signed write.
    """
    if step.kind != SET_CONFIG:
        return None
    changes = [Action(kind=SET_CONFIG, vmid=step.vmid, guest_type=step.guest_type, set={key: value})
               for key, value in step.set]
    changes += [Action(kind=SET_CONFIG, vmid=step.vmid, guest_type=step.guest_type, delete=(key,))
                for key in step.delete]
    for change in changes:
        verdict = classify(change, facts, Source.OPERATOR_OP)
        if verdict.cls is not Class.BENIGN and verdict.op_kind not in role.kinds:
            key = next(iter(change.set), None) or change.delete[0]
            return Refused(RefusalReason.ROLE_DENIES, f"{key}: {verdict.op_kind} is not among role {role.name}'s kinds")
    return None
