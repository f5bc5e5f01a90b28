"""An executor over fakepve reports its state to a real hub after each tick (real gRPC, the daemon's own wiring):
a drifted guest with its key and both values, an approval waiting with its descriptor; deltas after the first
report; a hub that is gone never slows a tick, and gets a full report when it is back; a node that stops reporting
is stale within two of its intervals; `pve-hub status` says so, with its exit code."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.grpcserver import OWN_SUBCHANNELS
from executor.app.report import ReporterSettings, StateReporter, op_reports
from executor.app.wiring import Parts, state_reporter
from executor.loop.desired import Declared
from executor.loop.engine import Engine, TickSummary
from executor.loop.fleet import TickView
from executor.loop.hub import HubProvider, HubSettings
from executor.loop.hubheld import HeldFiles
from executor.metrics import ExecutorMetrics
from executor.pve.node import Connection, ProxmoxNode
from executor.signed.trust import TrustKeeper
from executor.v1 import executor_pb2 as epb
from hub.store import SqliteStore
from hub.v1 import hub_pb2 as pb
from safety.classify import Source
from tests.hub_helpers import running_hub
from tests.signing import write_store
from tests.test_hub_cluster import CLUSTER, store_doc
from tests.test_hub_provider import document, wait_for
from tests.test_hub_service import pve_hub

Make = Callable[..., Engine]
NODE = f"pve1@{CLUSTER}"
DESIRED = """guests:
  - vmid: 100
    state: stopped
    config:
      memory: 2048
  - vmid: 101
    state: stopped
    config:
      memory: 1024
      protection: 0
"""


@pytest.fixture(name="reporters")
def _reporters() -> Iterator[list[StateReporter]]:
    made: list[StateReporter] = []
    yield made
    for reporter in made:
        reporter.close()


def guests(stub: Any) -> dict[int, pb.GuestState]:
    """The node's guests at the hub ({} before its first report)."""
    try:
        return {g.vmid: g for g in stub.GetNode(pb.GetNodeRequest(cluster=CLUSTER, node=NODE), timeout=10).guests}
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return {}
        raise


def test_a_node_reports_drift_and_an_approval_then_deltas(fakepve: Any, make_engine: Make, tmp_path: Path,
                                                           connect: Callable[..., Connection],
                                                           reporters: list[StateReporter]) -> None:
    """After a tick the hub holds: 100 drifted (memory declared 2048, actual 1024), 101 waiting for approval with the
    gate's own descriptor; `pve-hub status` exits 4 and `--node` names the key and both values. The next tick
    converged 100: the report is a delta carrying 100 alone."""
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 1024})
    fakepve.add_vm(101, "<script>alert(1)</script>", status="stopped", config={"memory": 512, "protection": 1})
    state = tmp_path / "node"
    state.mkdir()
    with running_hub(SqliteStore.in_dir(tmp_path / "hub"), heartbeat=0.1) as hub:
        provider = HubProvider(HubSettings(target=hub.address, heartbeat=0.2, backoff_base=0.05, backoff_cap=0.8),
                               files=HeldFiles(state), trust=TrustKeeper(str(write_store(tmp_path, store_doc())),
                                                                         str(state)),
                               audience=lambda: NODE, metrics=ExecutorMetrics())
        provider.start()
        try:
            parts: list[Parts] = []
            engine = make_engine([], pve=ProxmoxNode(connect(node="pve1")), provider=provider, parts=parts)
            reporter = state_reporter(parts[0], provider, interval=30.0)
            reporters.append(reporter)
            reporter.start()
            hub.stub.Apply(pb.ApplyRequest(cluster=CLUSTER, expected_version=0,
                                           envelope=document(1, desired=DESIRED, cluster=CLUSTER)), timeout=10)
            wait_for(lambda: provider.held.version == 1, "the node holding v1")
            engine.tick(wait=True)
            wait_for(lambda: set(guests(hub.stub)) == {100, 101}, "the node's first report")
            found = guests(hub.stub)
            assert found[100].state == pb.SYNC_STATE_DRIFTED and [(d.key, d.declared, d.actual) for d in
                                                                   found[100].diffs] == [("memory", "2048", "1024")]
            [entry] = engine.gate.pending()
            assert found[101].state == pb.SYNC_STATE_PENDING_APPROVAL and found[101].name == "<script>alert(1)</script>"
            [waiting] = found[101].pending
            assert (waiting.descriptor, waiting.descriptor_sha256, waiting.op_kind, waiting.action_class,
                    waiting.audience) == (entry.descriptor, entry.descriptor_sha256, "config.protection_off",
                                          "APPROVAL", NODE)
            assert reporter.sent[-1].full and reporter.sent[-1].held_version == 1

            done = pve_hub("status", "--hub", hub.address, "--cluster", CLUSTER)
            assert done.returncode == 4, done.stdout + done.stderr
            [row] = [line for line in done.stdout.splitlines() if line.startswith(NODE)]
            assert row.split()[1:7] == ["1", "ACK", "v1", "0", "1", "1"], row  # held, verdict, in sync, drifted, pend.
            done = pve_hub("status", "--hub", hub.address, "--cluster", CLUSTER, "--node", NODE)
            assert done.returncode == 4 and "memory: declared '2048', actual '1024'" in done.stdout, done.stdout
            assert "waits for approval: config.protection_off [APPROVAL]" in done.stdout
            assert "<script>alert(1)</script>" in done.stdout  # text, as given: the page escapes, the CLI prints

            first = reporter.sent[-1].seq
            engine.tick(wait=True)
            wait_for(lambda: guests(hub.stub)[100].state == pb.SYNC_STATE_IN_SYNC, "100 in sync at the hub")
            delta = reporter.sent[-1]
            assert (delta.full, delta.base_seq, [g.vmid for g in delta.guests]) == (False, first, [100])
            assert guests(hub.stub)[101] == found[101]
        finally:
            provider.close()


