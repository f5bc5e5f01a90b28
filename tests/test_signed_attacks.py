"""Adversarial review of signed operations (issue 10, docs/SAFETY.md §5-§7 and §12): try to break them.

The attacker holds one signing key of a threshold-2 role (or a whole low-privilege role), valid ops for
other actions, the network (replay, delay, redirect), or the planner and hub that shape the pending
descriptors operators sign. Each test drives a real engine, gate, lane, journal and OpDesk against fakepve
over HTTPS (``tests.signed_helpers.open_desk``) and counts what fakepve received.

The ``test_hole_*`` tests, and those under "found in the final review", are holes the reviews found: each
failed when found and passes since its fix. The others are kept as the instructive ones: attacks the
signed path already stopped, and why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from executor.gate.decisions import Refusal
from executor.loop.engine import Engine
from opctl.doc import OpError, Proposal, summary
from opctl.sign import build_payload
from safety.payload import parse_payload
from safety.refusal import Refused
from tests.signed_helpers import (
    AUDIENCE,
    Desk,
    add_vm,
    hold_lane,
    journal_files,
    mutations,
    op_refusal,
    open_desk,
    roles,
    seal,
    spent,
    store_doc,
    unsigned_of,
)
from tests.signing import key_entry, kid, write_store

Make = Callable[..., Engine]
DESTROY = {"purge": False, "destroy_unreferenced_disks": False}
DETACH = {"delete": ["scsi1"]}
GiB = 1 << 30


def _reason(result: tuple[str, Refusal | None]) -> str:
    """A submit's outcome: "accepted", or the refusal's reason."""
    return "accepted" if result[1] is None else result[1].reason


def _restore(desk: Desk, doc: dict[str, Any]) -> None:
    """Root rewrites the node's trust store with ``doc`` and the daemon reloads it (SIGHUP)."""
    assert desk.desk.store is not None
    path = Path(desk.desk.store.path)
    write_store(path.parent, doc, name=path.name)
    desk.desk.reload()
    assert desk.desk.store.current is not None and desk.desk.store.current.version == doc["version"]


def _tick(desk: Desk) -> None:
    """One tick of the daemon (it requeues the ops a lock held back), and its lanes."""
    desk.engine.tick(wait=True)
    desk.settle()


def _role(name: str, kinds: list[str], cls: str, *, vmids: str = "100-199", threshold: int = 1) -> dict[str, Any]:
    """A [[roles]] entry for fakepve's node: ``kinds`` of class ``cls`` only."""
    return {"name": name, "kinds": kinds, "classes": [cls], "audiences": [AUDIENCE], "vmids": [vmids],
            "max_ttl": "1h", "threshold": threshold}


def _volume(fakepve: Any, name: str, vmid: int) -> None:
    """A 4 GiB volume ``name`` owned by ``vmid`` on local-lvm."""
    fakepve.storages["local-lvm"].setdefault("volumes", {})[name] = {
        "content": "images", "format": "raw", "size": 4 * GiB, "vmid": vmid, "ctime": 0}


def _volumes(fakepve: Any) -> set[str]:
    """The volumes on local-lvm."""
    return set(fakepve.storages["local-lvm"].get("volumes", {}))


