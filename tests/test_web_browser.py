"""The hub's web page in a real browser: Debian's Chromium, headless, driven by Selenium through its chromedriver.

A real hub (gRPC and the web listener on loopback) holds the three-node demo cluster (fakecluster: pve1-3, as
scripts/demo_hub.py): a signed desired document, each node's ACK, and each node's StateReport sent over
hub.v1 ReportState as its executor sends it. The page is read as a person reads it: by the text Chromium shows
and the links it follows. Skipped, saying how to install it, where Chromium or its driver is missing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.store import SqliteStore
from hub.v1 import hub_pb2 as pb
from tests.hub_helpers import Hub, envelope, running_hub

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install chromium chromium-driver"
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip(f"Chromium and its driver are not installed ({CHROMIUM}, {CHROMEDRIVER}): {INSTALL}",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CLUSTER = "fakecluster"
EVIL = "<script>alert(1)</script>"
# The flags this machine needs (no sandbox as root; no background connections to Google's hosts).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1024")
DESIRED = ("guests:\n"
           "  - vmid: 100\n    state: running\n    config: {memory: 2048}\n"
           "  - vmid: 101\n    config: {tags: demo, memory: 2048}\n"
           "  - vmid: 200\n    config: {net0: 'virtio=BC:24:11:00:00:02,bridge=vmbr0'}\n"
           "  - vmid: 300\n    state: running\n")
DESCRIPTOR = b'{"audience":"pve2@fakecluster","kind":"config.nic_identity","vmid":200}'


def diff(key: str, declared: str, actual: str) -> pb.KeyDiff:
    """One key where declared and actual differ."""
    return pb.KeyDiff(key=key, declared=declared, actual=actual, declared_absent=not declared,
                      actual_absent=not actual)


def guests(node: str) -> list[pb.GuestState]:
    """What each node of the demo cluster reports: pve1 drifted, pve2 a change waiting for approval, pve3 in sync."""
    pending = pb.PendingApproval(
        node=f"{node}@{CLUSTER}", vmid=200, op_kind="config.nic_identity", action_class="APPROVAL",
        rule="nic_identity", reasons=[f"net0: the MAC address changes ({EVIL})"], descriptor=DESCRIPTOR,
        descriptor_sha256="ab" * 32, first_seen_unix_ms=1_700_000_000_000, audience=f"{node}@{CLUSTER}")
    return {
        "pve1": [pb.GuestState(vmid=100, name="web1", type="qemu", state=pb.SYNC_STATE_IN_SYNC,
                               declared_run_state="running", actual_run_state="running"),
                 pb.GuestState(vmid=101, name="db1", type="qemu", state=pb.SYNC_STATE_DRIFTED,
                               diffs=[diff("memory", "2048", "4096"), diff("tags", "demo", "")])],
        "pve2": [pb.GuestState(vmid=200, name=EVIL, type="qemu", state=pb.SYNC_STATE_PENDING_APPROVAL,
                               diffs=[diff("net0", "virtio=BC:24:11:00:00:02,bridge=vmbr0",
                                           "virtio=BC:24:11:00:00:09,bridge=vmbr0")], pending=[pending])],
        "pve3": [pb.GuestState(vmid=300, name="cache3", type="lxc", state=pb.SYNC_STATE_IN_SYNC,
                               declared_run_state="running", actual_run_state="running")],
    }[node]


@pytest.fixture(name="hub", scope="module")
def _hub() -> Iterator[Hub]:
    with tempfile.TemporaryDirectory(prefix="pve-web-") as tmp, \
            running_hub(SqliteStore.in_dir(Path(tmp) / "hub"), web_listen="127.0.0.1:0") as hub:
        hub.stub.Apply(pb.ApplyRequest(cluster=CLUSTER, expected_version=0, envelope=envelope(
            DESIRED, 1, cluster=CLUSTER, message="web tier up")))
        for node in ("pve1", "pve2", "pve3"):
            executor = f"{node}@{CLUSTER}"
            hub.stub.Report(pb.ReportRequest(cluster=CLUSTER, node=executor, version=1, ok=True))
            answer = hub.stub.ReportState(pb.StateReport(
                cluster=CLUSTER, node=executor, audience=executor, session="s1", seq=1, full=True,
                guests=guests(node), interval_seconds=3600, held_version=1, tick_outcome="ok"))
            assert answer.recorded_seq == 1
        yield hub


def chrome(*, javascript: bool) -> Any:
    """A headless Chromium session (its own empty profile), with or without JavaScript."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="pve-web-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    driver.profile_dir = profile
    return driver


