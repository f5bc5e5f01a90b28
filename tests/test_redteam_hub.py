"""Red team on the hub path: a compromised hub (a test-local HubService over real gRPC on loopback) and a
malicious key holder against the executor's hub provider, the desired loader it parses documents with, and
the files it keeps in state_dir (docs/SAFETY.md §6.9, §12.2)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.loop.desired import DesiredStateError, parse
from executor.loop.hub import HubProvider, HubSettings
from executor.loop.hubheld import HELD_FILE, HeldFiles
from executor.metrics import ExecutorMetrics
from executor.signed.trust import TrustKeeper
from hub.v1 import hub_pb2 as pb
from journal import Journal
from planner import server
from safety import desireddoc
from safety.desireddoc import Held
from safety.refusal import RefusalReason, Refused
from tests.executor_helpers import ROOT, cli, unused_port
from tests.pve_memory import MemoryPve
from tests.signing import key_entry, private, write_store
from tests.test_hub_provider import (  # noqa: F401  (fixtures)
    CLUSTER,
    DESIRED,
    Make,
    Served,
    TestHub,
    _served,
    _trust,
    document,
    make_provider,
    metric,
    reports,
    serve,
    sha,
    store_doc,
    wait_for,
)


def signed(version: int, previous: str = "", *, desired: str = DESIRED, created: int | None = None) -> bytes:
    """A document alice signs as publisher, with the ``created`` she chooses."""
    data = desireddoc.build_payload(cluster=CLUSTER, version=version, role="publisher", author="alice@example.org",
                                    message=f"version {version}",
                                    created=int(time.time()) - 60 if created is None else created,
                                    previous_sha256=previous, desired=desired)
    return desireddoc.to_bytes(desireddoc.seal(data, private("alice")))


# --- the desired text: what the signer read is what the executor applies -------------------------------------


@pytest.mark.parametrize("vmid", ["0x64", "0100", "0b1100100", "1:40", "1" * 5000])
def test_a_vmid_python_cannot_read_is_a_mistake_not_a_crash(vmid: str) -> None:
    """YAML 1.1 tags these plain scalars int, and Python's int() refuses them (hex, octal, base 60, over 4300
    digits): the loader must say which line, not raise ValueError (which escaped the hub's verify-parse-NACK)."""
    with pytest.raises(DesiredStateError, match=r"<desired>:2: vmid"):
        parse(f"guests:\n  - vmid: {vmid}\n    state: running\n")


def test_a_document_with_an_unreadable_vmid_is_nacked(served: Served, trust: TrustKeeper, tmp_path: Path,
                                                      providers: list[HubProvider]) -> None:
    """Signed, verified, but its vmid is 0x64: NACKed MALFORMED (before: ValueError, the watch thread crashed and
    reconnected, the hub never heard why, and every reconnect crashed again)."""
    provider = make_provider(providers, served.port, trust, tmp_path / "state")
    v1 = document(1)
    served.hub.push(v1)
    wait_for(lambda: reports(served.hub) == [(1, True, "")], "the ACK of version 1")
    served.hub.push(signed(2, sha(v1), desired="guests:\n  - vmid: 0x64\n    state: stopped\n"))
    wait_for(lambda: reports(served.hub)[-1:] == [(2, False, "MALFORMED")], "the NACK of version 2", timeout=5)
    assert provider.held.version == 1 and [d.state for d in provider.desired()] == ["running"]


@pytest.mark.parametrize("text", [
    "guests:\n  - vmid: 100\n    state: running\nguests:\n  - vmid: 100\n    state: stopped\n",
    "guests:\n  - vmid: 100\n    state: running\n    state: stopped\n",
    "guests:\n  - vmid: 100\n    vmid: 101\n    state: stopped\n",
    "guests:\n  - vmid: 100\n    description: a\n    description: b\n",
    "guests:\n  - vmid: 100\n    config:\n      memory: '4096'\n    config:\n      memory: '512'\n",
])
def test_a_key_given_twice_is_refused_not_last_wins(text: str) -> None:
    """A reviewer (or a co-signer reading a threshold document) sees the first `state: running`; the loader took
    the last. The desired text must read one way only: a repeated key is a mistake naming its line."""
    with pytest.raises(DesiredStateError, match="twice"):
        parse(text)


@pytest.mark.parametrize("text", [
    "guests:\n  - vmid: 100\n    config:\n      protection: !!bool y\n",
    "guests:\n  - vmid: 100\n    state: !!python/object:os.system running\n",
    "guests: !!seq\n  - vmid: 100\n",
    "guests:\n  - vmid: 100\n    description: !!binary aGVsbG8=\n",
])
def test_an_explicit_yaml_tag_is_refused(text: str) -> None:
    """``protection: !!bool y`` reads "true" to a reviewer and YAML, "0" (protection off) to the loader, which
    judged the text and ignored the tag; a !!binary description is its base64. The loader refuses explicit tags,
    naming the line: the text reads one way."""
    with pytest.raises(DesiredStateError, match=r"<desired>:\d+: .*tag"):
        parse(text)


def test_yaml_aliases_cannot_multiply_the_work_of_a_small_document() -> None:
    """An anchored config of N keys aliased by M guests parses as N*M entries: a 4 MiB signed document (the cap)
    expands to ~10^10 and exhausts every executor's memory in the parse, before anything is NACKed or saved, on
    each reconnect. The loader refuses aliases (each guest is written out), naming the line."""
    keys = "".join(f"      net{i}: 'virtio,bridge=vmbr0'\n" for i in range(30))
    guests = "".join(f"  - {{vmid: {100 + i}, config: *big}}\n" for i in range(2000))
    text = f"guests:\n  - vmid: 99999\n    config: &big\n{keys}{guests}"
    assert len(text) < 100_000
    with pytest.raises(DesiredStateError, match=r"<desired>:\d+: .*alias"):
        parse(text)


@pytest.mark.parametrize("brk", ["\u2028", "\u2029", "\r"])
def test_a_line_separator_that_yaml_breaks_at_is_nacked(brk: str, served: Served, trust: TrustKeeper, tmp_path: Path,
                                                        providers: list[HubProvider]) -> None:
    """YAML breaks a line at U+2028 where a terminal or a diff shows none: `vmid: 100  # keep it running<U+2028>
    state: stopped` is a comment to the co-signer who reviewed it and `state: stopped` to the loader. Like the
    bidi overrides the document already refuses, it is MALFORMED (the signer's build refuses it too); so are
    U+2029 and a CR not followed by LF (a line break to YAML, which `cat` overwrites with what follows)."""
    text = f"guests:\n  - vmid: 100  # keep it running{brk}    state: stopped\n"
    assert [g.state for g in parse(text)] == ["stopped"]  # what the loader reads
    with pytest.raises(Refused, match=f"U\\+{ord(brk):04X}"):
        desireddoc.build_payload(cluster=CLUSTER, version=2, role="publisher", author="a", message="m", created=1,
                                 previous_sha256="0" * 64, desired=text)
    provider = make_provider(providers, served.port, trust, tmp_path / "state")
    v1 = document(1)
    served.hub.push(v1)
    wait_for(lambda: reports(served.hub) == [(1, True, "")], "the ACK of version 1")
    fields = {"cluster": CLUSTER, "version": 2, "role": "publisher", "author": "mallory", "message": "keep it",
              "created": int(time.time()) - 60, "previous_sha256": sha(v1), "desired": text}
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    served.hub.push(desireddoc.to_bytes(desireddoc.seal(payload, private("alice"))))
    wait_for(lambda: reports(served.hub)[-1:] == [(2, False, "MALFORMED")], "the NACK of version 2")
    assert provider.held.version == 1 and [g.state for g in provider.desired()] == ["running"]


# --- the age of the held version: a withheld update must be seen ---------------------------------------------


@pytest.mark.parametrize("created", [0, int(time.time()) + 10 * 365 * 86400], ids=["epoch", "in_ten_years"])
def test_the_age_metric_cannot_be_zeroed_by_the_signed_created_time(
        created: int, served: Served, trust: TrustKeeper, tmp_path: Path, providers: list[HubProvider]) -> None:
    """A document whose ``created`` is 0 or ten years ahead made pve_executor_hub_held_age_seconds read 0 forever:
    a hub withholding every later version went unseen. Now a created time ahead of the clock is refused
    NOT_YET_VALID, and one far in the past reads as old (the version held is that old as far as anyone signed)."""
    metrics = ExecutorMetrics()
    provider = make_provider(providers, served.port, trust, tmp_path / "state", metrics=metrics)
    served.hub.push(signed(1, created=created))
    wait_for(lambda: len(served.hub.reports) == 1, "the report of version 1")
    age = metric(metrics, "pve_executor_hub_held_age_seconds")
    if created > time.time():
        assert reports(served.hub) == [(1, False, "NOT_YET_VALID")] and provider.held.version == 0
    else:
        assert reports(served.hub) == [(1, True, "")] and age > 50 * 365 * 86400


# --- the floor on disk -----------------------------------------------------------------------------------------


def test_a_deleted_held_line_does_not_reset_the_floor(served: Served, trust: TrustKeeper, tmp_path: Path,
                                                      providers: list[HubProvider]) -> None:
    """Version 2 taken; hub-held deleted (a clean-up, a partial restore) while hub-document.2 stays: the restart
    took version 0 as its floor and the hub could roll the node back to version 1. The document on disk is the
    floor: version 1 is refused ROLLBACK."""
    state = tmp_path / "state"
    first = make_provider(providers, served.port, trust, state)
    v1 = document(1)
    v2 = document(2, sha(v1), desired=DESIRED.replace("4096", "8192"))
    served.hub.push(v2)
    wait_for(lambda: reports(served.hub) == [(2, True, "")], "the ACK of version 2")
    first.close()
    (state / HELD_FILE).unlink()
    served.hub.docs.clear()
    again = make_provider(providers, served.port, trust, state)
    wait_for(lambda: len(served.hub.watches) == 2, "the restart's Watch")
    served.hub.push(v1)
    wait_for(lambda: any(version == 1 for version, _, _ in reports(served.hub)), "the report of version 1")
    assert again.held.version == 2 and (1, False, "ROLLBACK") in reports(served.hub)
    assert [g.config for g in again.desired()] == [{"memory": "8192"}]


# --- what a signed document may do: the gate's remote rules, whoever signed ---------------------------------


def test_a_signed_document_declaring_data_bearing_changes_gets_none_of_them_run(
        served: Served, trust: TrustKeeper, tmp_path: Path, pve: MemoryPve, make_memory_engine: Make,
        providers: list[HubProvider]) -> None:
    """A document the threshold signed (a malicious key holder) swaps a disk for another guest's volume, adds a
    hookscript (root on the node) and detaches a disk: verified and ACKed, it is Source.HUB, so each of those
    DESTRUCTIVE writes is refused and Proxmox receives no config write at all; the benign memory write of the
    same document runs."""
    web = pve.add_vm(100, "web", status="running", config={"memory": 2048, "scsi0": "local-lvm:vm-100-disk-0,size=8G"})
    db = pve.add_vm(101, "db", status="running", config={"scsi0": "local-lvm:vm-101-disk-0,size=32G"})
    provider = make_provider(providers, served.port, trust, tmp_path / "state")
    engine = make_memory_engine([], provider=provider)
    text = ("guests:\n"
            "  - vmid: 100\n    config:\n      scsi0: 'local-lvm:vm-101-disk-0,size=32G'\n"
            "      hookscript: 'local:snippets/own.sh'\n"
            "  - vmid: 101\n    config:\n      scsi0: ''\n      memory: '1024'\n")
    served.hub.push(signed(1, desired=text))
    wait_for(lambda: reports(served.hub) == [(1, True, "")], "the ACK of version 1")
    before = len(pve.requests)
    summaries = [engine.tick(wait=True) for _ in range(2)]
    assert web.config["scsi0"] == "local-lvm:vm-100-disk-0,size=8G" and "hookscript" not in web.config
    assert db.config["scsi0"] == "local-lvm:vm-101-disk-0,size=32G"
    assert [(r.vmid, r.cls.name, r.reason) for r in summaries[-1].refusals] == [
        (100, "DESTRUCTIVE", RefusalReason.APPROVAL_REQUIRED)]
    sent = [(m, p, body) for m, p, body in pve.requests[before:] if m in ("POST", "PUT", "DELETE")]
    assert [p for _, p, _ in sent] == ["/api2/json/nodes/pve1/qemu/101/config"]  # the memory write only
    assert "delete" not in str(sent[0][2]) and "scsi0" not in str(sent[0][2])


# --- revocation: a store reloaded while a document is taken -------------------------------------------------


class RevokingFiles(HeldFiles):
    """Real held files; the save of a document also reloads the trust store with alice revoked (a SIGHUP landing
    between the provider's verification and its install: the window widened on purpose)."""

    def __init__(self, state_dir: Path, revoke: Callable[[], None]) -> None:
        super().__init__(state_dir)
        object.__setattr__(self, "revoke", revoke)

    def save(self, envelope: bytes, held: Held) -> None:
        """Save, then revoke."""
        super().save(envelope, held)
        self.revoke()  # type: ignore[attr-defined]


def test_a_revocation_loaded_while_a_document_is_taken_is_not_lost(tmp_path: Path, served: Served,
                                                                      providers: list[HubProvider]) -> None:
    """Version 1 verified under a store trusting alice; the store revoking her lands before the provider records
    which store it verified against. It recorded the store in force at install (the revoking one), so the
    re-check never ran and the node kept applying what a revoked key signed. It must serve nothing."""
    state = tmp_path / "state"
    state.mkdir()
    path = write_store(tmp_path, store_doc())
    keeper = TrustKeeper(str(path), str(state))
    revoking = store_doc()
    revoking["version"] = 2
    revoking["revoked"] = {"keys": [revoking["keys"][0]["id"]]}
    revoking["keys"].append(key_entry("bob", ["publisher"]))

    def revoke() -> None:
        write_store(tmp_path, revoking)
        keeper.reload()

    metrics = ExecutorMetrics()
    provider = HubProvider(HubSettings(target=f"127.0.0.1:{served.port}", heartbeat=0.2, backoff_base=0.05,
                                       backoff_cap=0.8),
                           files=RevokingFiles(state, revoke), trust=keeper, audience=lambda: "pve1@cluster-a",
                           metrics=metrics)
    providers.append(provider)
    provider.start()
    served.hub.push(document(1))
    wait_for(lambda: len(served.hub.reports) >= 1, "the report of version 1")
    assert keeper.current() is not None and keeper.current().version == 2  # type: ignore[union-attr]
    assert provider.desired() == []
    assert metric(metrics, "pve_executor_hub_held_document_trusted") == 0


# --- kill -9 at each write step of the held files ------------------------------------------------------------

_SAVE_AND_DIE = """
import os, signal, sys
from pathlib import Path
from typing import Any
from executor.loop import hubheld
from safety.desireddoc import Held
after = int(sys.argv[2])
done = [0]
real = hubheld.write_private
def write(path, data):
    if done[0] == after:
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
    done[0] += 1
    if done[0] == after == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # both files written, the old envelope not yet removed
hubheld.write_private = write
envelope = Path(sys.argv[3]).read_bytes()
hubheld.HeldFiles(Path(sys.argv[1])).save(envelope, Held(version=int(sys.argv[4]), sha256=sys.argv[5]))
"""


@pytest.mark.parametrize("after", [0, 1, 2])
def test_kill_9_at_each_write_step_of_the_held_files_applies_each_version_once(
        after: int, served: Served, trust: TrustKeeper, tmp_path: Path, pve: MemoryPve, make_memory_engine: Make,
        providers: list[HubProvider]) -> None:
    """Version 1 held; a process saving version 2 is SIGKILLed before any write, after the document, and after the
    held line (before the old document is removed). The restart serves version 1 or 2 (never a mix, never 0), the
    hub's version 2 is taken, and Proxmox receives its one memory write once."""
    state = tmp_path / "state"
    vm = pve.add_vm(100, "web", status="running", config={"memory": 4096})
    first = make_provider(providers, served.port, trust, state)
    v1 = document(1)
    v2 = document(2, sha(v1), desired=DESIRED.replace("4096", "8192"))
    served.hub.push(v1)
    wait_for(lambda: reports(served.hub) == [(1, True, "")], "the ACK of version 1")
    first.close()
    (tmp_path / "v2").write_bytes(v2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", _SAVE_AND_DIE, str(state), str(after), str(tmp_path / "v2"), "2",
                            sha(v2)], env=env, capture_output=True, timeout=60, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr
    again = make_provider(providers, served.port, trust, state)
    assert again.held.version == (2 if after == 2 else 1)
    assert [g.config for g in again.desired()] == [{"memory": "8192" if after == 2 else "4096"}]
    served.hub.push(v2)
    wait_for(lambda: again.held.version == 2 and reports(served.hub)[-1:] == [(2, True, "")], "version 2 taken")
    engine = make_memory_engine([], provider=again)
    before = len(pve.requests)
    for _ in range(3):
        engine.tick(wait=True)
    sent = [(m, p, body) for m, p, body in pve.requests[before:] if m in ("POST", "PUT", "DELETE")]
    assert [(p, body.get("memory")) for _, p, body in sent] == [("/api2/json/nodes/pve1/qemu/100/config", "8192")]
    assert str(vm.config["memory"]) == "8192" or vm.pending.get("memory") is not None
    assert {"hub-document.2", "hub-held"} <= {p.name for p in state.glob("hub-*")}  # after=2: .1 until version 3


# --- the hub as an adversary on the wire -------------------------------------------------------------------------


def test_a_document_file_swapped_on_disk_for_an_older_signed_one_is_not_served(
        served: Served, trust: TrustKeeper, tmp_path: Path, providers: list[HubProvider]) -> None:
    """Version 2 held; hub-document.2 replaced by version 1's bytes (validly signed, another sha256). The restart
    serves neither (the line names version 2's sha256), keeps its floor, and takes version 2 again from the hub."""
    state = tmp_path / "state"
    first = make_provider(providers, served.port, trust, state)
    v1 = document(1)
    v2 = document(2, sha(v1), desired=DESIRED.replace("4096", "8192"))
    served.hub.push(v2)
    wait_for(lambda: reports(served.hub) == [(2, True, "")], "the ACK of version 2")
    first.close()
    (state / "hub-document.2").write_bytes(v1)
    served.stop()
    again = make_provider(providers, served.port, trust, state)
    assert again.held.version == 2 and again.desired() == []
    rerun = serve(served.hub, served.port)
    try:
        wait_for(lambda: [g.config for g in again.desired()] == [{"memory": "8192"}], "version 2 taken again")
    finally:
        rerun.stop()
    assert served.hub.since()[-1] == 1 and (state / "hub-document.2").read_bytes() == v2


def test_a_hub_that_only_sends_heartbeats_shows_in_the_age_metric(served: Served, trust: TrustKeeper, tmp_path: Path,
                                                                  providers: list[HubProvider]) -> None:
    """A hub broken into withholds version 2 and keeps the stream alive with heartbeats: connected stays 1, the
    version stays 1, and the age grows with the node's clock (a day on, it reads a day)."""
    clock = [time.time()]
    metrics = ExecutorMetrics()
    provider = HubProvider(HubSettings(target=f"127.0.0.1:{served.port}", heartbeat=0.2, backoff_base=0.05,
                                       backoff_cap=0.8), files=HeldFiles(tmp_path / "state"), trust=trust,
                           audience=lambda: "pve1@cluster-a", metrics=metrics, clock=lambda: clock[0])
    providers.append(provider)
    provider.start()
    served.hub.push(signed(1, created=int(clock[0]) - 60))
    wait_for(lambda: reports(served.hub) == [(1, True, "")], "the ACK of version 1")
    clock[0] += 86400
    time.sleep(0.5)  # heartbeats only
    assert metric(metrics, "pve_executor_hub_connected") == 1
    assert 86400 <= metric(metrics, "pve_executor_hub_held_age_seconds") < 86400 + 300
    assert metric(metrics, "pve_executor_hub_held_version") == 1


def test_an_enormous_message_ends_the_stream_not_the_node(served: Served, trust: TrustKeeper, tmp_path: Path,
                                                          providers: list[HubProvider]) -> None:
    """A hub sends a 16 MiB document event (over the receive cap, so gRPC refuses it before any of it is kept):
    the node keeps version 1, reconnects, and takes version 2 when the hub sends it."""
    provider = make_provider(providers, served.port, trust, tmp_path / "state")
    v1 = document(1)
    served.hub.push(v1)
    wait_for(lambda: reports(served.hub) == [(1, True, "")], "the ACK of version 1")
    watches = len(served.hub.watches)
    with served.hub.cond:
        served.hub.docs.append(pb.Document(cluster=CLUSTER, version=9, envelope=b"x" * (16 << 20)))
        served.hub.cond.notify_all()
    wait_for(lambda: len(served.hub.watches) > watches, "a reconnect")
    assert provider.held.version == 1 and len(provider.desired()) == 1
    served.hub.push(document(2, sha(v1)))
    wait_for(lambda: provider.held.version == 2, "version 2")


def test_two_documents_under_one_version_show_in_each_nodes_held_info(
        served: Served, trust: TrustKeeper, tmp_path: Path, providers: list[HubProvider]) -> None:
    """Two documents signed under one version (a draft, or the loser of a race the signers signed anyway) are both
    valid: a hub broken into sends node A one and node B the other, and each takes its own (a node checks its own
    chain; nodes do not talk to each other, by design: docs/SAFETY.md §6.9). What is guaranteed: neither node takes
    the other's afterwards (FORK), and each exports the pair it holds, so a monitor that is not the hub sees the
    split: pve_executor_hub_held_info{version="2"} carries two sha256s across the cluster. The trust store ends
    it: B's document revoked and A's named as the floor reset, B takes A's."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    seen_a, seen_b = ExecutorMetrics(), ExecutorMetrics()
    a = make_provider(providers, served.port, trust, tmp_path / "a", metrics=seen_a)
    v1 = document(1)
    served.hub.push(v1)
    wait_for(lambda: a.held.version == 1, "A at version 1")
    assert metric(seen_a, "pve_executor_hub_held_info", version="1", sha256=sha(v1)) == 1
    v2a = document(2, sha(v1), desired=DESIRED.replace("4096", "8192"))
    served.hub.push(v2a)
    wait_for(lambda: a.held.version == 2, "A at version 2")
    served.hub.docs[:] = served.hub.docs[:1]
    b = make_provider(providers, served.port, trust, tmp_path / "b", metrics=seen_b)
    wait_for(lambda: b.held.version == 1, "B at version 1")
    v2b = document(2, sha(v1), desired=DESIRED.replace("running", "stopped"))
    served.hub.push(v2b)
    wait_for(lambda: b.held.version == 2, "B at version 2")
    assert a.held != b.held  # the residual risk: the nodes disagree under one version
    assert metric(seen_a, "pve_executor_hub_held_info", version="2", sha256=sha(v2a)) == 1
    assert metric(seen_b, "pve_executor_hub_held_info", version="2", sha256=sha(v2b)) == 1
    assert metric(seen_a, "pve_executor_hub_held_info", version="1", sha256=sha(v1)) == 0  # one series: now's
    before = len(served.hub.reports)
    served.hub.push(v2a)  # and B never takes A's afterwards (A takes it again: unchanged)
    wait_for(lambda: sorted(reports(served.hub)[before:]) == [(2, False, "FORK"), (2, True, "")],
             "B's NACK of A's version 2, and A's ACK")
    assert b.held.sha256 == sha(v2b) and a.held.sha256 == sha(v2a)
    # The monitor saw it; the operators end it: B's document revoked, A's named as the floor to reset to.
    write_store(tmp_path, store_doc() | {"version": 2, "revoked": {"documents": [sha(v2b)]},
                                         "floor_resets": [{"cluster": CLUSTER, "version": 2, "sha256": sha(v2a),
                                                           "replaces": [sha(v2b)]}]})
    trust.reload()
    assert b.desired() == [] and len(a.desired()) == 1
    wait_for(lambda: b.held == a.held and [g.config for g in b.desired()] == [{"memory": "8192"}], "B on A's")
    assert metric(seen_b, "pve_executor_hub_held_info", version="2", sha256=sha(v2a)) == 1


# --- the clock a document is judged by ----------------------------------------------------------------------------


def test_a_clock_set_back_revives_no_expired_key_for_documents(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """The journal has seen a time two years on (the real time: the node's clock was then set back, by hand or by
    a spoofed NTP). alice's key expired a year on. The daemon judged a document's keys by the wall clock alone, so
    her expired key signed what it took; the gate's clock (never before the journal's high-water mark,
    docs/SAFETY.md §6.6) makes it KEY_EXPIRED, as it does for an op."""
    fakepve.add_vm(100, "vm100", status="running", config={"memory": 2048, "cores": 1})
    state = tmp_path / "state"
    later = time.time() + 2 * 365 * 86400
    with Journal.open(state, clock=lambda: later) as journal:
        journal.refuse(vmid=100, kind="start", reason="APPROVAL_REQUIRED")
    doc = store_doc("pve1@fakecluster")
    doc["keys"][0] = key_entry("alice", ["publisher", "operator"],
                               not_after=dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=365))
    store = write_store(tmp_path, doc)
    hub = TestHub()
    running = serve(hub)
    hub.push(desireddoc.to_bytes(desireddoc.seal(desireddoc.build_payload(
        cluster="fakecluster", version=1, role="publisher", author="alice@example.org", message="v1",
        created=int(time.time()), previous_sha256="", desired=DESIRED), private("alice"))))
    command = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path,
                  "run", "--hub", f"127.0.0.1:{running.port}", "--trust-store", str(store), "--state-dir",
                  str(state), "--interval", "0.2", "--hub-heartbeat", "0.2", "--listen", f"127.0.0.1:{unused_port()}")
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(hub.reports) >= 1, "the report of version 1", timeout=30)
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(15)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        running.stop()
    assert reports(hub)[0] == (1, False, "KEY_EXPIRED")
    assert str(fakepve.vm(100).config["memory"]) == "2048"


# --- a floor pushed to the end by one signer ----------------------------------------------------------------------


def revoking_alice(version: int, **extra: Any) -> dict[str, Any]:
    """A store that revokes alice's key and adds bob as publisher, with ``extra`` fields (a floor reset)."""
    doc = store_doc()
    doc["version"] = version
    doc["revoked"] = {"keys": [doc["keys"][0]["id"]]}
    doc["keys"].append(key_entry("bob", ["publisher"]))
    return doc | extra


