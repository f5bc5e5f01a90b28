"""The hub's web page without a browser: what each page says, escaping, 404s, headers (a real hub on loopback)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.store import SqliteStore
from hub.v1 import hub_pb2 as pb
from hub.web.server import url
from tests.hub_helpers import CLUSTER, Hub, envelope, running_hub

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


@pytest.mark.parametrize("path", [
    "/clusters/nosuch", "/clusters/lab/nodes/pve9@lab", "/clusters/lab/nodes/pve1@lab/guests/999",
    "/clusters/lab/nodes/pve1@lab/guests/abc", "/clusters/lab/history/7", "/clusters/lab/history/x",
    "/clusters/lab/nope", "/nope", "/clusters/%3Cscript%3E", "/clusters/lab/nodes/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    "/clusters/lab/nodes/%ff"])
def test_what_is_not_there_is_404_and_the_name_stays_text(hub: Hub, path: str) -> None:
    """Unknown clusters, nodes, guests and versions are 404, and a name from the URL is shown escaped."""
    apply(hub, "guests:\n  - vmid: 100\n    state: running\n", "v1")
    hub.stub.Report(pb.ReportRequest(cluster=CLUSTER, node="pve1@lab", version=1, ok=True))
    status, headers, page = get(hub, path)
    assert status == 404
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<script" not in page


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
