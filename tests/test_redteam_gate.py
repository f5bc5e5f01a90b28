"""Red team (issue 13, second pass): blast radius, replays and the digest ABA, the API socket.

Each hole found (H-A to H-G) is a test that shows it against a real engine on fakepve (HTTPS), a real
journal and, for the API, the real Unix-socket front, counting what Proxmox received: each failed when
found (as a strict xfail) and passes since its fix. The others are attacks that held, kept because they
show why.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from executor.api.server import start_api
from executor.loop.desired import Declared, FileProvider, provider_source
from executor.loop.engine import Engine
from executor.pve.node import ProxmoxNode
from executor.v1 import executor_pb2 as epb
from executor.v1 import executor_pb2_grpc as epb_grpc
from journal import JournalError
from opctl.api import to_proto
from safety.classify import Source
from safety.signedop import parse_payload
from tests.executor_helpers import HeldReads
from tests.signed_helpers import AUDIENCE, add_vm, mutations, op_refusal, open_desk, roles, spent
from tests.signing import key_entry
from tests.test_api_socket import _sock_dir  # noqa: F401  (the sock_dir fixture)
from tests.test_blast_drain import NODE, instalment, stopped, write_hub
from tests.test_signed_attacks import DESTROY, _reason, _restore
from tests.tmpfs import tiny_filesystem

Make = Callable[..., Engine]


# --- blast radius ---------------------------------------------------------------------------------------------

def test_a_hub_drains_every_running_guest_by_declaring_the_stopped_ones(fakepve: Any, make_engine: Make,
                                                                      tmp_path: Path) -> None:
    """Five running guests, five stopped by their owners (off, or templates). The hub declares all ten, the
    five stopped ones with no run state, and the five running ones stopped. ``managed`` is ten and nothing
    counts as already stopped, so 2 * stops never exceeds it: three windows later the node runs nothing,
    no approval asked."""
    for vmid in range(100, 110):
        fakepve.add_vm(vmid, f"vm{vmid}", status="running" if vmid < 105 else "stopped")
    desired = tmp_path / "desired.yaml"
    write_hub(desired, {**{v: "stopped" for v in range(100, 105)}, **{v: None for v in range(105, 110)}})
    # every tick a new window: only the half rule holds the hub
    engine = make_engine([], stop_window=0.0, provider=FileProvider(desired))
    assert provider_source(engine.provider) is Source.HUB
    refusals: list[Any] = []
    for _ in range(4):
        refusals.extend(engine.tick(wait=True).refusals)
    running = sorted(vm.vmid for vm in fakepve.vms if vm.status == "running")
    assert running, f"the hub stopped every running guest of the node ({stopped(fakepve)}), refusals: {refusals}"



def test_a_shutdown_that_times_out_but_lands_frees_the_hubs_budget(fakepve: Any, make_engine: Make,
                                                                 tmp_path: Path) -> None:
    """force_stop off: PVE's shutdown task gives up at its timeout ("got timeout", the task fails) while the
    guest, which got the ACPI request, finishes powering off a moment later (as real guests do). The ledger
    dropped the stop when the task failed; the hub un-declares the guest and stops two more, five rounds:
    8 of 10 end stopped; with stops that succeed the same hub stops 4
    (test_blast_drain)."""
    for vmid in NODE:
        fakepve.add_vm(vmid, f"vm{vmid}", status="running")
        fakepve.vm(vmid).shutdown_secs = 100  # longer than the shutdown timeout below
    fakepve.time_scale = 0.01
    desired = tmp_path / "desired.yaml"
    write_hub(desired, instalment(0, drop="guest"))
    engine = make_engine([], stop_window=0.0, shutdown_timeout=1, force_stop=False, provider=FileProvider(desired))
    for round_ in range(5):
        write_hub(desired, instalment(round_, drop="guest"))
        before = len(fakepve.requests)
        engine.tick(wait=True)
        for _, path in mutations(fakepve, before):
            if path.endswith("/status/shutdown"):  # the guest got the ACPI request: it completes its shutdown
                fakepve.vm(int(path.split("/")[-3])).status = "stopped"
    assert engine.gate.counters[("stop", "failed")] >= 2  # PVE's task failed each time
    assert stopped(fakepve) == [100, 101, 102, 103], "the hub stopped more than half of the node, no approval"

# --- the API socket ---------------------------------------------------------------------------------------------

def test_one_callers_reconcile_queue_starves_anothers_submit(fakepve: Any, node: ProxmoxNode, make_engine: Make,
                                                              tmp_path: Path, sock_dir: Path) -> None:
    """One connection (well within the front's 32 per uid) opens 20 Reconcile calls at once; each runs a
    whole tick (0.2 s here: a slow Proxmox), one tick at a time. The operator's valid op, sent just after,
    queues behind them in gRPC's pool and misses a 3 s deadline (every queued call is a whole tick of reads)."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path, [Declared(vmid=100, state="stopped")],
                     pve=HeldReads(node, every=lambda: time.sleep(0.2)))
    envelope = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    path = sock_dir / "executor.sock"
    api = start_api(desk.engine, f"unix:{path}", desk=desk.desk)
    calls: list[Any] = []
    try:
        with grpc.insecure_channel(f"unix:{path}") as flooder, grpc.insecure_channel(f"unix:{path}") as channel:
            stub = epb_grpc.ExecutorServiceStub(flooder)
            calls = [stub.Reconcile.future(epb.ReconcileRequest(), timeout=20) for _ in range(20)]
            time.sleep(0.3)
            started = time.monotonic()
            try:
                answer = epb_grpc.ExecutorServiceStub(channel).SubmitOp(epb.SubmitOpRequest(op=to_proto(envelope)),
                                                                       timeout=3)
                decision = answer.decision
            except grpc.RpcError as exc:
                decision = exc.code().name
            waited = time.monotonic() - started
            for call in calls:  # bounded: 20 ticks of 0.2 s; the server stops with none left running
                call.exception(timeout=20)
    finally:
        api.stop(0)
    assert decision == "accepted", f"the operator's op: {decision} after {waited:.1f} s, {desk.engine.ticks} ticks"



