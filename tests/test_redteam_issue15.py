"""Red team (issue 15): held steps, one op id everywhere, staged config, the config's lock line, trust reloads.

Each test attacks one of the day's changes through real parts (fakepve over HTTPS, the in-process desk with
its real journal and gRPC API). Each pins a defence that holds (or a hole since fixed) and no other test pins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from executor.api.fates import fates, remembered
from executor.api.server import start_api
from executor.gate.audience import Audience
from executor.gate.journalport import journal_port
from executor.gate.steps import refused_key
from executor.loop.desired import Declared, StaticProvider
from executor.pve.node import ProxmoxNode
from executor.signed.trust import TrustKeeper
from executor.v1 import executor_pb2 as epb
from executor.v1 import executor_pb2_grpc as epb_grpc
from journal import Begun, Journal, Outcome, RefusalRecord
from opctl.doc import Proposal
from planner import server
from safety import truststore
from safety.classify import Source
from safety.payload import parse_payload, to_json
from safety.signedop import Envelope
from tests.answer_faults import AnswerFaults
from tests.executor_helpers import ROOT, cli
from tests.signed_helpers import (
    AUDIENCE,
    Desk,
    add_vm,
    done,
    open_desk,
    operator,
    roles,
    seal,
    store_doc,
    unsigned_of,
)
from tests.signing import default_roles, key_entry, kid, write_store


def _with_op_id(envelope: Envelope, op_id: str, *signers: str) -> Envelope:
    """The same signed action under a chosen op id: what a signer who learned another op's id can sign."""
    payload = dataclasses.replace(parse_payload(envelope.payload), op_id=op_id)
    return seal(to_json(payload), *signers)


