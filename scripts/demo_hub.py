"""`make demo-hub`: one signed desired state served by the hub to every node of a fake three-node cluster.

Starts fakepve with three nodes (pve1-3, cluster `fakecluster`), the planner, one `pve-hub serve` (SQLite in a
temporary state dir) and one `pve-executor run --hub` per node (each its own state dir and API socket, one
trust store whose `publisher` role grants `desired.apply` to the three nodes). alice applies a desired file
with `pve-hub apply`; every node verifies the signature, ACKs and converges; `pve-hub status` shows each node's
version and ACK. Then mallory, whose key no trust store holds, applies a forged version: the hub stores it (it
is a courier), every node NACKs it (UNKNOWN_KEY) and nothing changes. Then the fleet view (issue 17), with the
hub's web page on: alice applies a version that changes guest 102's NIC MAC (APPROVAL: config.nic_identity) and
starts a stopped guest on the last node whose start task fakepve makes last ~6 s (BENIGN: drifted, being converged,
while it runs); `pve-hub status` exits 4 (an approval waiting, a guest drifted), `status --node`, `pending` and the
guests' web pages show each key declared against actual (the start: run_state); alice signs it as `pending` says (the
trust store's `operator` role, threshold 1) and `pve-hub submit --wait` routes it to pve1: RAN ok, Proxmox gets the
MAC once and `pve-hub status` exits 0; then one executor is SIGKILLed and `pve-hub status` shows it STALE (exit 4)
within two report intervals. Then it stops every process it started, by PID (`--keep`: only at Ctrl-C, to browse
the page). Needs root (a trust store must be owned by root, as on a real node). `--nodes N` runs N nodes (1-3).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import grpc
from fakepve.certs import make_cert

from hub import status as status_view
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import Fake  # the other demo's fakepve runner, next to this file

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = "fakecluster"  # fakepve's cluster name: each executor's audience is NODE@fakecluster
ALL_NODES = ("pve1", "pve2", "pve3")
PVE_HUB = [sys.executable, "-c", "import sys; from hub.cli import main; sys.exit(main(sys.argv[1:]))"]
EXECUTOR = [sys.executable, "-m", "executor"]
TIMEOUT = 40.0
INTERVAL = 1.0  # the executors' --interval: a report each, so a node is stale ~2 s after its last one
MAC_GUEST = 102  # pve1's guest whose NIC MAC changes in v3 (stopped, as in v1)
MAC_OLD, MAC_NEW = "BC:24:11:00:01:02", "BC:24:11:00:01:99"  # its NIC, before and as declared in v3
START_SECS = 3000  # the slow guest's start task in PVE seconds: ~6 real s at the fake's time_scale 0.002


def role(nodes: tuple[str, ...]) -> str:
    """The trust store's roles: desired.apply for every node of the cluster, and an operator who approves a NIC
    identity change (config.nic_identity); one signature each (a demo: a real cluster would ask two operators)."""
    audiences = ", ".join(f'"{node}@{CLUSTER}"' for node in nodes)
    return ('version = 1\n[[roles]]\nname = "publisher"\nkinds = ["desired.apply"]\nclasses = ["APPROVAL"]\n'
            f'audiences = [{audiences}]\nmax_ttl = "1h"\nthreshold = 1\n'
            '[[roles]]\nname = "operator"\nkinds = ["config.nic_identity"]\nclasses = ["APPROVAL"]\n'
            f'audiences = [{audiences}]\nvmids = ["100-399"]\nmax_ttl = "1h"\nthreshold = 1\n')


def desired(nodes: tuple[str, ...]) -> str:
    """The cluster's desired file: on each node, start N00 with 2 GiB and tag N01 (a running guest); 102 stopped."""
    lines = ["guests:"]
    for number, _ in enumerate(nodes, start=1):
        lines += [f"  - vmid: {number}00", "    state: running", "    config: {memory: 2048}",
                  f"  - vmid: {number}01", "    config: {tags: demo}"]
    lines += [f"  - vmid: {MAC_GUEST}", "    state: stopped"]
    return "\n".join(lines) + "\n"


