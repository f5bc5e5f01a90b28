"""Signed operations as steps, and steps as the action part an approval binds (both directions, one place).

A signed op fully describes its action: ``step_from`` turns its kind and params into the step the lane runs
(config kinds run as a config write, the others as their own action-table row), and ``bound_action``
turns a step, with the facts read in the lane, back into the action part the payload must equal.
The comparison itself is ``safety.payload.check_binding``: typed fields, never bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from executor.gate.actions import SET_CONFIG, START, STOP, Step
from journal import BURN_PREFIX
from safety.classify import GuestFacts, Verdict
from safety.opschema import NOT_SHOWN, plain
from safety.payload import action_of, action_part
from safety.signedop import VerifiedOp

POWER = {"start": START, "stop": STOP}
# PVE's protection flag refuses these (docs/SAFETY.md §5.3): checked before the nonce is spent.
PROTECTION_BLOCKS = frozenset({"guest.destroy", "config.disk_detach", "config.unused_delete"})


def nonce_key(op: VerifiedOp) -> str:
    """The journal key a signed op spends: its op_id bound to its payload.

    Binding the payload means a key holder who learns another op's op_id cannot burn that op's nonce
    by signing something else under the same id; the same envelope replayed is the same key (spent).
    """
    return f"{BURN_PREFIX}{op.payload.op_id}:{op.payload_sha256[:32]}"


# Kinds whose effect need not move the config digest or the run state an op binds: a second op for
# the same action (another nonce) would pass the binding, so the action itself is marked when it ran.
ACTION_MARKED = frozenset({"snapshot.rollback"})


def action_key(op: VerifiedOp) -> str:
    """The journal's refusal key marking that this exact action ran (for ACTION_MARKED kinds)."""
    part = json.dumps(action_part(op.payload), sort_keys=True, separators=(",", ":")).encode()
    return f"act:{hashlib.sha256(part).hexdigest()}"


# Refusals of a second submission of an op (a replay), not of the op: kept under their own key, so the op's own
# refusal (what spent it, say) is not overwritten by a replay's and stays what ``op status`` reads.
REPLAYED = frozenset({"NONCE_SPENT", "NONCE_IN_FLIGHT"})


def refused_key(op_id: str, payload_sha256: str, reason: str = "") -> str:
    """The journal's refusal key of one signed op: its op id and payload hash (another op under that id is another
    key), ``...:refused``, or ``...:replayed`` for a replay's refusal (``REPLAYED``)."""
    return f"{BURN_PREFIX}{op_id}:{payload_sha256}:{'replayed' if reason in REPLAYED else 'refused'}"


def refused_op(key: str, op_id: str) -> tuple[str, bool] | None:
    """(payload hash, a replay's) of a refusal key ``refused_key`` made for ``op_id``; None for any other key
    (a journal written before the key named the hash: ``op:<op_id>:refused``, a veto, a guest's refusal)."""
    head = f"{BURN_PREFIX}{op_id}:"
    sha, _, tail = key.removeprefix(head).rpartition(":")
    if not key.startswith(head) or len(sha) != 64 or tail not in ("refused", "replayed"):
        return None
    return sha, tail == "replayed"


def revoked_key(op_id: str) -> str:
    """The journal's refusal key that marks ``op_id`` revoked (a veto outlives restarts)."""
    return f"{BURN_PREFIX}{op_id}:revoked"


def is_config_kind(kind: str) -> bool:
    """``config`` and ``config.*``: a config write with the digest."""
    return kind == "config" or kind.startswith("config.")


def step_from(*, kind: str, vmid: int, guest_type: str, params: Mapping[str, object], digest: str) -> Step:
    """The step for an op kind and its params (config kinds: a config write guarded by ``digest``)."""
    raw = plain(params)
    values: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
    if kind in POWER:
        return Step(vmid=vmid, guest_type=guest_type, kind=POWER[kind])
    if is_config_kind(kind):
        extra: tuple[tuple[str, Any], ...] = (("force", True),) if values.get("force") else ()
        return Step(vmid=vmid, guest_type=guest_type, kind=SET_CONFIG,
                    set=tuple(sorted((str(k), str(v)) for k, v in values.get("set", {}).items())),
                    delete=tuple(sorted(values.get("delete", ()))), digest=digest, params=extra)
    return Step(vmid=vmid, guest_type=guest_type, kind=kind, params=tuple(sorted(values.items())), digest=digest)


def params_of(step: Step, op_kind: str) -> dict[str, object]:
    """A step's parameters in the op schema's shape for ``op_kind``."""
    if step.kind == SET_CONFIG:
        params: dict[str, object] = {"set": dict(step.set), "delete": sorted(step.delete)}
        if op_kind == "config.disk_detach":
            params["force"] = bool(dict(step.params).get("force", False))
        return params
    return dict(step.params)


def bound_action(step: Step, verdict: Verdict, facts: GuestFacts, audience: str,
                 cls_name: str | None = None) -> dict[str, object]:
    """The action part of ``step`` as classified on ``facts``: what a signed op for it must name."""
    return action_of(audience=audience, vmid=step.vmid, guest_type=step.guest_type, kind=verdict.op_kind,
                     params=params_of(step, verdict.op_kind), class_=cls_name or verdict.cls.name,
                     digest=facts.digest, run_state=facts.run_state)


# Keys whose values are credentials or free text: the API never answers them (ProposeOp's before-image,
# ListOperations' payloads), whoever asks; their presence is shown, their value is not.
SECRET_KEYS = frozenset({"cipassword", "sshkeys", "ciuser", "cicustom", "description", "env", "entrypoint"})


def shown(values: Mapping[str, object]) -> dict[str, object]:
    """``values`` with every secret key's value replaced by ``NOT_SHOWN`` (an absent one stays None)."""
    return {key: NOT_SHOWN if key in SECRET_KEYS and value is not None else value for key, value in values.items()}


def proposal_before(config: Mapping[str, str], digest: str, step: Step) -> dict[str, str]:
    """What ProposeOp shows of the guest: the keys the step writes or deletes, the disk its params name,
    and the digest it binds; never the rest, and never a secret key's value (a caller chooses the keys:
    proposing a delete of ``ciuser`` must not read it back)."""
    keys = {k for k, _ in step.set} | set(step.delete)
    disk = dict(step.params).get("disk")
    if isinstance(disk, str):
        keys.add(disk)
    return {**{key: NOT_SHOWN if key in SECRET_KEYS else config[key] for key in sorted(keys) if key in config},
            "digest": digest}


def before_image(config: Mapping[str, str] | None, step: Step) -> dict[str, str | None]:
    """The values the step changes, as they were (None: absent): what an undo writes back."""
    if config is None:
        return {}
    keys = {k for k, _ in step.set} | set(step.delete)
    return {key: config.get(key) for key in sorted(keys)} if keys else dict(config)