def _status(port: int, op_id: str) -> list[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return list(epb_grpc.ExecutorServiceStub(channel).GetOpStatus(epb.GetOpStatusRequest(op_id=op_id),
                                                                      timeout=10).ops)


# --- 2. one op id everywhere ------------------------------------------------------------------------------------

def _waiting_detach(desk: Desk, fakepve: Any, vmid: int) -> str:
    """A destroyer-signed detach of guest ``vmid``'s scsi1, accepted and held back by a backup lock."""
    proposal = unsigned_of(desk.propose(vmid, "config.disk_detach", set={}, delete=["scsi1"], force=False))
    fakepve.vm(vmid).lock = "backup"
    op_id, refusal = desk.run(desk.sign(proposal, "alice", "bob", role="destroyer"))
    assert refusal is None, refusal
    return op_id


def test_a_second_op_under_a_waiting_ops_id_makes_op_status_report_the_waiting_op_as_ran(
        make_engine: Any, fakepve: Any, tmp_path: Path) -> None:
    """A DESTRUCTIVE detach of guest 107 waits for a backup lock. A key holder with only the operator role,
    who learned its op id (ListOperations, a log line, the co-signing round), signs a snapshot of guest 108
    under that same id. Its nonce key differs (the payload is bound in), so it is accepted and runs (which
    is by design: reusing an id must not block the op it names). ``op status <id>`` once answered RAN ok for
    108's snapshot alone, the detach (still waiting, due to run when the backup ends) nowhere: an operator
    waiting on it was told it was over. Each op is now told apart by its payload sha256: both are answered,
    and the command exits 3 (one still waits) unless ``--sha256`` picks the snapshot (exit 0)."""
    add_vm(fakepve, 107)
    add_vm(fakepve, 108)
    desk = open_desk(make_engine, tmp_path)
    api = start_api(desk.engine, "127.0.0.1:0", desk=desk.desk)
    try:
        victim = _waiting_detach(desk, fakepve, 107)
        snapshot = desk.sign(unsigned_of(desk.propose(108, "snapshot.create", snapname="s1")), "alice",
                             role="operator")
        assert desk.run(_with_op_id(snapshot, victim, "alice"))[1] is None and "s1" in fakepve.vm(108).snapshots
        answer = [(s.vmid, s.op_kind, epb.OpFate.Name(s.fate)) for s in _status(api.port, victim)]
        assert (107, "config.disk_detach", "OP_FATE_WAITING") in answer, answer
        shas = {s.vmid: s.payload_sha256 for s in _status(api.port, victim)}
        assert shas[108] == hashlib.sha256(_with_op_id(snapshot, victim, "alice").payload).hexdigest(), shas
        both, mine = done(operator("op", "status", victim, cwd=tmp_path, api=api.port),
                          operator("op", "status", victim, "--sha256", shas[108][:12], cwd=tmp_path, api=api.port))
        assert both.returncode == 3 and f"payload sha256 {shas[107]}" in both.stdout, both
        assert "config.disk_detach on guest 107): WAITING" in both.stdout, both.stdout
        assert mine.returncode == 0 and "RAN ok" in mine.stdout and "guest 107" not in mine.stdout, mine
    finally:
        api.stop(0)


def test_two_ops_under_one_id_in_two_lanes_each_journal_their_own_before_image(
        make_engine: Any, fakepve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lane reads an op's before-image (what an undo writes back) when it authorizes the op and journals it
    with the op's begin. Kept by op id, a detach of guest 107 and a snapshot of guest 108 signed under the same
    id, authorized in their two lanes before either began (the window held open on purpose), took one
    another's image or none: the detach journaled 108's whole config, or nothing to undo with. Kept by nonce
    key, each journals its own."""
    add_vm(fakepve, 107)
    add_vm(fakepve, 108)
    desk = open_desk(make_engine, tmp_path)
    scsi1 = str(fakepve.vm(107).config["scsi1"])
    detach = desk.sign(unsigned_of(desk.propose(107, "config.disk_detach", set={}, delete=["scsi1"], force=False)),
                       "alice", "bob", role="destroyer")
    op_id = parse_payload(detach.payload).op_id
    snapshot = _with_op_id(desk.sign(unsigned_of(desk.propose(108, "snapshot.create", snapname="s1")), "alice",
                                     role="operator"), op_id, "alice")
    both_authorized = threading.Barrier(2)
    standing = desk.engine.gate.standing  # its lane clears what stood for a step right after authorizing it
    clear = standing.clear

    def begin_once_both_are_authorized(vmid: int, kinds: Any) -> None:
        if vmid in (107, 108):
            both_authorized.wait(10)
            if vmid == 108:  # then one after the other: the journal refuses an id in flight twice
                wait_for(lambda: [] if desk.engine.gate.records.in_flight() or "scsi1" in fakepve.vm(107).config
                         else [True])
        clear(vmid, kinds)

    monkeypatch.setattr(standing, "clear", begin_once_both_are_authorized)
    assert desk.submit(detach)[1] is None and desk.submit(snapshot)[1] is None
    desk.settle()
    assert not both_authorized.broken and "scsi1" not in fakepve.vm(107).config and "s1" in fakepve.vm(108).snapshots
    assert desk.engine.gate.journal_port.working
    before = {r.vmid: r.payload["before"] for r in desk.records() if isinstance(r, Begun) and "op" in r.payload}
    assert before[107] == {"scsi1": scsi1}, before
    assert before[108] and "scsi1" in before[108] and before[108] != before[107], before


def test_an_op_run_under_the_id_of_an_op_that_already_ran_takes_over_its_op_status(
        make_engine: Any, fakepve: Any, tmp_path: Path) -> None:
    """The detach of guest 107 ran. A key holder signs a snapshot of 108 under the detach's op id: accepted
    and run (another nonce key). ``op status <id>`` once answered only 108's snapshot: the destructive op that
    ran under that id was gone from the answer of the command an operator audits it with. Both are answered."""
    add_vm(fakepve, 107)
    add_vm(fakepve, 108)
    desk = open_desk(make_engine, tmp_path)
    api = start_api(desk.engine, "127.0.0.1:0", desk=desk.desk)
    try:
        proposal = unsigned_of(desk.propose(107, "config.disk_detach", set={}, delete=["scsi1"], force=False))
        victim, refusal = desk.run(desk.sign(proposal, "alice", "bob", role="destroyer"))
        assert refusal is None and "scsi1" not in fakepve.vm(107).config
        snapshot = desk.sign(unsigned_of(desk.propose(108, "snapshot.create", snapname="s1")), "alice",
                             role="operator")
        desk.run(_with_op_id(snapshot, victim, "alice"))
        answer = [(s.vmid, s.op_kind, epb.OpFate.Name(s.fate)) for s in _status(api.port, victim)]
        assert (107, "config.disk_detach", "OP_FATE_RAN") in answer, answer
    finally:
        api.stop(0)


# --- 6. the standalone audience ---------------------------------------------------------------------------------

@pytest.mark.parametrize("answer", [None, [{"type": "node", "name": "pve1", "local": 1}, "cluster fakecluster"]],
                         ids=["null", "cluster-entry-dropped"])
def test_a_cluster_status_answer_with_no_readable_cluster_entry_does_not_make_a_cluster_node_standalone(
        make_engine: Any, fakepve: Any, tmp_path: Path, answer: Any) -> None:
    """A node of cluster fakecluster whose /cluster/status answers ``null`` (pmxcfs not ready) or lists the
    cluster entry in a form that does not parse (dropped). The audience is read once and cached: taken as
    "outside a cluster" it would be ``pve1`` for the daemon's life, the audience of a *standalone* node named
    pve1 (ops signed for that other machine pass the audience check here), while every op signed for
    pve1@fakecluster is WRONG_AUDIENCE until a restart. A partial answer proves nothing: like a failed read,
    it gives the unsignable ``pve1@``, uncached, and once the answer is whole the op for pve1@fakecluster runs."""
    add_vm(fakepve, 100)
    faults = AnswerFaults(fakepve)
    faults.rewrite("GET", "/cluster/status", lambda _data: answer)
    desk = open_desk(make_engine, tmp_path)
    blind = unsigned_of(desk.propose(100, "snapshot.create", snapname="s1"))
    assert blind.action["audience"] == "pve1@", blind.action["audience"]
    faults.stop_rewriting()
    good = desk.sign(Proposal(action={**blind.action, "audience": AUDIENCE}, challenge=None), "alice",
                     role="operator")
    assert desk.run(good)[1] is None and "s1" in fakepve.vm(100).snapshots


# --- 5. a SIGHUP's reload racing a tick's ------------------------------------------------------------------------

def test_a_stale_reload_racing_a_newer_one_never_rolls_the_store_back(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The SIGHUP thread and the tick both reload. One reload reads v1 (the file as it was), then stalls; the
    admin installs v2, which revokes bob's key, and the other reload takes v2. Were the two not serialized,
    the stale one would finish last and put v1 back in force (bob trusted again) and write v1 as the floor.
    The keeper's lock makes the second wait: v2 stays in force and is the floor (window widened on purpose)."""
    def doc(version: int, revoked: list[str]) -> dict[str, Any]:
        return {"version": version, "roles": default_roles(),
                "keys": [key_entry("alice", ["destroyer", "operator"]), key_entry("bob", ["destroyer"])],
                **({"revoked": {"keys": revoked}} if revoked else {})}

    state = tmp_path / "state"
    state.mkdir()
    path = write_store(tmp_path, doc(1, []))
    keeper = TrustKeeper(str(path), str(state))
    real_load, stale_read, newer_done = truststore.load, threading.Event(), threading.Event()

    def stalling_load(*args: Any, **kwargs: Any) -> Any:
        loaded = real_load(*args, **kwargs)
        if threading.current_thread().name == "stale":
            stale_read.set()
            newer_done.wait(1.5)  # with the lock the newer reload waits for this one: the wait times out
        return loaded

    monkeypatch.setattr(truststore, "load", stalling_load)
    stale = threading.Thread(target=keeper.reload, name="stale")
    stale.start()
    assert stale_read.wait(10)
    write_store(tmp_path, doc(2, [kid("bob")]))
    def reload_newer() -> None:
        keeper.reload()
        newer_done.set()

    newer = threading.Thread(target=reload_newer, name="newer")
    newer.start()
    for thread in (stale, newer):
        thread.join(10)
    current = keeper.current()
    assert current is not None and (current.version, kid("bob") in current.revoked_keys) == (2, True)
    assert truststore.read_floor(state)[0] == 2


def test_whoami_names_a_standalone_nodes_audience_as_the_daemon_does(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, node: ProxmoxNode, tmp_path: Path) -> None:
    """A node outside a cluster: /cluster/status lists the node and no cluster. The daemon's audience is then
    ``pve1`` (``executor.gate.audience``); whoami, the command an operator asks which audience to sign for,
    must say the same, and match the roles naming it, not print ``pve1@`` and report that no role names it."""
    AnswerFaults(fakepve).rewrite("GET", "/cluster/status",
                                  lambda _data: [{"type": "node", "name": "pve1", "local": 1, "online": 1}])
    assert Audience(node)() == "pve1"
    write_store(tmp_path, {**store_doc(), "roles": roles("pve1")}, name="trust.toml")
    shown = subprocess.run(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}",
                               tmp_path, "whoami", "--trust-store", str(tmp_path / "trust.toml"), "--state-dir",
                               str(tmp_path / "state")), cwd=ROOT, capture_output=True, text=True, timeout=60,
                           check=False)
    assert "executor_id  pve1 " in shown.stdout, shown.stdout
    assert shown.returncode == 0 and "role operator: APPROVAL" in shown.stdout, shown.stdout + shown.stderr