def reset_to(envelope: bytes, replaced: bytes) -> list[dict[str, Any]]:
    """A [[floor_resets]] naming ``envelope`` as cluster-a's replacement of the floor ``replaced`` pushed nodes to."""
    return [{"cluster": CLUSTER, "version": desireddoc.parse_payload(desireddoc.parse_envelope(envelope).payload)
             .version, "sha256": sha(envelope), "replaces": [sha(replaced)]}]


def test_a_floor_pushed_up_by_a_revoked_key_is_reset_by_the_trust_store(
        served: Served, tmp_path: Path, providers: list[HubProvider]) -> None:
    """alice (a stolen key, threshold 1) signs the last version: refused, VERSION_JUMP (it was taken, and once
    her key was revoked the node refused every later version for good). She signs the highest one step allows:
    taken. The operators revoke her key and name bob's version 2 as the cluster's floor reset in the trust store
    (root's, versioned): the node stops managing from her document, holds (2, sha256) as its floor, durably (a
    restart keeps it), and takes bob's version 2 when the hub sends it; no hand surgery on state_dir."""
    state = tmp_path / "state"
    state.mkdir()
    keeper = TrustKeeper(str(write_store(tmp_path, store_doc())), str(state))
    provider = make_provider(providers, served.port, keeper, state)
    v1 = document(1)
    served.hub.push(v1)
    wait_for(lambda: provider.held.version == 1, "version 1")
    served.hub.push(signed(desireddoc.VERSION_MAX, sha(v1), desired=DESIRED.replace("4096", "512")))
    wait_for(lambda: reports(served.hub)[-1:] == [(desireddoc.VERSION_MAX, False, "VERSION_JUMP")], "the jump NACK")
    high = 1 + desireddoc.MAX_VERSION_JUMP
    alices = signed(high, sha(v1), desired=DESIRED.replace("4096", "512"))
    served.hub.push(alices)
    wait_for(lambda: provider.held.version == high, "the highest version one step allows")
    bobs = document(2, sha(v1), signers=("bob",))
    write_store(tmp_path, revoking_alice(2, floor_resets=reset_to(bobs, alices)))
    keeper.reload()
    assert provider.desired() == []
    assert provider.held == Held(version=2, sha256=sha(bobs))
    assert (state / HELD_FILE).read_text() == f"2 {sha(bobs)}\n" and not list(state.glob("hub-document.*"))
    wait_for(lambda: reports(served.hub)[-1:] == [(high, False, "KEY_REVOKED")], "the NACK of alice's version")
    provider.close()
    again = make_provider(providers, served.port, keeper, state)
    assert again.held == Held(version=2, sha256=sha(bobs)) and again.desired() == []
    served.hub.push(bobs)
    wait_for(lambda: [g.config for g in again.desired()] == [{"memory": "4096"}], "bob's version 2 served")
    # The node serves a version, then ACKs it: the ACK may land a moment after (a NACK of alice's version, which the
    # hub sent first on the new stream, before it).
    wait_for(lambda: reports(served.hub)[-1:] == [(2, True, "")], "the ACK of bob's version 2")
    assert again.held == Held(version=2, sha256=sha(bobs))
    served.hub.push(document(3, sha(bobs), signers=("bob",), desired=DESIRED.replace("4096", "2048")))
    wait_for(lambda: again.held.version == 3, "version 3 links to bob's version 2")