@pytest.fixture(name="browser", scope="module")
def _browser() -> Iterator[Any]:
    driver = chrome(javascript=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(driver.profile_dir, ignore_errors=True)


def base(hub: Hub) -> str:
    """The page's address."""
    assert hub.running.web_endpoint is not None
    return f"http://127.0.0.1:{hub.running.web_endpoint.port}"


def follow(driver: Any, text: str) -> None:
    """Click the link a person sees as ``text``."""
    driver.find_element(By.LINK_TEXT, text).click()


def rows(driver: Any, css: str) -> list[str]:
    """The visible text of each row of the table ``css``."""
    return [" ".join(row.text.split()) for row in driver.find_elements(By.CSS_SELECTOR, f"{css} tbody tr")]


def test_a_drifted_guest_shows_its_key_and_both_values(hub: Hub, browser: Any) -> None:
    """From the overview to pve1 to guest 101: memory and tags, declared against actual, by clicking links."""
    browser.get(base(hub) + "/")
    follow(browser, CLUSTER)
    assert "pve1@fakecluster" in browser.find_element(By.CSS_SELECTOR, "table.nodes").text
    follow(browser, "pve1@fakecluster")
    assert "101 db1 qemu drifted memory: 2048 → 4096 tags: demo → <absent>" in rows(browser, "table.guests")
    follow(browser, "101")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Guest 101 db1"
    assert {"memory 2048 4096 differs", "tags demo <absent> differs"} <= set(rows(browser, "table.keys"))


def test_a_pending_approval_shows_the_command_that_signs_it(hub: Hub, browser: Any) -> None:
    """The pending page names the node, the guest, the op and its class, and the exact command."""
    browser.get(base(hub) + f"/clusters/{CLUSTER}")
    follow(browser, "1 pending approval")
    item = browser.find_element(By.CSS_SELECTOR, "article.pending")
    assert "pve2@fakecluster · guest 200 · config.nic_identity APPROVAL" in item.text
    assert f"net0: the MAC address changes ({EVIL})" in item.text
    short = "ab" * 6
    assert item.find_element(By.CSS_SELECTOR, "pre.command.hub").text == (
        f"pve-hub pending --cluster {CLUSTER} --descriptor {short} --json > pending-{short}.json && "
        f"pve-executor op sign --key KEYFILE --role ROLE --out op-{short}.json pending-{short}.json && "
        f"pve-hub submit op-{short}.json --cluster {CLUSTER} --wait")
    assert item.find_element(By.CSS_SELECTOR, "pre.command.node").text == (
        "pve-executor op sign --pending 1 --key KEYFILE --role ROLE")


def test_a_guest_named_script_is_shown_as_text_and_never_runs(hub: Hub, browser: Any) -> None:
    """pve2's guest 200 is named <script>alert(1)</script>: the page shows those characters, no alert opens,
    and the document holds no script element."""
    node = f"/clusters/{CLUSTER}/nodes/pve2%40{CLUSTER}"
    for path in (node, f"{node}/guests/200", f"/clusters/{CLUSTER}/pending"):
        browser.get(base(hub) + path)
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 (reading it is the check)
        assert browser.find_elements(By.TAG_NAME, "script") == []
        assert EVIL in browser.find_element(By.TAG_NAME, "main").text, path
    assert browser.find_element(By.TAG_NAME, "h1").text == "Pending approvals"


def test_the_pages_work_with_javascript_disabled(hub: Hub) -> None:
    """With JavaScript off, a person still reaches every page by its links and reads the same things."""
    driver = chrome(javascript=False)
    try:
        driver.get(base(hub) + "/")
        follow(driver, CLUSTER)
        assert "in_sync 2, drifted 1, pending_approval 1" in driver.find_element(By.TAG_NAME, "main").text
        follow(driver, "pve2@fakecluster")
        follow(driver, "200")
        assert "net0 virtio=BC:24:11:00:00:02,bridge=vmbr0 virtio=BC:24:11:00:00:09,bridge=vmbr0 differs" in rows(
            driver, "table.keys")
        assert "pve-hub submit op-abababababab.json" in driver.find_element(By.CSS_SELECTOR, "pre.command.hub").text
        follow(driver, "history")
        follow(driver, "v1")
        assert "101 added memory <absent> 2048" in rows(driver, "table.changes")
        assert driver.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]').get_attribute("content") == "10"
    finally:
        driver.quit()
        shutil.rmtree(driver.profile_dir, ignore_errors=True)