def test_a_hubs_churn_pushes_an_op_that_just_ran_out_of_op_status(make_engine: Any, fakepve: Any,
                                                                 tmp_path: Path) -> None:
    """A destroyer-signed detach of guest 107 ran. A hub then churns the descriptions of 40 guests for a few
    ticks (benign writes: three journal records each). ``op status <id>`` once answered NOT_FOUND "no trace on
    this executor ... older than the journal keeps" minutes later, while the journal still held the op's spent
    nonce and its outcome: a remote desired-state source made the audit command deny an op that ran. It now
    reads the journal's memory of that op id (its nonce and outcome, by an index) past the recent window."""
    guests = list(range(120, 160))
    for vmid in (107, *guests):
        add_vm(fakepve, vmid)
    provider = StaticProvider([], source=Source.HUB)
    desk = open_desk(make_engine, tmp_path, provider=provider)
    api = start_api(desk.engine, "127.0.0.1:0", desk=desk.desk)
    try:
        proposal = unsigned_of(desk.propose(107, "config.disk_detach", set={}, delete=["scsi1"], force=False))
        op_id, refusal = desk.run(desk.sign(proposal, "alice", "bob", role="destroyer"))
        assert refusal is None and [epb.OpFate.Name(s.fate) for s in _status(api.port, op_id)] == ["OP_FATE_RAN"]
        for turn in range(9):
            provider.guests = [Declared(vmid=v, description=f"churn {turn}") for v in guests]
            desk.engine.tick(wait=True)
        assert len(desk.records()) >= 1000
        try:
            answer = [epb.OpFate.Name(s.fate) for s in _status(api.port, op_id)]
        except grpc.RpcError as exc:
            answer = [f"{exc.code().name}: {exc.details()}"]
        assert answer == ["OP_FATE_RAN"], answer
    finally:
        api.stop(0)