def guests(pve: Any, nodes: tuple[str, ...]) -> None:
    """Two guests per node: N00 stopped with 1 GiB, N01 running untagged; and pve1's 102, stopped, with a NIC."""
    for number, node in enumerate(nodes, start=1):
        pve.add_node(node)
        pve.add_vm(number * 100, f"web{number}", node=node, status="stopped", config={"memory": 1024})
        pve.add_vm(number * 100 + 1, f"db{number}", node=node, status="running", config={"memory": 4096})
    pve.add_vm(MAC_GUEST, "app1", node="pve1", status="stopped",  # stopped: PVE sets its NIC at once
               config={"memory": 512, "net0": f"virtio={MAC_OLD},bridge=vmbr0"})
    slow = pve.add_vm(len(nodes) * 100 + 3, f"batch{len(nodes)}", node=nodes[-1], status="stopped",
                      config={"memory": 256})
    # v3 starts it: a start task of several seconds keeps it drifted (being converged) long enough to be seen
    slow.start_secs = START_SECS


def show(pve: Any, nodes: tuple[str, ...], title: str) -> None:
    """The cluster as the fake holds it."""
    print(f"\n== {title}")
    for number, _ in enumerate(nodes, start=1):
        for vmid in (number * 100, number * 100 + 1):
            guest = pve.guest(vmid)
            config = {k: guest.config[k] for k in ("memory", "tags") if k in guest.config}
            print(f"  {guest.node} {vmid} {guest.status:8} {config}")


