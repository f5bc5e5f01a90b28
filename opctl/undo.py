"""``op undo OP_ID``: the inverse of a signed op that ran, proposed from its journaled before-image.

The gate journals each signed op's begun record with what it wrote and the values before it
(``{"type", "set", "delete", "digest", "params", "before": {key: value or null}, "op": {"id", "kind", ...}}``).
A config write is undone by writing back the before values of every key it set or deleted and deleting
the keys it added (null before); a snapshot it took is deleted. Everything else says why there is no
undo. The inverse is only *proposed* (ProposeOp): it is signed and submitted like any other op, so an
undo passes the gate like anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from executor.v1 import executor_pb2 as pb
from opctl.api import call_propose, print_proposal, stub
from opctl.doc import OpError, visible
from safety.classify import Action, GuestFacts, Source, classify
from safety.opschema import NOT_SHOWN

LIST_LIMIT = 1000

NO_UNDO: Mapping[str, str] = {
    "guest.destroy": "the guest, its volumes and its config are gone: restore it from a backup",
    "guest.template": "a template never becomes a guest again: clone it instead",
    "guest.migrate": "migrate it back with op propose guest.migrate on the target node's executor",
    "config.unused_delete": "the volume was deleted from its storage: restore it from a backup",
    "snapshot.delete": "the recovery point is gone",
    "snapshot.rollback": "the state between the snapshot and the rollback was not kept",
    "disk.resize": "PVE only grows disks: none can be shrunk",
    "disk.move": "move the disk back: op propose disk.move with the old storage",
    "disk.move_delete": "move the disk back: op propose disk.move with the old storage (the source was freed)",
    "disk.reassign": "reassign it back: op propose disk.reassign on the other guest",
    "start": "stop the guest: op propose stop",
    "stop": "start the guest: op propose start",
    "op.revoke": "a revocation is final: the revoked op can never run",
}


def _record(response: pb.ListOperationsResponse, op_id: str) -> tuple[pb.Operation, dict[str, Any]]:
    """The begun record of ``op_id`` and its decoded payload."""
    for operation in response.operations:
        if operation.record != "begun" or not operation.payload_json:
            continue
        try:
            body = json.loads(operation.payload_json)
        except json.JSONDecodeError:
            continue
        signed = body.get("op") if isinstance(body, dict) else None
        named = {signed.get("id"), signed.get("op_id")} if isinstance(signed, dict) else set()
        if op_id in {operation.op_id, operation.op_id.removeprefix("op:"), *named}:
            return operation, body
    raise OpError(f"no begun record of op {op_id} with a payload in the last {LIST_LIMIT} journal records "
                  "(it never ran, or it was compacted away)")


def _changes(body: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """What the op wrote and deleted: the record's own fields, else the signed params."""
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    assert isinstance(params, dict)
    return dict(body.get("set") or params.get("set") or {}), list(body.get("delete") or params.get("delete") or [])


def _config_undo(body: Mapping[str, Any], vmid: int) -> tuple[str, dict[str, object]]:
    before = body.get("before")
    if not isinstance(before, dict):
        raise OpError("the journal holds no before-image for this op: nothing to restore from")
    if isinstance(body.get("params"), dict) and body["params"].get("force") is True:
        raise OpError("the detach ran with force=true, which destroyed the volume: restore it from a backup")
    written, deleted = _changes(body)
    restore = {key: str(before[key]) for key in (*written, *deleted) if before.get(key) is not None}
    hidden = sorted(key for key, value in restore.items() if value == NOT_SHOWN)
    if hidden:
        raise OpError(f"the executor API does not show what {', '.join(hidden)} held before (a credential or free "
                      "text): set it again by hand")
    added = sorted(key for key in written if before.get(key) is None)
    if not restore and not added:
        raise OpError("the op changed no key the before-image records: there is nothing to undo")
    # The executor proposes only the op kind its classifier names (a re-attach is config.disk_attach, ...):
    # classify the inverse on the config as the op left it.
    action = Action(kind="set_config", vmid=vmid, guest_type=str(body.get("type") or "qemu"), set=restore,
                    delete=tuple(added))
    verdict = classify(action, GuestFacts(config=dict(written)), Source.OPERATOR_OP)
    return verdict.op_kind, {"set": restore, "delete": added}


def _snapshot_undo(body: Mapping[str, Any], vmid: int) -> tuple[str, dict[str, object]]:
    params = body.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("snapname"), str):
        raise OpError("the journal does not name the snapshot taken")
    return "snapshot.delete", {"snapname": params["snapname"], "force": False}


def _inverse(kind: str) -> Callable[[Mapping[str, Any], int], tuple[str, dict[str, object]]]:
    if kind in NO_UNDO:
        raise OpError(f"{kind} has no undo: {NO_UNDO[kind]}")
    if kind.startswith("config"):
        return _config_undo
    if kind == "snapshot.create":
        return _snapshot_undo
    raise OpError(f"{kind} has no undo: this tool knows no inverse for it")


def _drift(body: Mapping[str, Any], current: Mapping[str, str]) -> list[str]:
    """Keys changed again since the op ran: the undo would overwrite those later changes too."""
    written, deleted = _changes(body)
    notes = [f"{key} is now {visible(current.get(key, '<unset>'))}, not the op's {visible(str(value))}"
             for key, value in written.items() if current.get(key) != value]
    notes += [f"{key} was deleted by the op and is set again" for key in deleted if key in current]
    return notes


def undo(args: argparse.Namespace) -> int:
    """``op undo``: find the op's begun record, build its inverse, print the executor's proposal for it."""
    with stub(args) as api:
        response = api.ListOperations(pb.ListOperationsRequest(limit=LIST_LIMIT), timeout=args.timeout)
    operation, body = _record(response, args.op_id)
    signed = body.get("op") if isinstance(body.get("op"), dict) else {}
    assert isinstance(signed, dict)
    kind = operation.op_kind or str(signed.get("kind") or body.get("type") or "")
    vmid = operation.vmid or int(signed.get("vmid") or 0)
    if body.get("params") is None and isinstance(signed.get("params"), dict):
        body = {**body, "params": signed["params"]}
    inverse_kind, params = _inverse(kind)(body, vmid)
    document = call_propose(args, vmid, inverse_kind, params)
    print_proposal(document)
    before = document.get("before")
    for note in _drift(body, before if isinstance(before, dict) else {}):
        print(f"warning: since op {args.op_id} ran, {note}: the undo overwrites that", file=sys.stderr)
    return 0