def blackhole() -> tuple[socket.socket, int]:
    """A listening socket that accepts and never answers: a hub that hangs every call."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener, listener.getsockname()[1]


def test_a_hub_that_hangs_or_is_gone_never_slows_a_tick_and_gets_a_full_report_back(
        fakepve: Any, make_engine: Make, tmp_path: Path, reporters: list[StateReporter]) -> None:
    """The hub accepts connections and never answers (each call runs to its 1 s deadline): six ticks take no longer
    than without a hub. A real hub on that address then gets the latest state, in full, without another tick."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024})
    engine = make_engine([Declared(vmid=100, state="running", config={"memory": "1024"})], source=Source.HUB)
    listener, port = blackhole()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[OWN_SUBCHANNELS])
    reporter = StateReporter(channel, ReporterSettings(interval=0.5, timeout=1.0, retry=0.2),
                             identity=lambda: (CLUSTER, NODE), held_version=lambda: 7)
    reporters.append(reporter)
    engine.tick(wait=True)  # the first tick's connections and reads, before timing
    alone = min(_timed(engine) for _ in range(3))
    engine.after_tick.append(reporter.offer)
    reporter.start()
    took = []
    for _ in range(6):
        took.append(_timed(engine))
        time.sleep(0.25)
    assert max(took) < alone + 0.25, (alone, took)  # a call hangs 1 s at a time meanwhile
    assert reporter.sent == [] and "DEADLINE_EXCEEDED" in reporter.failed, reporter.failed
    listener.close()
    with running_hub(SqliteStore.in_dir(tmp_path / "hub"), listen=f"127.0.0.1:{port}") as hub:
        wait_for(lambda: bool(hub.store.node_states(CLUSTER)), "a report once the hub is back", timeout=30)
        [node] = hub.store.node_states(CLUSTER)
        assert reporter.sent[0].full and node.held_version == 7 and 0.5 <= node.interval < 1.5  # + a tick
        assert [(g.vmid, g.state) for g in hub.store.guests(CLUSTER)] == [(100, "in_sync")]
    channel.close()


def _timed(engine: Engine) -> float:
    started = time.monotonic()
    engine.tick(wait=True)
    return time.monotonic() - started


def test_a_node_that_stops_reporting_is_stale_within_two_intervals(
        fakepve: Any, make_engine: Make, tmp_path: Path, reporters: list[StateReporter]) -> None:
    """A node ticking every 0.3 s reports; it dies (its reporter and channel gone at once, as a SIGKILL leaves them):
    Status calls it stale within two intervals of its last report, and `pve-hub status` exits 4 naming it STALE."""
    fakepve.add_vm(100, "web", status="running")
    engine = make_engine([Declared(vmid=100, state="running")], source=Source.HUB)
    interval = 0.3
    with running_hub(SqliteStore.in_dir(tmp_path / "hub")) as hub:
        channel = grpc.insecure_channel(hub.address, options=[OWN_SUBCHANNELS])
        reporter = StateReporter(channel, ReporterSettings(interval=interval), identity=lambda: (CLUSTER, NODE),
                                 held_version=lambda: 1)
        reporters.append(reporter)
        engine.after_tick.append(reporter.offer)
        reporter.start()
        for _ in range(3):
            engine.tick(wait=True)
            time.sleep(interval / 3)
        wait_for(lambda: len(reporter.sent) >= 2, "the node's reports")
        reporter.close()
        channel.close()
        last = hub.store.node_states(CLUSTER)[0].received.timestamp()

        def stale() -> bool:
            return bool(hub.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10).nodes[0].stale)

        assert not stale() or time.time() - last > 2 * interval
        wait_for(stale, "the node shown stale", timeout=5)
        assert time.time() - last < 2 * interval + 0.5  # within two intervals (and one poll) of its last report
        done = pve_hub("status", "--hub", hub.address, "--cluster", CLUSTER)
        assert done.returncode == 4 and "STALE: no report for" in done.stdout, done.stdout