def test_propose_reads_any_key_back_by_proposing_its_deletion(fakepve: Any, make_engine: Make, tmp_path: Path,
                                                              sock_dir: Path) -> None:
    """The narrow before-image of item 6, walked around: any caller of the socket proposes (mutates nothing,
    signs nothing) a config.guest_credentials deleting ``ciuser``, ``description`` and ``sshkeys`` and gets
    their values, the very ones the fix meant to keep from it."""
    add_vm(fakepve, 100, description="root password is in the vault, ask carol", ciuser="admin",
           sshkeys="ssh-ed25519%20AAAA")
    desk = open_desk(make_engine, tmp_path)
    path = sock_dir / "executor.sock"
    api = start_api(desk.engine, f"unix:{path}", desk=desk.desk)
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            answer = epb_grpc.ExecutorServiceStub(channel).ProposeOp(epb.ProposeOpRequest(
                vmid=100, kind="config.guest_credentials",
                params_json=json.dumps({"delete": ["ciuser", "description", "sshkeys"]})), timeout=10)
    finally:
        api.stop(0)
    text = answer.SerializeToString()
    read = [secret for secret in (b"vault", b"admin", b"ssh-ed25519") if secret in text]
    assert read == [], f"ProposeOp answered {dict(answer.before)}"


SQUATTER = """
import os, socket, sys, time
private, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.mkdir(private, 0o700)  # before the daemon starts: the daemon's private directory, but nobody's
open(ready, "w").close()
deadline = time.monotonic() + 20
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.02)
os.chmod(private, 0o700)  # the owner of a directory may always chmod it back, whatever root set
backend = os.path.join(private, "grpc.sock")
os.rename(backend, backend + ".real")  # and rename what is in it
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(backend)
os.chmod(backend, 0o777)
listener.listen(4)
listener.settimeout(10)
caught = b""
conn, _ = listener.accept()
conn.settimeout(2)
conn.sendall(bytes.fromhex("000000040000000000" "000000040100000000"))  # HTTP/2: SETTINGS, SETTINGS ACK
try:
    while len(caught) < 1 << 16:
        chunk = conn.recv(4096)
        if not chunk:
            break
        caught += chunk
except OSError:
    pass
print(caught.hex(), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a second uid needs root to drop to")
def test_a_squatted_private_directory_lets_another_user_read_the_calls(fakepve: Any, make_engine: Make,
                                                                       tmp_path: Path, sock_dir: Path) -> None:
    """The socket configured in a shared, sticky directory (like /tmp). nobody creates ``executor.sock.d``
    first; the daemon flocks it, chmods it 0700 and binds gRPC's socket in it, but nobody still owns the
    directory: it renames grpc.sock away and listens in its place. root's SubmitOp through the front is
    relayed to nobody, signed envelope and all."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    sock_dir.chmod(0o1777)
    path = sock_dir / "executor.sock"
    ready, go = sock_dir / "ready", sock_dir / "go"
    child = subprocess.Popen([sys.executable, "-c", SQUATTER, f"{path}.d", str(ready), str(go)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    api = None
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            api = start_api(desk.engine, f"unix:{path}", desk=desk.desk)
        except OSError:
            return  # refused to take a directory it does not own: held
        go.touch()
        time.sleep(0.3)
        with grpc.insecure_channel(f"unix:{path}") as channel, contextlib.suppress(grpc.RpcError):
            epb_grpc.ExecutorServiceStub(channel).SubmitOp(epb.SubmitOpRequest(op=to_proto(envelope)), timeout=3)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        if api is not None:
            api.stop(0)
    caught = bytes.fromhex(out.strip() or "")
    assert envelope.payload[:40] not in caught, f"nobody read the signed op relayed to it ({len(caught)} bytes)"

# --- replays and the digest ABA -----------------------------------------------------------------------------------

def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; the filler file (unlink it to free the disk)."""
    filler = disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as out:
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    return filler


def test_a_stale_refusal_whose_burn_hit_a_full_disk_revives_after_a_restart(fakepve: Any, make_engine: Make,
                                                                            tmp_path: Path) -> None:
    """Item 5 again, with the state disk full at the refusal (the burn is the first write that finds no
    room). The destroy of 150 is refused as stale (protection set); its burn fails. Was (H-C): the gate went
    benign-only in memory and still answered DIGEST_STALE; after the disk was freed and a restart, one
    operator key cleared protection (the signed digest back) and the replayed envelope destroyed guest 150.
    Now: the refusal says JOURNAL_UNAVAILABLE, the gate unlinks its journal's intact mark, and the restart
    sets the clock floor: every op signed before it is refused, the captured destroy with them."""
    add_vm(fakepve, 100)
    add_vm(fakepve, 150)
    with tiny_filesystem(tmp_path, "2m") as disk:
        state = disk / "state"
        desk = open_desk(make_engine, tmp_path, journal_dir=state)
        snap = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
        assert desk.run(snap)[1] is None  # the state has accepted signed ops: a restart sets no clock floor
        destroy = desk.sign(desk.propose(150, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
        journal = desk.engine.journal
        assert journal is not None
        fakepve.vm(150).config["protection"] = 1
        filler = _fill(disk)
        for n in range(5000):  # the segment's last page too: the next record finds no room
            try:
                journal.refuse(vmid=100, kind="vm.start", reason="APPROVAL_REQUIRED", detail="x" * 512,
                               key=f"pad:{n}", op_id=None)
            except JournalError:
                break
        assert _reason(desk.run(destroy)) == "JOURNAL_UNAVAILABLE"
        assert desk.engine.journal is None  # the burn failed: the gate went benign-only
        filler.unlink()
        with contextlib.suppress(Exception):
            journal.close()  # the daemon stops (the gate had dropped its journal)
        time.sleep(1.1)  # the restart comes after the refusal: payload times (and so the floor) are whole seconds
        again = open_desk(make_engine, tmp_path, journal_dir=state)
        off = again.sign(again.propose(150, "config.protection_off", delete=["protection"]), "alice", role="operator")
        assert again.run(off)[1] is None and "protection" not in fakepve.vm(150).config
        before = len(fakepve.requests)
        replayed = _reason(again.run(destroy))
        assert again.engine.journal is not None
        again.engine.journal.close()
    assert replayed == "EXPIRED", f"replayed: {replayed}, sent {mutations(fakepve, before)}"  # signed before the floor
    assert mutations(fakepve, before) == [] and any(vm.vmid == 150 for vm in fakepve.vms)


def test_list_operations_serves_a_cloud_init_password_in_clear(fakepve: Any, make_engine: Make, tmp_path: Path,
                                                               sock_dir: Path) -> None:
    """An operator sets guest 100's cloud-init password with a signed op (PVE itself only ever answers
    stars for it). Any caller of the socket then reads it back from ListOperations' payload_json."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    cloud = {"name": "cloudinit", "kinds": ["config.guest_credentials"], "classes": ["APPROVAL"],
             "audiences": [AUDIENCE], "vmids": ["100-199"], "max_ttl": "4h", "threshold": 1}
    _restore(desk, {"version": 2, "roles": [*roles(), cloud],
                    "keys": [key_entry("alice", ["destroyer", "cloudinit"]), key_entry("bob", ["destroyer"])]})
    secret = "Tr0ub4dor-and-3"
    op = desk.sign(desk.propose(100, "config.guest_credentials", set={"cipassword": secret}), "alice", role="cloudinit")
    assert desk.run(op)[1] is None
    path = sock_dir / "executor.sock"
    api = start_api(desk.engine, f"unix:{path}", desk=desk.desk)
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            answer = epb_grpc.ExecutorServiceStub(channel).ListOperations(epb.ListOperationsRequest(limit=100),
                                                                          timeout=10)
    finally:
        api.stop(0)
    served = [o.payload_json for o in answer.operations if secret in o.payload_json]
    assert served == [], f"ListOperations answered the password: {served[0][:200]}"