def test_a_hub_alone_cannot_lower_a_floor(served: Served, tmp_path: Path, providers: list[HubProvider]) -> None:
    """The reset is the trust store's, and only for a held document that no longer verifies: a store naming a
    reset while alice's document still verifies changes nothing (bob's version 2 is a ROLLBACK); revoking alice
    without a reset keeps the floor (ROLLBACK); a reset naming another document than the hub sends: FORK."""
    state = tmp_path / "state"
    state.mkdir()
    keeper = TrustKeeper(str(write_store(tmp_path, store_doc())), str(state))
    provider = make_provider(providers, served.port, keeper, state)
    v1 = document(1)
    served.hub.push(v1)
    wait_for(lambda: provider.held.version == 1, "version 1")
    high = 1 + desireddoc.MAX_VERSION_JUMP
    alices = signed(high, sha(v1))
    served.hub.push(alices)
    wait_for(lambda: provider.held.version == high, "alice's high version")
    bobs = document(2, sha(v1), signers=("bob",))
    trusting = store_doc() | {"version": 2, "floor_resets": reset_to(bobs, alices)}
    trusting["keys"].append(key_entry("bob", ["publisher"]))
    write_store(tmp_path, trusting)
    keeper.reload()
    assert len(provider.desired()) == 1 and provider.held.version == high
    served.hub.push(bobs)
    wait_for(lambda: reports(served.hub)[-1:] == [(2, False, "ROLLBACK")], "bob's version 2 refused")
    write_store(tmp_path, revoking_alice(3))
    keeper.reload()
    assert provider.desired() == [] and provider.held.version == high
    wait_for(lambda: served.hub.watches[-1][1].since_version == high - 1, "the watch from before alice's version")
    served.hub.push(bobs)
    wait_for(lambda: reports(served.hub)[-1:] == [(2, False, "ROLLBACK")] and len(served.hub.reports) >= 4,
             "bob's version 2 refused again")
    other = document(2, sha(v1), signers=("bob",), desired=DESIRED.replace("running", "stopped"))
    write_store(tmp_path, revoking_alice(4, floor_resets=reset_to(other, alices)))
    keeper.reload()
    assert provider.desired() == []  # untrusted already: the watch thread judges it again under the new store
    wait_for(lambda: provider.held == Held(version=2, sha256=sha(other)), "the floor reset to the other version 2")
    wait_for(lambda: served.hub.watches[-1][1].since_version == 1, "the watch from before the reset's version")
    served.hub.push(bobs)
    wait_for(lambda: reports(served.hub)[-1:] == [(2, False, "FORK")], "bob's other version 2 refused")
    assert provider.desired() == []