class Processes:
    """Every process the demo starts, each with its log file; stopped by PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []
        logs.mkdir()

    def start(self, name: str, command: list[str]) -> Path:
        """Start ``command``, its stdout and stderr to logs/NAME.log (returned)."""
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
        self.started.append((name, child))
        return log

    def kill(self, name: str) -> int:
        """SIGKILL the process started as ``name`` (by its PID); its PID."""
        child = dict(self.started)[name]
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        return child.pid

    def stop(self) -> None:
        """SIGTERM each (newest first), SIGKILL any that is still there after 15 s."""
        for _, child in reversed(self.started):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for name, child in reversed(self.started):
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:  # never leave one behind
                print(f"{name} (pid {child.pid}) did not stop: killed")
                child.kill()
                child.wait()

    def tail(self) -> None:
        """The last lines of every log (when something did not happen)."""
        for name, _ in self.started:
            lines = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-8:]
            print(f"-- {name}\n" + "\n".join(lines))


def wait(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``check`` until true; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def listening(log: Path, event: str, key: str = "address") -> str:
    """The address a server logged (``key`` of the JSON line ``event``) in ``log``."""
    found: list[str] = []

    def seen() -> bool:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and json.loads(line).get("event") == event:
                found.append(json.loads(line)[key])
                return True
        return False

    wait(seen, event)
    return found[0]


def keys(tmp: Path) -> str:
    """alice's, bob's and mallory's keys; the trust store entries of alice (publisher, operator) and bob."""
    entries = []
    for name in ("alice", "bob", "mallory"):
        out = subprocess.run([*EXECUTOR, "keys", "generate", "--out", str(tmp / f"{name}.key"), "--owner",
                              f"{name}@example.org"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        if name != "mallory":  # mallory's key is in no trust store: the forger
            granted = '["publisher", "operator"]' if name == "alice" else '["publisher"]'
            entries.append(out.replace("roles = []", f"roles = {granted}"))
    return "\n".join(entries)


def status(hub: pb_grpc.HubServiceStub) -> dict[str, pb.NodeStatus]:
    """Each node's entry at the hub, by node name."""
    answer = hub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10)
    return {n.node.split("@")[0]: n for n in answer.nodes}


def run(tmp: Path, nodes: tuple[str, ...], *, keep: bool = False) -> int:
    """The demo in ``tmp``; 0 when every node converged on v1, NACKed the forgery, the approval ran once through the
    hub and the killed node went stale. ``keep``: leave everything running until Ctrl-C."""
    certfile, keyfile, _ = make_cert(str(tmp), hosts=("127.0.0.1",))
    fake = Fake(certfile, keyfile)
    procs = Processes(tmp / "logs")
    try:
        guests(fake.pve, nodes)
        show(fake.pve, nodes, "the cluster before")
        trust = tmp / "trust.toml"
        trust.write_text(role(nodes) + "\n" + keys(tmp))
        trust.chmod(0o644)
        print("\n== the trust store every node holds (alice and bob publish, alice approves; mallory is nobody)\n"
              + trust.read_text())
        hub_log = procs.start("pve-hub", [*PVE_HUB, "serve", "--listen", "127.0.0.1:0", "--state-dir",
                                          str(tmp / "hub"), "--heartbeat", "1", "--web-listen", "127.0.0.1:0",
                                          "--log-format", "json"])
        planner_log = procs.start("planner", [sys.executable, "-m", "planner", "serve", "--listen", "127.0.0.1:0",
                                              "--log-format", "json"])
        address, planner = listening(hub_log, "hub_listening"), listening(planner_log, "planner_listening")
        web = listening(hub_log, "hub_listening", "web")
        print(f"== pve-hub serve on {address} (SQLite in {tmp / 'hub'}); its web page: {web}")
        password = tmp / "password"
        password.write_text("secret\n")
        for node in nodes:
            procs.start(node, [*EXECUTOR, "run", "--node", node, "--pve-url", f"https://127.0.0.1:{fake.pve.port}",
                               "--pve-user", "root@pam", "--pve-password-file", str(password), "--pve-ca-file",
                               certfile, "--planner", planner, "--hub", address, "--hub-heartbeat", "1",
                               "--trust-store", str(trust), "--state-dir", str(tmp / f"state-{node}"),
                               "--listen", f"unix:{tmp / f'run-{node}' / 'executor.sock'}",
                               "--interval", f"{INTERVAL:g}",
                               "--log-format", "json"])
        print(f"== pve-executor run --hub {address}, on {', '.join(nodes)}")
        channel = grpc.insecure_channel(address)
        hub = pb_grpc.HubServiceStub(channel)
        try:
            code = converge_then_forge(tmp, fake.pve, nodes, hub, address)
            if code == 0:
                code = FleetView(tmp, fake.pve, nodes, hub, address=address, web=web, procs=procs).run()
            if keep:
                print(f"\n== --keep: everything runs until Ctrl-C (or kill {os.getpid()}); browse {web} or try: "
                      f"pve-hub status --cluster {CLUSTER} --hub {address}", flush=True)
                hold()
            return code
        except TimeoutError as exc:
            print(f"\n{exc}; the logs' last lines:")
            procs.tail()
            return 1
        finally:
            channel.close()
    finally:
        procs.stop()
        fake.stop()
        print(f"\nstopped {len(procs.started)} processes (by PID) and the fake Proxmox")


def hold() -> None:
    """Until Ctrl-C (SIGINT) or SIGTERM."""
    for number in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell starts a background job ignoring it
        signal.signal(number, signal.default_int_handler)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print()


def converge_then_forge(tmp: Path, pve: Any, nodes: tuple[str, ...], hub: pb_grpc.HubServiceStub,
                        address: str) -> int:
    """alice's apply converges every node; mallory's is NACKed by every node. 0 when both happen."""
    common = ["--hub", address, "--cluster", CLUSTER]
    path = tmp / "desired.yaml"
    path.write_text(desired(nodes))
    print("\n== pve-hub apply desired.yaml --key alice.key --role publisher (the whole cluster's desired state)")
    done = subprocess.run([*PVE_HUB, "apply", str(path), *common, "--key", str(tmp / "alice.key"), "--role",
                           "publisher", "--author", "alice@example.org", "--message", "web tier up",
                           "--check-version", "0"], cwd=ROOT, check=False)
    if done.returncode != 0:
        return 1
    wait(lambda: {n: (s.held_version, s.ok) for n, s in status(hub).items()} == {n: (1, True) for n in nodes},
         "every node's ACK of version 1")
    wait(lambda: all(converged(pve, number) for number, _ in enumerate(nodes, start=1)), "every node converged")
    # and reported so (a report describes what its tick saw before acting): status then shows the nodes in sync
    wait(lambda: status_view.exit_code(status(hub).values()) == 0, "every node's report: in sync")
    show(pve, nodes, "the cluster after (each node converged its own guests)")
    print("\n== pve-hub status")
    subprocess.run([*PVE_HUB, "status", *common], cwd=ROOT, check=False)
    path.write_text(desired(nodes).replace("memory: 2048", "memory: 512"))
    print("\n== pve-hub apply --key mallory.key (a key no node trusts): the hub stores it, every node refuses it")
    subprocess.run([*PVE_HUB, "apply", str(path), *common, "--key", str(tmp / "mallory.key"), "--role", "publisher",
                    "--author", "mallory@example.org", "--message", "shrink everything"], cwd=ROOT, check=False,
                   stdout=subprocess.DEVNULL)
    wait(lambda: all((s.reported_version, s.ok) == (2, False) for s in status(hub).values()), "every node's NACK")
    print("\n== pve-hub status")
    subprocess.run([*PVE_HUB, "status", *common], cwd=ROOT, check=False)
    time.sleep(1.5)  # a tick or more: the forged memory is never written
    unchanged = all(converged(pve, number) for number, _ in enumerate(nodes, start=1))
    show(pve, nodes, "the cluster after the forgery (unchanged)" if unchanged else "the cluster CHANGED")
    refused = all("UNKNOWN_KEY" in s.reason and s.held_version == 1 for s in status(hub).values())
    return 0 if unchanged and refused else 1


class Cells(HTMLParser):
    """The text of each row of a page's ``table.keys``, cell by cell."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_keys = self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Enter the keys table, a row, a cell."""
        if tag == "table":
            self._in_keys = ("class", "keys") in attrs
        elif self._in_keys and tag == "tr":
            self.rows.append([])
        elif self._in_keys and tag == "td":
            self._in_cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        """Leave a cell or the table."""
        self._in_cell = self._in_cell and tag != "td"
        self._in_keys = self._in_keys and tag != "table"

    def handle_data(self, data: str) -> None:
        """A cell's text (the parser unescapes it)."""
        if self._in_cell:
            self.rows[-1][-1] += data.strip()


class FleetView:
    """Issue 17 on the demo cluster: drift and an approval at the hub and on its page, the signed op submitted
    through the hub and applied once, a killed node stale within two report intervals."""

    def __init__(self, tmp: Path, pve: Any, nodes: tuple[str, ...], hub: pb_grpc.HubServiceStub, *, address: str,
                 web: str, procs: Processes) -> None:
        self.tmp, self.pve, self.nodes, self.hub, self.web, self.procs = tmp, pve, nodes, hub, web, procs
        self.common = ["--hub", address, "--cluster", CLUSTER]
        self.drifted = len(nodes) * 100 + 3  # the last node's slow guest: v3 starts it
        self.writes = 0  # fakepve's requests before v3

    def run(self) -> int:
        """Each step in turn; 0 when all happened as they should."""
        steps = (self.apply_v3, self.shown, self.sign_and_submit, self.in_sync, self.kill)
        print(f"\n(every `pve-hub` command below also gets {' '.join(self.common)}, as you would type it)")
        return next((code for step in steps if (code := step()) != 0), 0)

    def pve_hub(self, *args: str, shown: str = "", last: int = 0, only: tuple[str, ...] = ()) -> tuple[int, str]:
        """``pve-hub ARGS`` (this cluster, this hub) as a user runs it, the command and its output (``last``: its
        last lines only; -1: none; ``only``: the lines starting so) printed."""
        print(f"\n$ pve-hub {shown or ' '.join(args)}")
        done = subprocess.run([*PVE_HUB, *args, *self.common], cwd=ROOT, capture_output=True, text=True, check=False)
        lines = (done.stdout + done.stderr).rstrip().splitlines()
        if only:
            print("\n".join(line for line in lines if line.startswith(only)))
        elif last >= 0:  # -1: nothing (its output goes to a file)
            print("\n".join(lines[-last:]))
        print(f"(exit {done.returncode})")
        return done.returncode, done.stdout

    def states(self) -> dict[str, dict[str, int]]:
        """Each node's guests by sync state, as the hub holds them."""
        return {name: status_view.counts(node) for name, node in status(self.hub).items()}

    def apply_v3(self) -> int:
        """alice's v3: guest 102's MAC (waits for approval on pve1), the last node's slow guest started (drifted
        while its start task runs)."""
        text = desired(self.nodes).replace(
            f"  - vmid: {MAC_GUEST}\n    state: stopped",
            f"  - vmid: {MAC_GUEST}\n    state: stopped\n    config: {{net0: 'virtio={MAC_NEW},bridge=vmbr0'}}")
        text += f"  - vmid: {self.drifted}\n    state: running\n"
        path = self.tmp / "desired-v3.yaml"
        path.write_text(text)
        print(f"\n== fleet view: alice applies v3: guest {MAC_GUEST}'s NIC MAC {MAC_OLD} -> {MAC_NEW} (APPROVAL), "
              f"guest {self.drifted} running (BENIGN; its start task takes ~{START_SECS * 0.002:g} s)")
        self.writes = len(self.pve.requests)
        code, _ = self.pve_hub("apply", str(path), "--key", str(self.tmp / "alice.key"), "--role", "publisher",
                               "--author", "alice@example.org", "--message", "new MAC for app1, batch up",
                               "--check-version", "2", shown="apply desired-v3.yaml --key alice.key --role publisher "
                                                         "--message ... --check-version 2 (its diff not shown)", last=1)
        if code != 0:
            return 1
        wait(lambda: self.states().get("pve1", {}).get("pending_approval") == 1
             and self.states().get(self.nodes[-1], {}).get("drifted") == 1, "v3: pve1's approval, a guest drifted")
        return 0

    def shown(self) -> int:
        """`pve-hub status` (exit 4), `status --node` of both nodes, `pending`, and both guests' web pages."""
        last = self.nodes[-1]
        code, _ = self.pve_hub("status")
        node, _ = self.pve_hub("status", "--node", f"pve1@{CLUSTER}")
        converging, detail = self.pve_hub("status", "--node", f"{last}@{CLUSTER}", only=("  guest ", "      "),
                                          shown=f"status --node {last}@{CLUSTER} (its guests not in sync)")
        _, listed = self.pve_hub("pending")
        rows = self.guest_page("pve1", MAC_GUEST, "net0")
        differs = any(row[0] == "net0" and MAC_NEW in row[1] and MAC_OLD in row[2] for row in rows if len(row) > 2)
        started = [row for row in self.guest_page(last, self.drifted, "run_state") if len(row) > 2
                   and row[:3] == ["run_state", "running", "stopped"]]
        drifted = "run_state: declared 'running', actual 'stopped'" in detail
        alone = 4 if last == "pve1" else 3  # a node drifted only: 3 (converging); pve1 holds the approval: 4
        return 0 if (code, node, converging) == (4, 4, alone) and "sign it: " in listed and differs and started \
            and drifted and self.pve.guest(self.drifted).status == "stopped" else 1

    def guest_page(self, node: str, vmid: int, key: str) -> list[list[str]]:
        """GET a guest's web page; print the row of ``key``; the page's key rows."""
        page = f"{self.web}clusters/{CLUSTER}/nodes/{node}%40{CLUSTER}/guests/{vmid}"
        print(f"\n$ GET {page}")
        rows = self.page_rows(page)
        for row in rows:
            if row and row[0] == key:
                print("  " + "  ".join(cell or "-" for cell in row))
        return rows

    def page_rows(self, page: str) -> list[list[str]]:
        """The rows of the keys table (key, declared, actual, differs) of ``page``."""
        with urllib.request.urlopen(page, timeout=10) as answer:
            cells = Cells()
            cells.feed(answer.read().decode())
        return [row for row in cells.rows if row]

    def sign_and_submit(self) -> int:
        """Sign the pending op as `pending` prints it (alice as operator) and route it through the hub: RAN ok."""
        (item,) = self.hub.ListPending(pb.ListPendingRequest(cluster=CLUSTER), timeout=10).pending
        short = item.descriptor_sha256[:12]
        pending, signed = self.tmp / f"pending-{short}.json", self.tmp / f"op-{short}.json"
        code, text = self.pve_hub("pending", "--descriptor", short, "--json",
                                  shown=f"pending --descriptor {short} --json > pending-{short}.json", last=-1)
        pending.write_text(text)
        print(f"\n$ pve-executor op sign --key alice.key --role operator --yes --out op-{short}.json "
              f"pending-{short}.json")
        sign = subprocess.run([*EXECUTOR, "op", "sign", "--key", str(self.tmp / "alice.key"), "--role", "operator",
                               "--yes", "--out", str(signed), str(pending)], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        print(f"(exit {sign.returncode}){' ' + sign.stderr.strip() if sign.returncode else ''}")
        if code != 0 or sign.returncode != 0:
            return 1
        code, out = self.pve_hub("submit", str(signed), "--wait", "--timeout", "30",
                                 shown=f"submit op-{short}.json --wait")
        return 0 if code == 0 and "RAN ok" in out else 1

    def in_sync(self) -> int:
        """Proxmox got the MAC once, the slow guest runs; `pve-hub status` exits 0 and the page shows the guest in
        sync."""
        wait(lambda: status_view.exit_code(status(self.hub).values()) == 0, "every node in sync")
        print(f"\n== guest {self.drifted}'s start task ended: it is {self.pve.guest(self.drifted).status}")
        path = f"/api2/json/nodes/pve1/qemu/{MAC_GUEST}/config"
        writes = [body for method, where, body in self.pve.requests[self.writes:]
                  if where == path and method in ("POST", "PUT")]
        mac = str(self.pve.guest(MAC_GUEST).config.get("net0", ""))
        print(f"\n== fakepve received {len(writes)} config write(s) for guest {MAC_GUEST} since v3; its net0 is now "
              f"{mac}")
        code, _ = self.pve_hub("status")
        page = f"{self.web}clusters/{CLUSTER}/nodes/pve1%40{CLUSTER}/guests/{MAC_GUEST}"
        with urllib.request.urlopen(page, timeout=10) as answer:
            html = answer.read().decode()
        synced = "in_sync" in html and not any(len(row) > 3 and row[3] == "differs" for row in self.page_rows(page))
        print(f"\n$ GET {page}\n  guest {MAC_GUEST}: {'in_sync, no key differs' if synced else 'NOT in sync'}")
        running = self.pve.guest(self.drifted).status == "running"
        return 0 if len(writes) == 1 and MAC_NEW in mac.upper() and code == 0 and synced and running else 1

    def kill(self) -> int:
        """SIGKILL the last node's executor: `pve-hub status` shows it STALE (exit 4) within two report intervals."""
        last = self.nodes[-1]
        interval = status(self.hub)[last].report_interval_seconds
        pid = self.procs.kill(last)
        killed = time.monotonic()
        print(f"\n== kill -9 {pid} (the executor of {last}); its report interval is {interval:.1f} s")
        wait(lambda: status(self.hub)[last].stale, f"{last} stale", timeout=4 * interval + 5)
        took = time.monotonic() - killed
        code, out = self.pve_hub("status")
        print(f"== {last} STALE {took:.1f} s after the kill (two report intervals: {2 * interval:.1f} s)")
        return 0 if code == 4 and "STALE" in out and took <= 2 * interval + 1 else 1


def converged(pve: Any, number: int) -> bool:
    """Node ``number``'s guests as desired."""
    web, db = pve.guest(number * 100), pve.guest(number * 100 + 1)
    return (web.status, str(web.config.get("memory")), db.config.get("tags")) == ("running", "2048", "demo")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 when every node converged and refused the forgery."""
    parser = argparse.ArgumentParser(prog="demo_hub.py", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, choices=(1, 2, 3), default=3, help="nodes in the cluster (default 3)")
    parser.add_argument("--keep", action="store_true", help="at the end leave everything running until Ctrl-C "
                                                            "(to browse the hub's web page)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the hub demo needs root: a trust store must be owned by root, as on a node (run: sudo make demo-hub)")
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pve-reconcile-demo-hub-") as tmp:
        code = run(Path(tmp), ALL_NODES[:args.nodes], keep=args.keep)
    print(f"{'done' if code == 0 else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