def test_past_the_window_op_status_tells_a_run_from_a_burned_nonce_and_answers_each_op_under_the_id(
        tmp_path: Path) -> None:
    """The journal's memory of one op id, with no recent record of it (a real journal; records as the lane and
    the desk write them): three ops under one id. One ran (its nonce spent by its begin, ended ok), one was
    refused DIGEST_STALE (its nonce burned with no operation: FAILED, like a run that failed, told apart by
    the refusal journaled with it), one is in flight. Each is answered with its fate and payload hash."""
    op_id, (ran, burned, running) = "c" * 32, (hashlib.sha256(bytes([n])).hexdigest() for n in range(3))
    with Journal.open(tmp_path / "journal") as journal:
        def begin(sha: str) -> str:
            return journal.begin(vmid=107, kind="set_config", key=f"op:{op_id}:{sha[:32]}", op_id=op_id,
                                 payload={"op": {"id": op_id, "sha256": sha, "kind": "config.disk_detach"}})
        journal.refuse(vmid=107, kind="config.disk_detach", reason="LOCKED", detail="backup", op_id=op_id,
                       key=refused_key(op_id, ran, "LOCKED"))
        journal.end(begin(ran), Outcome.OK)
        journal.burn(f"op:{op_id}:{burned[:32]}", op_id=op_id, why="DIGEST_STALE: moved")
        journal.refuse(vmid=108, kind="guest.destroy", reason="DIGEST_STALE", detail="moved", op_id=op_id,
                       key=refused_key(op_id, burned, "DIGEST_STALE"))
        begin(running)
        reads = journal_port(journal)
        answer = {(s.payload_sha256, s.vmid, epb.OpFate.Name(s.fate), s.outcome or epb.RefusalReason.Name(s.reason))
                  for s in fates([], [], {}, remembered(op_id, reads))}
    assert answer == {(ran, 107, "OP_FATE_RAN", "ok"), (burned, 108, "OP_FATE_REFUSED", "REFUSAL_REASON_DIGEST_STALE"),
                      (running, 107, "OP_FATE_RUNNING", "REFUSAL_REASON_UNSPECIFIED")}, answer