def test_a_trust_store_fixed_after_a_start_without_one_brings_the_held_version_back(
        served: Served, trust: TrustKeeper, tmp_path: Path, providers: list[HubProvider]) -> None:
    """Version 1 held; the daemon restarts while the store file is broken (no store in force: the held document
    is not served, the hub's copy NACKed). The operator fixes the file and reloads: the held version must be
    verified again and served, without waiting for a new version or a hub restart (it stayed unmanaged)."""
    state = tmp_path / "state"
    first = make_provider(providers, served.port, trust, state)
    served.hub.push(document(1))
    wait_for(lambda: reports(served.hub) == [(1, True, "")], "the ACK of version 1")
    first.close()
    store = tmp_path / "trust.toml"
    good = store.read_text()
    store.write_text("version = \n")
    (tmp_path / "fresh").mkdir()
    keeper = TrustKeeper(str(store), str(tmp_path / "fresh"))
    assert keeper.current() is None
    again = make_provider(providers, served.port, keeper, state)
    wait_for(lambda: reports(served.hub)[-1:] == [(1, False, "TRUST_STORE_INVALID")], "the NACK without a store")
    assert again.desired() == []
    store.write_text(good)
    keeper.reload()
    assert keeper.current() is not None
    wait_for(lambda: len(again.desired()) == 1, "version 1 served again", timeout=5)