# --- holes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("revoked", ["key", "op"])
def test_hole_a_trust_store_revocation_stops_an_op_already_accepted(revoked: str, fakepve: Any, make_engine: Make,
                                                                     tmp_path: Path) -> None:
    """Revocation is the brake: a new trust-store version that revokes a signer's key (or lists the op in
    ``[revoked].ops``) must stop every op that key approved, including one already accepted and waiting in the
    executor (here for a backup lock, retried each tick for up to its whole TTL). Today a fresh submit of the
    same envelope is refused, but the waiting copy runs the destroy once the backup ends."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    op_id = parse_payload(envelope.payload).op_id
    fakepve.snapshot_lock(100, "backup")
    assert desk.run(envelope)[1] is None and desk.desk.accepted() == 1  # accepted: waits for the lock
    doc = {**store_doc(), "version": 2,
           "revoked": {"keys": [kid("bob")]} if revoked == "key" else {"ops": [op_id]}}
    _restore(desk, doc)
    assert _reason(desk.submit(envelope)) == ("KEY_REVOKED" if revoked == "key" else "OP_REVOKED")
    fakepve.unlock(100)
    before = len(fakepve.requests)
    _tick(desk)
    assert mutations(fakepve, before) == [] and fakepve.vm(100) is not None
    assert not spent(desk, op_id)


# (guest config, the narrow role, its signers, the op's kind and params, what ``op sign`` titles it)
ROLE_ESCAPES: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[str, ...], str, dict[str, Any], str]] = {
    "nic_role_lowers_protection": (
        {"protection": 1, "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"},
        _role("narrow", ["config.nic_identity"], "APPROVAL"), ("carol",), "config.nic_identity",
        {"set": {"net0": "virtio=BC:24:11:00:00:02,bridge=vmbr0"}, "delete": ["protection"]},
        "CHANGE THE CONFIG (config.nic_identity)"),
    "detach_role_deletes_unused_volume": (
        {"unused0": "local-lvm:vm-100-disk-9"},
        _role("narrow", ["config.disk_detach"], "DESTRUCTIVE", threshold=2), ("carol", "dave"),
        "config.disk_detach", {"delete": ["scsi1", "unused0"]}, "DETACH DISKS"),
}


@pytest.mark.parametrize("case", sorted(ROLE_ESCAPES))
def test_hole_b_a_role_signs_only_the_kinds_it_names(case: str, fakepve: Any, make_engine: Make,
                                                     tmp_path: Path) -> None:
    """A role's ``kinds`` is its scope. A role that may only change NIC identities (APPROVAL, one key) signs a
    config.nic_identity op that also deletes ``protection`` (the guard a destroy needs lowered first); a role
    that may only detach disks (DESTRUCTIVE, two keys) signs a config.disk_detach that also deletes
    ``unused0``, which PVE frees for good. The gate names a config write after its first strictest key (net0
    sorts before protection, scsi1 before unused0), so each op passes as the one kind its role allows, and
    ``op sign`` titles it with that kind's words, the extra key one more item of the list. Expected:
    ROLE_DENIES, nothing sent, protection and the volume kept."""
    config, narrow, signers, kind, params, title = ROLE_ESCAPES[case]
    _volume(fakepve, "vm-100-disk-9", 100)
    add_vm(fakepve, 100, **config)
    desk = open_desk(make_engine, tmp_path)
    _restore(desk, {"version": 2, "roles": [*roles(), narrow],
                    "keys": [*store_doc()["keys"], key_entry("carol", ["narrow"]), key_entry("dave", ["narrow"])]})
    envelope = desk.sign(desk.propose(100, kind, **params), *signers, role="narrow")
    assert summary(parse_payload(envelope.payload), now=0).startswith(title)  # what the signers were shown
    before, volumes = len(fakepve.requests), _volumes(fakepve)
    assert _reason(desk.run(envelope)) == "ROLE_DENIES"
    assert mutations(fakepve, before) == [] and _volumes(fakepve) == volumes
    assert set(params["delete"]) <= set(fakepve.vm(100).config)


# (the role signing, its class, its signers, the op's kind and params)
PARAM_SMUGGLING: dict[str, tuple[dict[str, Any] | None, tuple[str, ...], str, dict[str, Any]]] = {
    "unknown_key_role_detaches_a_disk": (
        _role("narrow", ["config.unknown_key"], "APPROVAL"), ("carol",), "config.unknown_key",
        {"set": {"delete": "scsi1"}}),
    "detach_signed_force_no_sends_force": (
        None, ("alice", "bob"), "config.disk_detach", {"set": {"force": "1"}, "delete": ["scsi1"], "force": False}),
}


@pytest.mark.parametrize("case", sorted(PARAM_SMUGGLING))
def test_hole_g_a_config_key_cannot_be_an_api_parameter(case: str, fakepve: Any, make_engine: Make,
                                                        tmp_path: Path) -> None:
    """The set map of a config op goes to PVE as form parameters, beside ``delete``, ``digest`` and ``force``.
    A ``set`` key named ``delete`` is classed as an unknown key (APPROVAL, one operator key) yet PVE reads it
    as the delete list: a disk detach (DESTRUCTIVE, two keys) at the wrong class. A destroyers' detach signed
    with ``force`` false (``op sign`` ends its line with force=NO) but a ``set`` key ``force`` = 1 makes PVE
    free the volume. Expected: MALFORMED (or refused) and no request carries those parameters."""
    narrow, signers, kind, params = PARAM_SMUGGLING[case]
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    role = "destroyer"
    if narrow is not None:
        _restore(desk, {"version": 2, "roles": [*roles(), narrow],
                        "keys": [*store_doc()["keys"], key_entry("carol", ["narrow"])]})
        role = "narrow"
    before = len(fakepve.requests)
    with pytest.raises((OpError, Refused)):  # the payload cannot even be built: MALFORMED at op sign and the gate
        desk.run(desk.sign(desk.propose(100, kind, **params), *signers, role=role))
    sent = [parse_qs(body.decode()) for method, path, body in fakepve.requests[before:]
            if method == "POST" and path.endswith("/qemu/100/config")]
    assert all("force" not in form for form in sent)
    assert all("scsi1" not in form.get("delete", [""])[0] for form in sent)
    assert "scsi1" in fakepve.vm(100).config


def test_hole_c_losing_the_journal_forgets_no_spent_nonce(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """The nonce is the journal's record, so losing the journal's segments (moved aside after a
    JournalCorruptError, a replaced disk, a restore of the journal alone) must not make a used op usable
    again. ``gate_secret`` sets a clock floor only when it creates the secret; a state_dir that keeps its
    gate.secret but opens an empty journal sets none. A detach whose write failed (nonce spent, config
    unchanged) is then accepted again and sent a second time."""
    add_vm(fakepve, 100)
    state = tmp_path / "state"
    first = open_desk(make_engine, tmp_path, journal_dir=state)
    envelope = first.sign(first.propose(100, "config.disk_detach", **DETACH), "alice", "bob", role="destroyer")
    fakepve.fail("POST", "/nodes/pve1/qemu/100/config", 500, "storage busy", times=1)
    op_id, refusal = first.run(envelope)
    assert refusal is None and spent(first, op_id) and "scsi1" in fakepve.vm(100).config
    assert first.engine.journal is not None
    first.engine.journal.close()  # the daemon stops
    segments = sorted(state.glob("journal-*"))
    assert segments
    for segment in segments:  # the operator moves the damaged journal aside
        segment.rename(tmp_path / segment.name)
    time.sleep(1.05)  # payload times are whole seconds: the new journal begins a second after the signing
    second = open_desk(make_engine, tmp_path, journal_dir=state)
    before = len(fakepve.requests)
    assert _reason(second.run(envelope)) in ("NONCE_SPENT", "EXPIRED")
    assert mutations(fakepve, before) == [] and "scsi1" in fakepve.vm(100).config


def test_hole_d_two_ops_for_one_rollback_run_it_once(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Row 48 for a kind whose effect does not move the digest: a rollback to the snapshot the config was
    taken from rewrites the same config (parent=s1), and a stopped guest stays stopped. The destroyers sign
    the rollback twice (the first answer was lost, say); whoever holds the second envelope can roll the guest
    back again within its hour, losing every disk write since the first. Expected: DIGEST_STALE, once."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    snap = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    assert desk.run(snap)[1] is None and "s1" in fakepve.vm(100).snapshots
    proposal = desk.propose(100, "snapshot.rollback", snapname="s1")
    first, second = (desk.sign(proposal, "alice", "bob", role="destroyer") for _ in range(2))
    assert desk.run(first)[1] is None
    before = len(fakepve.requests)
    assert _reason(desk.run(second)) == "DIGEST_STALE"
    assert mutations(fakepve, before) == []


def test_hole_e_an_approval_op_cannot_reach_another_guests_volume(fakepve: Any, make_engine: Make,
                                                                   tmp_path: Path) -> None:
    """The role's vmids bound what it may touch. The operator role (APPROVAL, one key, vmids 100-199) signs a
    config.disk_attach on guest 100 whose volume is guest 500's disk: PVE attaches it (root's token holds
    VM.Config.Disk on /vms/500), and both guests now write one volume, or 100 reads 500's data. The
    classifier calls any set on an empty disk slot an attach (APPROVAL) without looking at the volume's
    owner. Expected: refused (BINDING_MISMATCH / ROLE_DENIES, or classed DESTRUCTIVE), nothing sent."""
    add_vm(fakepve, 100)
    add_vm(fakepve, 500, disks=1)
    desk = open_desk(make_engine, tmp_path)
    foreign = {"set": {"scsi5": "local-lvm:vm-500-disk-0,size=4G"}}
    with pytest.raises(Refused, match=r"config\.disk_swap"):  # classed DESTRUCTIVE: not an attach
        desk.propose(100, "config.disk_attach", **foreign)
    attach = desk.sign(desk.propose(100, "config.disk_swap", **foreign), "alice", role="operator")
    before = len(fakepve.requests)
    assert _reason(desk.run(attach)) != "accepted"
    assert mutations(fakepve, before) == [] and "scsi5" not in fakepve.vm(100).config


def _carol_and_a_destroy(fakepve: Any, make_engine: Make, tmp_path: Path) -> tuple[Desk, Any, str]:
    """Guests 100 and 150, carol added as an operator, and a destroy of 150 signed by the destroyers."""
    add_vm(fakepve, 100)
    add_vm(fakepve, 150)
    desk = open_desk(make_engine, tmp_path)
    _restore(desk, {"version": 2, "roles": roles(), "keys": [*store_doc()["keys"], key_entry("carol", ["operator"])]})
    destroy = desk.sign(desk.propose(150, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    return desk, destroy, parse_payload(destroy.payload).op_id


def _reuse_op_id(unsigned: Proposal, op_id: str, *signers: str, role: str) -> Any:
    """``unsigned`` signed by ``signers`` as ``op sign`` would, but carrying ``op_id`` (a nonce seen elsewhere)."""
    document = json.loads(build_payload(unsigned, role=role, ttl=900, reason="test", now=time.time()))
    document["op_id"] = op_id
    return seal(json.dumps(document, sort_keys=True, separators=(",", ":")).encode(), *signers)


@pytest.mark.parametrize("veto", ["revoke_op_out_of_scope", "own_op_reusing_the_op_id"])
def test_hole_f_only_a_role_that_could_sign_an_op_can_veto_it(veto: str, fakepve: Any, make_engine: Make,
                                                              tmp_path: Path) -> None:
    """docs/SAFETY.md §6.7: a veto counts only from a key whose role could have signed the op. carol holds only the
    operator role (APPROVAL kinds, one key); two destroyers sign a destroy of guest 150, whose op_id anyone on
    the path sees. carol cancels it either with an op.revoke for guest 100 naming that op_id, or by signing
    a snapshot of guest 100 under the same op_id (the journal key ``op:<op_id>`` does not say which payload
    spent it). Expected: the veto is refused (ROLE_DENIES) or spends only its own nonce; the destroy runs."""
    desk, destroy, target = _carol_and_a_destroy(fakepve, make_engine, tmp_path)
    if veto == "revoke_op_out_of_scope":
        desk.desk.revoke(desk.sign(desk.propose(100, "op.revoke", op_id=target), "carol", role="operator"))
    else:
        snap = unsigned_of(desk.propose(100, "snapshot.create", snapname="s1"))
        assert desk.run(_reuse_op_id(snap, target, "carol", role="operator"))[1] is None
    assert _reason(desk.run(destroy)) == "accepted" and fakepve.vm(150) is None


# --- what the signed path already stops ------------------------------------------------------------------

def test_a_challenge_for_one_action_does_not_carry_to_another(fakepve: Any, make_engine: Make,
                                                              tmp_path: Path) -> None:
    """ProposeOp mints a challenge for whatever anyone asks, so a hub can hold challenges for many actions. One
    minted for a destroy without ``purge`` and reused in a payload that sets ``purge`` (the signers' summary
    shows purge=yes, but the challenge came from an innocuous proposal) is CHALLENGE_INVALID: its MAC covers
    the whole action part. Refused before anything is written, nothing sent."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    proposal = unsigned_of(desk.propose(100, "guest.destroy", **DESTROY))
    action = {**proposal.action, "params": {"purge": True, "destroy_unreferenced_disks": False}}
    envelope = desk.sign(Proposal(action=action, challenge=proposal.challenge), "alice", "bob", role="destroyer")
    files = journal_files(desk.state_dir)
    before = len(fakepve.requests)
    assert _reason(desk.run(envelope)) == "CHALLENGE_INVALID"
    assert journal_files(desk.state_dir) == files and mutations(fakepve, before) == []


