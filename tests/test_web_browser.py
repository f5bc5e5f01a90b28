"""The hub's web page in a real browser: Debian's Chromium, headless, driven by Selenium through its chromedriver.

The three-node demo cluster (fakepve's fakecluster, nodes pve1-3, as scripts/demo_hub.py and
tests/test_hub_cluster.py): one real hub over SQLite with its web listener, one executor per node (the daemon's
own engine over fakepve, its hub provider and its StateReporter), one trust store. alice applies the desired state,
every node verifies, ACKs and ticks once: pve1's guest 100 has drifted (memory), pve2's guest 200, named
<script>alert(1)</script>, waits for an approval (protection off), pve3 is in sync. The page is then read as a
person reads it: by the text Chromium shows and the links it follows. Skipped, saying how to install it, where
Chromium or its driver is missing.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from executor.app.report import StateReporter
from executor.app.wiring import Parts, state_reporter
from executor.loop.engine import Engine
from executor.loop.hub import HubProvider, HubSettings
from executor.loop.hubheld import HeldFiles
from executor.metrics import ExecutorMetrics
from executor.pve.node import Connection, ProxmoxNode
from executor.signed.trust import TrustKeeper
from hub.store import SqliteStore
from hub.v1 import hub_pb2 as pb
from tests.hub_helpers import Hub, running_hub
from tests.signing import write_store
from tests.test_hub_cluster import CLUSTER, store_doc
from tests.test_hub_provider import document, wait_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install chromium chromium-driver"
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip(f"Chromium and its driver are not installed ({CHROMIUM}, {CHROMEDRIVER}): {INSTALL}",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

Make = Callable[..., Engine]
EVIL = "<script>alert(1)</script>"
NODES = ("pve1", "pve2", "pve3")
# The flags this machine needs (no sandbox as root; no background connections to Google's hosts).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1024")
DESIRED = ("guests:\n"
           "  - vmid: 100\n    state: stopped\n    config: {memory: 2048}\n"
           "  - vmid: 200\n    state: stopped\n    config: {memory: 512, protection: 0}\n"
           "  - vmid: 300\n    state: stopped\n    config: {memory: 1024}\n")


@pytest.fixture(name="hub")
def _demo(fakepve: Any, make_engine: Make, connect: Callable[..., Connection], tmp_path: Path) -> Iterator[Hub]:
    """The demo cluster after one tick of each node, as the hub holds it."""
    for node in NODES[1:]:
        fakepve.add_node(node)
    fakepve.add_vm(100, "web1", node="pve1", status="stopped", config={"memory": 1024})
    fakepve.add_vm(200, EVIL, node="pve2", status="stopped", config={"memory": 512, "protection": 1})
    fakepve.add_vm(300, "cache3", node="pve3", status="stopped", config={"memory": 1024})
    trust = write_store(tmp_path, store_doc())
    providers: list[HubProvider] = []
    reporters: list[StateReporter] = []
    with running_hub(SqliteStore.in_dir(tmp_path / "hub"), heartbeat=0.1, web_listen="127.0.0.1:0") as hub:
        try:
            engines = []
            for node in NODES:
                state = tmp_path / f"state-{node}"
                state.mkdir()
                providers.append(HubProvider(
                    HubSettings(target=hub.address, heartbeat=0.2, backoff_base=0.05, backoff_cap=0.8),
                    files=HeldFiles(state), trust=TrustKeeper(str(trust), str(state)),
                    audience=functools.partial(f"{{}}@{CLUSTER}".format, node), metrics=ExecutorMetrics()))
                providers[-1].start()
                parts: list[Parts] = []
                engines.append(make_engine([], pve=ProxmoxNode(connect(node=node)), provider=providers[-1],
                                           parts=parts))
                reporters.append(state_reporter(parts[0], providers[-1], interval=30.0))
                reporters[-1].start()
            hub.stub.Apply(pb.ApplyRequest(cluster=CLUSTER, expected_version=0,
                                           envelope=document(1, desired=DESIRED, cluster=CLUSTER)), timeout=10)
            wait_for(lambda: all(p.held.version == 1 for p in providers), "every node holding v1")
            for engine in engines:
                engine.tick(wait=True)
            wait_for(lambda: len(hub.store.node_states(CLUSTER)) == 3, "every node's first report")
            yield hub
        finally:
            for reporter in reporters:
                reporter.close()
            for provider in providers:
                provider.close()


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


@pytest.fixture(name="browser")
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


def test_drift_an_approval_and_a_script_named_guest_as_a_person_sees_them(hub: Hub, browser: Any) -> None:
    """By clicking links from the index: pve1's guest 100 shows memory declared 2048, actual 1024; the pending
    approval shows the commands that sign it; pve2's guest named <script>alert(1)</script> is shown as those
    characters, no alert opens and no page holds a script element."""
    browser.get(base(hub) + "/")
    follow(browser, CLUSTER)
    assert "pve1@fakecluster v1 ACK v1 drifted 1, elsewhere 2 ok" in rows(browser, "table.nodes")[0]
    follow(browser, "pve1@fakecluster")
    assert "100 web1 qemu drifted memory: 2048 → 1024 being converged" in rows(browser, "table.guests")
    follow(browser, "100")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Guest 100 web1"
    assert "memory 2048 1024 differs" in rows(browser, "table.keys")

    follow(browser, "pending approvals")
    [waiting] = hub.stub.ListPending(pb.ListPendingRequest(cluster=CLUSTER), timeout=10).pending
    short = waiting.descriptor_sha256[:12]
    item = browser.find_element(By.CSS_SELECTOR, "article.pending")
    assert "pve2@fakecluster · guest 200 · config.protection_off APPROVAL" in item.text
    assert item.find_element(By.CSS_SELECTOR, "pre.command.hub").text == (
        f"pve-hub pending --cluster {CLUSTER} --descriptor {short} --json > pending-{short}.json && "
        f"pve-executor op sign --key KEYFILE --role ROLE --out op-{short}.json pending-{short}.json && "
        f"pve-hub submit op-{short}.json --cluster {CLUSTER} --wait")
    assert item.find_element(By.CSS_SELECTOR, "pre.command.node").text == (
        "pve-executor op sign --pending 1 --key KEYFILE --role ROLE")

    follow(browser, "pve2@fakecluster")
    assert (f"200 {EVIL} qemu pending_approval protection: 0 → 1 APPROVAL_REQUIRED: config.protection_off "
            "[APPROVAL]: protection_off") in rows(browser, "table.guests")
    follow(browser, "200")
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Guest 200 {EVIL}"
    for path in ("/", f"/clusters/{CLUSTER}", f"/clusters/{CLUSTER}/nodes/pve2%40{CLUSTER}",
                 f"/clusters/{CLUSTER}/nodes/pve2%40{CLUSTER}/guests/200", f"/clusters/{CLUSTER}/pending"):
        browser.get(base(hub) + path)
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 (reading it is the check)
        assert browser.find_elements(By.TAG_NAME, "script") == [], path


def test_the_pages_work_with_javascript_disabled(hub: Hub) -> None:
    """With JavaScript off, a person still reaches every page by its links and reads the same things."""
    driver = chrome(javascript=False)
    try:
        driver.get(base(hub) + "/")
        follow(driver, CLUSTER)
        assert "in_sync 1, drifted 1, pending_approval 1." in driver.find_element(By.TAG_NAME, "main").text
        follow(driver, "pve2@fakecluster")
        follow(driver, "200")
        assert rows(driver, "table.keys") == ["run state stopped stopped", "protection 0 1 differs",
                                              "memory 512 512 same"]
        assert "pve-hub submit op-" in driver.find_element(By.CSS_SELECTOR, "pre.command.hub").text
        follow(driver, "history")
        follow(driver, "v1")
        assert "200 added protection <absent> 0" in rows(driver, "table.changes")
        assert driver.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]').get_attribute("content") == "10"
    finally:
        driver.quit()
        shutil.rmtree(driver.profile_dir, ignore_errors=True)