def test_a_document_revoked_in_the_trust_store_is_refused(served: Served, tmp_path: Path,
                                                          providers: list[HubProvider]) -> None:
    """Version 2 (bad) is revoked by its sha256 in the store; a node at version 1 is sent version 2: refused."""
    state = tmp_path / "state"
    state.mkdir()
    v1 = document(1)
    v2 = document(2, sha(v1), desired=DESIRED.replace("running", "stopped"))
    doc = store_doc()
    doc["revoked"] = {"documents": [sha(v2)]}
    keeper = TrustKeeper(str(write_store(tmp_path, doc)), str(state))
    assert keeper.current() is not None  # the store takes revoked documents
    provider = make_provider(providers, served.port, keeper, state)
    served.hub.push(v1)
    wait_for(lambda: provider.held.version == 1, "version 1")
    served.hub.push(v2)
    wait_for(lambda: len(served.hub.reports) == 2, "the report of version 2")
    assert provider.held.version == 1 and reports(served.hub)[-1] == (2, False, "DOCUMENT_REVOKED")


def test_a_held_document_revoked_later_is_no_longer_managed(served: Served, tmp_path: Path,
                                                           providers: list[HubProvider]) -> None:
    """Version 2 held and served; the store (v2) revokes it by its sha256: the node manages nothing from it (as when
    its signer's key is revoked), NACKs it DOCUMENT_REVOKED, keeps its floor, and takes version 3 (which replaces
    it); a restart under that store does not serve version 2 either."""
    state = tmp_path / "state"
    state.mkdir()
    keeper = TrustKeeper(str(write_store(tmp_path, store_doc())), str(state))
    metrics = ExecutorMetrics()
    provider = make_provider(providers, served.port, keeper, state, metrics=metrics)
    v1 = document(1)
    v2 = document(2, sha(v1), desired=DESIRED.replace("running", "stopped"))
    served.hub.push(v1)
    served.hub.push(v2)
    wait_for(lambda: [g.state for g in provider.desired()] == ["stopped"], "version 2 served")
    revoking = store_doc() | {"version": 2, "revoked": {"documents": [sha(v2)]}}
    write_store(tmp_path, revoking)
    keeper.reload()
    assert provider.desired() == [] and provider.held.version == 2
    assert metric(metrics, "pve_executor_hub_held_document_trusted") == 0
    wait_for(lambda: reports(served.hub)[-1:] == [(2, False, "DOCUMENT_REVOKED")], "the NACK of version 2")
    provider.close()
    again = make_provider(providers, served.port, keeper, state)
    assert again.held.version == 2 and again.desired() == []
    served.hub.push(document(3, sha(v2)))
    wait_for(lambda: [g.state for g in again.desired()] == ["running"], "version 3 served")