def test_revoke_op_stops_an_op_waiting_on_a_lock(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """The contrast to hole A: a signed op.revoke (alice could sign the destroy) marks it revoked in the
    journal, so the destroy waiting for a backup lock is dropped and never sent once the lock goes."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    target = parse_payload(envelope.payload).op_id
    fakepve.snapshot_lock(100, "backup")
    assert desk.run(envelope)[1] is None and desk.desk.accepted() == 1
    veto = desk.sign(desk.propose(100, "op.revoke", op_id=target), "alice", role="operator")
    assert desk.desk.revoke(veto) == (target, None) and desk.desk.accepted() == 0
    fakepve.unlock(100)
    before = len(fakepve.requests)
    _tick(desk)
    assert mutations(fakepve, before) == [] and fakepve.vm(100) is not None


def test_an_op_replayed_after_the_guest_returned_to_its_signed_state_is_nonce_spent(
        fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Digest and run state can come back: a snapshot taken and then deleted leaves the config exactly as it
    was signed. Replaying the snapshot op then matches every binding, and only the spent nonce stops it."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    snap = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    signed_digest = parse_payload(snap.payload).precondition.digest
    assert desk.run(snap)[1] is None
    delete = desk.sign(desk.propose(100, "snapshot.delete", snapname="s1"), "alice", "bob", role="destroyer")
    assert desk.run(delete)[1] is None and fakepve.vm(100).snapshots == {}
    assert desk.propose(100, "snapshot.create", snapname="s1").action.count(signed_digest.encode()) == 1
    before = len(fakepve.requests)
    assert _reason(desk.run(snap)) == "NONCE_SPENT"
    assert mutations(fakepve, before) == [] and fakepve.vm(100).snapshots == {}


def test_an_audience_without_a_cluster_name_is_never_signable_nor_matched(fakepve: Any, make_engine: Make,
                                                                         tmp_path: Path) -> None:
    """Audience confusion: with /cluster/status failing, the executor's audience reads ``pve1@`` (not cached).
    ``op sign`` refuses to sign it (the audience pattern needs a cluster name after ``@``), so no op can be
    bound to "any cluster's pve1". An op signed for pve1@fakecluster and submitted meanwhile is WRONG_AUDIENCE,
    journaled nowhere; once the read works again it is accepted and runs."""
    add_vm(fakepve, 100)
    fakepve.fail("GET", "/cluster/status", 500, "cluster filesystem not ready")
    desk = open_desk(make_engine, tmp_path)
    blind = unsigned_of(desk.propose(100, "snapshot.create", snapname="s1"))
    assert blind.action["audience"] == "pve1@"
    with pytest.raises(OpError, match="audience"):
        build_payload(blind, role="operator", ttl=900, reason="test", now=time.time())
    good = desk.sign(Proposal(action={**blind.action, "audience": AUDIENCE}, challenge=None), "alice",
                     role="operator")
    files = journal_files(desk.state_dir)
    assert _reason(desk.run(good)) == "WRONG_AUDIENCE" and journal_files(desk.state_dir) == files
    del fakepve.failures[("GET", "/cluster/status")]
    assert desk.run(good)[1] is None and "s1" in fakepve.vm(100).snapshots


def test_op_sign_shows_control_and_format_characters_in_values_escaped() -> None:
    """A hub shapes the values operators sign: an ANSI erase-line, a right-to-left override and a zero-width
    space inside a description would let a terminal show other text than is signed. ``op sign`` prints
    each escaped, while the signed bytes keep them."""
    hidden = "ok\x1b[2K\u202eevil\u200b"
    action = {"audience": AUDIENCE, "vmid": 100, "guest_type": "qemu", "kind": "config.nic_identity",
              "params": {"set": {"description": hidden, "net0": "virtio,bridge=vmbr0"}, "delete": []},
              "class": "APPROVAL", "precondition": {"digest": "a" * 40, "run_state": "running"}}
    data = build_payload(Proposal(action=action, challenge=None), role="operator", ttl=900, reason="r", now=1e9)
    shown = summary(parse_payload(data), now=1e9)
    assert "\\u001b[2K\\u202eevil\\u200b" in shown and "\x1b" not in shown and "\u202e" not in shown
    assert json.loads(data)["params"]["set"]["description"] == hidden
    envelope = seal(data, "alice")
    assert envelope.payload == data


# --- found in the final review ---------------------------------------------------------------------------

def test_a_role_removed_while_an_op_waits_drops_the_op_and_the_daemon_goes_on(fakepve: Any, make_engine: Make,
                                                                              tmp_path: Path) -> None:
    """A destroy waits for a backup lock; root then removes the destroyer role from the trust store. The
    next tick does not crash (the daemon's loop would die): the waiting op is refused ROLE_DENIES and
    dropped, its guest planned again, and nothing is sent."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    fakepve.snapshot_lock(100, "backup")
    assert desk.run(envelope)[1] is None and desk.desk.accepted() == 1
    _restore(desk, {"version": 2, "roles": [r for r in roles() if r["name"] != "destroyer"],
                    "keys": [key_entry("alice", ["operator"]), key_entry("bob", [])]})
    fakepve.unlock(100)
    before = len(fakepve.requests)
    _tick(desk)
    assert desk.desk.accepted() == 0 and mutations(fakepve, before) == [] and fakepve.vm(100) is not None


def test_a_void_veto_never_hides_a_real_one(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """carol (operator only) vetoes a destroy's op_id before it is submitted: her veto counts for nothing.
    alice (a destroyer) then vetoes it too: that veto is recorded beside carol's and the destroy is
    OP_REVOKED, never sent."""
    desk, destroy, target = _carol_and_a_destroy(fakepve, make_engine, tmp_path)
    for revoker in ("carol", "alice"):
        veto = desk.sign(desk.propose(150, "op.revoke", op_id=target), revoker, role="operator")
        assert desk.desk.revoke(veto)[1] is None
    before = len(fakepve.requests)
    assert _reason(desk.run(destroy)) == "OP_REVOKED"
    assert mutations(fakepve, before) == [] and fakepve.vm(150) is not None


def test_an_op_reusing_another_ops_id_does_not_block_it(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """carol signs a snapshot of a locked guest under the op_id of a destroy she saw: hers waits for the lock,
    and the destroy (another payload, so another nonce) is still accepted and runs."""
    desk, destroy, target = _carol_and_a_destroy(fakepve, make_engine, tmp_path)
    fakepve.snapshot_lock(100, "backup")
    snap = unsigned_of(desk.propose(100, "snapshot.create", snapname="s1"))
    assert desk.run(_reuse_op_id(snap, target, "carol", role="operator"))[1] is None  # waits for the lock
    assert _reason(desk.run(destroy)) == "accepted" and fakepve.vm(150) is None


def test_propose_checks_params_against_the_kinds_schema(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """ProposeOp refuses malformed params naming the field, before anything else reads them."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    malformed: list[dict[str, object]] = [{"set": [1]}, {"delete": "scsi1"}, {"delete": ["scsi1", 2]}]
    for params in malformed:
        with pytest.raises(Refused) as caught:
            desk.desk.propose(100, "config.disk_detach", params)
        assert caught.value.reason.value == "MALFORMED" and "params" in caught.value.detail


# --- found by the red team of issue 13 -------------------------------------------------------------------

@pytest.mark.parametrize("where", ["admission", "lane"])
def test_hole_h_a_digest_that_comes_back_never_revives_a_stale_op(where: str, fakepve: Any, make_engine: Make,
                                                                  tmp_path: Path) -> None:
    """A digest is content, not a version: it can come back. Two destroyers sign a destroy of guest 150; an
    administrator sets protection=1 (before the submit, or while the op waits in the guest's lane) and the
    destroy is refused as stale. carol, one operator key, then runs config.protection_off, which restores
    the signed digest exactly. Replaying the captured envelope must be NONCE_SPENT, after a restart too:
    the stale refusal spent the op. Nothing is sent for it and guest 150 stays."""
    desk, destroy, op_id = _carol_and_a_destroy(fakepve, make_engine, tmp_path)
    signed = parse_payload(destroy.payload).precondition.digest
    if where == "admission":
        fakepve.vm(150).config["protection"] = 1
        assert _reason(desk.run(destroy)) == "DIGEST_STALE"
    else:
        gate = hold_lane(desk, 150)
        assert desk.submit(destroy)[1] is None  # admitted on the signed digest
        fakepve.vm(150).config["protection"] = 1
        gate.set()
        desk.settle()
        assert desk.engine.journal is not None
        assert op_refusal(desk.engine.journal, op_id) is not None
    assert spent(desk, op_id)
    off = desk.sign(desk.propose(150, "config.protection_off", delete=["protection"]), "carol", role="operator")
    assert desk.run(off)[1] is None and "protection" not in fakepve.vm(150).config
    assert desk.propose(150, "guest.destroy", **DESTROY).action.count(signed.encode()) == 1  # the digest is back
    before = len(fakepve.requests)
    assert _reason(desk.run(destroy)) == "NONCE_SPENT"
    assert desk.engine.journal is not None
    desk.engine.journal.close()  # the daemon restarts on the same state
    again = open_desk(make_engine, tmp_path, journal_dir=desk.state_dir)
    _restore(again, {**store_doc(), "version": 3})  # the state remembers trust version 2 (carol's)
    assert _reason(again.run(destroy)) == "NONCE_SPENT"
    assert mutations(fakepve, before) == [] and fakepve.vm(150) is not None


def test_a_standalone_node_is_its_own_audience() -> None:
    """A node outside a cluster (PVE's /cluster/status names no cluster) is signable as ``pve1``: an audience of
    ``pve1@`` matches the audience pattern never, and such a node could approve nothing. (A read that fails
    still gives the unsignable ``pve1@``: the test above.)"""
    from executor.gate.audience import Audience  # noqa: PLC0415
    from safety import opschema  # noqa: PLC0415
    from tests.pve_memory import MemoryPve  # noqa: PLC0415

    standalone = Audience(MemoryPve(cluster=""))
    assert standalone() == "pve1" and opschema.AUDIENCE.fullmatch(standalone())
    clustered = Audience(MemoryPve())
    assert clustered() == "pve1@fakecluster"