def test_op_fates_become_op_reports() -> None:
    """The executor's fates as hub.v1 OpReports: the fate's word, the most recent ones, an id the hub would refuse
    left out (it would void the whole report)."""
    statuses = [epb.OpStatus(op_id=f"{n:032x}", vmid=100, op_kind="stop", fate=epb.OP_FATE_RAN, outcome="ok",
                             at_unix_ms=n, signers=["alice"]) for n in range(1, 130)]
    statuses.append(epb.OpStatus(op_id="not-an-id", fate=epb.OP_FATE_WAITING))
    statuses.append(epb.OpStatus(op_id="f" * 32, vmid=101, op_kind="config.disk_detach", fate=epb.OP_FATE_WAITING,
                                 detail="queued"))
    reports = op_reports(statuses)
    assert len(reports) == 99 and reports[-1].fate == "waiting" and reports[0].fate == "ran"
    assert (reports[-2].op_id, reports[-2].outcome, list(reports[-2].signers)) == (f"{129:032x}", "ok", ["alice"])


def test_deltas_carry_only_what_changed_and_a_hub_that_lost_the_node_gets_a_full_report(
        tmp_path: Path, reporters: list[StateReporter]) -> None:
    """Ticks with the same guests send deltas carrying only the ops whose fate moved and the guests that changed; when
    the hub no longer holds the node (a database restored from a backup), it answers needs_full and the reporter
    sends everything at once, without waiting for a tick."""
    ops = [pb.OpReport(op_id=f"{n:032x}", vmid=100, op_kind="stop", fate="waiting", at_unix_ms=n) for n in (1, 2)]
    with running_hub(SqliteStore.in_dir(tmp_path / "hub")) as hub:
        channel = grpc.insecure_channel(hub.address, options=[OWN_SUBCHANNELS])
        reporter = StateReporter(channel, ReporterSettings(interval=30), identity=lambda: (CLUSTER, NODE),
                                 held_version=lambda: 1, ops=lambda: list(ops))
        reporters.append(reporter)
        reporter.start()
        view = TickView(declared=(Declared(vmid=100), Declared(vmid=101)))
        reporter.offer(TickSummary(started=time.time(), view=view))
        wait_for(lambda: len(reporter.sent) == 1, "the first report")
        ops[1] = pb.OpReport(op_id=f"{2:032x}", vmid=100, op_kind="stop", fate="ran", outcome="ok", at_unix_ms=3)
        reporter.offer(TickSummary(started=time.time(), view=TickView(declared=(Declared(vmid=100),))))
        wait_for(lambda: len(reporter.sent) == 2, "the second report")
        delta = reporter.sent[1]
        assert (delta.full, list(delta.removed_vmids), [o.op_id[-1] for o in delta.ops], list(delta.guests)) == (
            False, [101], ["2"], [])
        node = hub.stub.GetNode(pb.GetNodeRequest(cluster=CLUSTER, node=NODE), timeout=10)
        assert [g.vmid for g in node.guests] == [100] and [o.fate for o in node.ops] == ["waiting", "ran"]
        with sqlite3.connect(tmp_path / "hub" / "hub.sqlite3") as db:  # the hub forgets the node
            db.execute("DELETE FROM node_states")
            db.execute("DELETE FROM node_guests")
        reporter.offer(TickSummary(started=time.time(), view=TickView(declared=(Declared(vmid=100),))))
        wait_for(lambda: len(reporter.sent) == 3, "the full report the hub asked for")
        assert reporter.sent[2].full and [g.vmid for g in reporter.sent[2].guests] == [100] and reporter.failed == []
        assert [g.vmid for g in hub.store.guests(CLUSTER)] == [100]
        channel.close()