def test_an_op_under_the_journal_id_of_a_benign_action_in_flight_is_in_flight_and_the_journal_stays(
        make_engine: Any, fakepve: Any, tmp_path: Path) -> None:
    """A benign stop of guest 107 runs (a slow shutdown): its journal id, random, 32 hex like an op id, is in
    ListOperations. A key holder signs a snapshot of guest 108 under that id. The journal refuses a second
    begin under an id in flight: refused NONCE_IN_FLIGHT, nothing sent for it, and the journal still works
    (that refusal once surfaced as a JournalError, which switches the journal off: every signed op
    JOURNAL_UNAVAILABLE). The stop ends ok under its own id; the same action under a fresh id then runs."""
    add_vm(fakepve, 107, status="running")
    add_vm(fakepve, 108)
    fakepve.time_scale = 1.0
    fakepve.vm(107).shutdown_secs = 2  # a task of 2 s: the stop is journaled in flight meanwhile
    desk = open_desk(make_engine, tmp_path, provider=StaticProvider([Declared(vmid=107, state="stopped")]))
    desk.engine.tick(wait=False)
    (flight,) = wait_for(desk.engine.gate.records.in_flight)
    snapshot = desk.sign(unsigned_of(desk.propose(108, "snapshot.create", snapname="s1")), "alice", role="operator")
    op_id, refusal = desk.submit(_with_op_id(snapshot, flight.op_id, "alice"))
    desk.settle()
    assert (op_id, refusal.reason if refusal is not None else _lane_reason(desk, op_id)) == (
        flight.op_id, "NONCE_IN_FLIGHT")
    assert "s1" not in fakepve.vm(108).snapshots and desk.engine.gate.journal_port.working
    assert fakepve.vm(107).status == "stopped" and not desk.engine.gate.records.in_flight()
    assert desk.run(snapshot)[1] is None and "s1" in fakepve.vm(108).snapshots


def _lane_reason(desk: Desk, op_id: str) -> str:
    """The reason the lane journaled for ``op_id`` last ("" for none)."""
    found = [r for r in desk.records() if isinstance(r, RefusalRecord) and r.op_id == op_id]
    return found[-1].reason if found else ""


def wait_for(probe: Callable[[], list[Any]], timeout: float = 10.0) -> list[Any]:
    """``probe()`` once it is not empty."""
    deadline = time.monotonic() + timeout
    while not (found := probe()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found