# --- what held ------------------------------------------------------------------------------------------------------

def test_two_submits_of_a_stale_op_at_once_burn_it_once_and_it_never_revives(fakepve: Any, make_engine: Make,
                                                                              tmp_path: Path) -> None:
    """Held: the burn race. Eight threads submit the same stale destroy at once (protection set after the
    signing): every answer is a refusal, the journal holds one burn, and after protection is cleared
    (the signed digest back) the replay is NONCE_SPENT. Proxmox received one write: the protection_off."""
    add_vm(fakepve, 100)
    add_vm(fakepve, 150)
    desk = open_desk(make_engine, tmp_path)
    destroy = desk.sign(desk.propose(150, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    op_id = parse_payload(destroy.payload).op_id
    fakepve.vm(150).config["protection"] = 1
    before = len(fakepve.requests)
    barrier = threading.Barrier(8)

    def submit() -> str:
        barrier.wait(5)
        return _reason(desk.submit(destroy))

    with ThreadPoolExecutor(8) as pool:
        answers = sorted(pool.map(lambda _: submit(), range(8)))
    desk.settle()
    assert set(answers) <= {"DIGEST_STALE", "NONCE_SPENT", "NONCE_IN_FLIGHT"} and "DIGEST_STALE" in answers, answers
    assert spent(desk, op_id)
    off = desk.sign(desk.propose(150, "config.protection_off", delete=["protection"]), "alice", role="operator")
    assert desk.run(off)[1] is None
    assert _reason(desk.run(destroy)) == "NONCE_SPENT"
    assert [m for m in mutations(fakepve, before) if m[0] == "DELETE"] == []
    assert any(vm.vmid == 150 for vm in fakepve.vms)


IDLER = """
import os, socket, sys, time
path, stop = sys.argv[1], sys.argv[2]
os.setgroups([]); os.setgid(65534); os.setuid(65534)
held = []
for _ in range(40):  # more than the front's 32 per uid; each sends nothing (slowloris)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    held.append(s)
open_ = set(held)


def drop_closed():
    for s in list(open_):
        s.settimeout(0.01)
        try:
            if s.recv(1) == b"":
                open_.discard(s)
        except (TimeoutError, OSError):
            pass


deadline = time.monotonic() + 5  # the front closes the extras at once; a busy box gets 5 s
while len(open_) > 32 and time.monotonic() < deadline:
    drop_closed()
time.sleep(0.2)  # and keeps the rest: none of them closes later
drop_closed()
print(len(open_), len(held) - len(open_), flush=True)
deadline = time.monotonic() + 20
while not os.path.exists(stop) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a second uid needs root to drop to")
def test_idle_connections_from_one_uid_are_capped_and_another_uid_is_served(fakepve: Any, make_engine: Make,
                                                                            tmp_path: Path, sock_dir: Path) -> None:
    """Held: slowloris on the front. nobody opens 40 connections and sends nothing: the front keeps 32
    (its per-uid cap) and closes the rest at once; root's op, sent while they hang, is accepted and runs."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    path, stop = sock_dir / "executor.sock", sock_dir / "stop"
    api = start_api(desk.engine, f"unix:{path}", desk=desk.desk, socket_group=grp.getgrgid(65534).gr_name)
    child = subprocess.Popen([sys.executable, "-c", IDLER, str(path), str(stop)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        kept, closed = (int(n) for n in child.stdout.readline().split())
        with grpc.insecure_channel(f"unix:{path}") as channel:
            answer = epb_grpc.ExecutorServiceStub(channel).SubmitOp(epb.SubmitOpRequest(op=to_proto(envelope)),
                                                                   timeout=5)
        stop.touch()
        child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        api.stop(0)
    assert (kept, closed) == (32, 8)
    assert answer.decision == "accepted", answer
    desk.settle()
    assert "s1" in fakepve.vm(100).snapshots



def test_an_op_refused_protected_never_runs_whatever_the_flag_does_next(fakepve: Any, make_engine: Make,
                                                                        tmp_path: Path) -> None:
    """Held: PROTECTED does not spend, yet cannot come back with another effect. The destroy is signed while
    protection=1 (the digest includes the flag) and refused PROTECTED. Clearing the flag moves the digest
    (the replay is DIGEST_STALE, and spent); setting it again restores the signed digest, and the flag with
    it: NONCE_SPENT. Proxmox received the two flag writes and no DELETE."""
    add_vm(fakepve, 100)
    add_vm(fakepve, 150, protection=1)
    desk = open_desk(make_engine, tmp_path)
    destroy = desk.sign(desk.propose(150, "guest.destroy", **DESTROY), "alice", "bob", role="destroyer")
    op_id = parse_payload(destroy.payload).op_id
    before = len(fakepve.requests)
    assert _reason(desk.run(destroy)) == "accepted"  # admitted; its lane refuses it
    assert desk.engine.journal is not None
    refused = op_refusal(desk.engine.journal, op_id)
    assert refused is not None and refused[0] == "PROTECTED" and not spent(desk, op_id)
    off = desk.sign(desk.propose(150, "config.protection_off", delete=["protection"]), "alice", role="operator")
    assert desk.run(off)[1] is None
    assert _reason(desk.run(destroy)) == "DIGEST_STALE"
    fakepve.vm(150).config["protection"] = 1  # an administrator sets it again: the signed digest is back
    assert _reason(desk.run(destroy)) == "NONCE_SPENT"
    assert [m for m in mutations(fakepve, before) if m[0] == "DELETE"] == []
    assert any(vm.vmid == 150 for vm in fakepve.vms)


STREAM_HOLDER = """
import os, sys, threading, time
import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
path, stop = sys.argv[1], sys.argv[2]
os.setgroups([]); os.setgid(65534); os.setuid(65534)
stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(f"unix:{path}"))
results = []
def hold():
    def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        deadline = time.monotonic() + 20  # bounded: the test touches ``stop`` long before
        while not os.path.exists(stop) and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        for _ in stub.ServerReflectionInfo(requests(), timeout=25):
            pass
        results.append("held")
    except grpc.RpcError as exc:
        results.append(exc.code().name)
threads = [threading.Thread(target=hold) for _ in range(20)]
for t in threads:
    t.start()
time.sleep(2)
print(results.count("RESOURCE_EXHAUSTED"), flush=True)
for t in threads:
    t.join(30)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a second uid needs root to drop to")
def test_one_member_holding_streams_never_holds_every_worker(fakepve: Any, make_engine: Make, tmp_path: Path,
                                                             sock_dir: Path) -> None:
    """Found by a newcomer following the README: a member of the socket's group opens 20 reflection streams and
    sends nothing more. Was: they held all 4 of the API's workers and root's `pending` and SubmitOp hung. Now a
    caller has at most 4 calls in progress (the rest are refused at once) and the API has 16 workers."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    path, stop = sock_dir / "executor.sock", sock_dir / "stop"
    api = start_api(desk.engine, f"unix:{path}", desk=desk.desk, socket_group=grp.getgrgid(65534).gr_name)
    child = subprocess.Popen([sys.executable, "-c", STREAM_HOLDER, str(path), str(stop)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        refused = int(child.stdout.readline() or -1)
        with grpc.insecure_channel(f"unix:{path}") as channel:
            answer = epb_grpc.ExecutorServiceStub(channel).SubmitOp(epb.SubmitOpRequest(op=to_proto(envelope)),
                                                                   timeout=5)
        stop.touch()
        child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        api.stop(0)
    assert refused == 16
    assert answer.decision == "accepted", answer
