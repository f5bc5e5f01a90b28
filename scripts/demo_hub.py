"""`make demo-hub`: one signed desired state served by the hub to every node of a fake three-node cluster.

Starts fakepve with three nodes (pve1-3, cluster `fakecluster`), the planner, one `pve-hub serve` (SQLite in a
temporary state dir) and one `pve-executor run --hub` per node (each its own state dir and API socket, one
trust store whose `publisher` role grants `desired.apply` to the three nodes). alice applies a desired file
with `pve-hub apply`; every node verifies the signature, ACKs and converges; `pve-hub status` shows each node's
version and ACK. Then mallory, whose key no trust store holds, applies a forged version: the hub stores it (it
is a courier), every node NACKs it (UNKNOWN_KEY) and nothing changes. Then it stops every process it started,
by PID. Needs root (a trust store must be owned by root, as on a real node). `--nodes N` runs N nodes (1-3).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from fakepve.certs import make_cert

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


def role(nodes: tuple[str, ...]) -> str:
    """The trust store's role: desired.apply for every node of the cluster, one signature."""
    audiences = ", ".join(f'"{node}@{CLUSTER}"' for node in nodes)
    return ('version = 1\n[[roles]]\nname = "publisher"\nkinds = ["desired.apply"]\nclasses = ["APPROVAL"]\n'
            f'audiences = [{audiences}]\nmax_ttl = "1h"\nthreshold = 1\n')


def desired(nodes: tuple[str, ...]) -> str:
    """The cluster's desired file: on each node, start N00 with 2 GiB and tag N01 (a running guest)."""
    lines = ["guests:"]
    for number, _ in enumerate(nodes, start=1):
        lines += [f"  - vmid: {number}00", "    state: running", "    config: {memory: 2048}",
                  f"  - vmid: {number}01", "    config: {tags: demo}"]
    return "\n".join(lines) + "\n"


def guests(pve: Any, nodes: tuple[str, ...]) -> None:
    """Two guests per node: N00 stopped with 1 GiB, N01 running untagged."""
    for number, node in enumerate(nodes, start=1):
        pve.add_node(node)
        pve.add_vm(number * 100, f"web{number}", node=node, status="stopped", config={"memory": 1024})
        pve.add_vm(number * 100 + 1, f"db{number}", node=node, status="running", config={"memory": 4096})


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


def listening(log: Path, event: str) -> str:
    """The address a server logged (JSON line ``event``) in ``log``."""
    found: list[str] = []

    def seen() -> bool:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and json.loads(line).get("event") == event:
                found.append(json.loads(line)["address"])
                return True
        return False

    wait(seen, event)
    return found[0]


def keys(tmp: Path) -> str:
    """alice's, bob's and mallory's keys; the trust store entries of alice and bob (publishers)."""
    entries = []
    for name in ("alice", "bob", "mallory"):
        out = subprocess.run([*EXECUTOR, "keys", "generate", "--out", str(tmp / f"{name}.key"), "--owner",
                              f"{name}@example.org"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        if name != "mallory":  # mallory's key is in no trust store: the forger
            entries.append(out.replace("roles = []", 'roles = ["publisher"]'))
    return "\n".join(entries)


def status(hub: pb_grpc.HubServiceStub) -> dict[str, pb.NodeStatus]:
    """Each node's entry at the hub, by node name."""
    answer = hub.Status(pb.StatusRequest(cluster=CLUSTER), timeout=10)
    return {n.node.split("@")[0]: n for n in answer.nodes}


def run(tmp: Path, nodes: tuple[str, ...]) -> int:
    """The demo in ``tmp``; 0 when every node converged on v1 and NACKed the forgery."""
    certfile, keyfile, _ = make_cert(str(tmp), hosts=("127.0.0.1",))
    fake = Fake(certfile, keyfile)
    procs = Processes(tmp / "logs")
    try:
        guests(fake.pve, nodes)
        show(fake.pve, nodes, "the cluster before")
        trust = tmp / "trust.toml"
        trust.write_text(role(nodes) + "\n" + keys(tmp))
        trust.chmod(0o644)
        print("\n== the trust store every node holds (alice and bob publish; mallory is nobody)\n" + trust.read_text())
        hub_log = procs.start("pve-hub", [*PVE_HUB, "serve", "--listen", "127.0.0.1:0", "--state-dir",
                                          str(tmp / "hub"), "--heartbeat", "1", "--log-format", "json"])
        planner_log = procs.start("planner", [sys.executable, "-m", "planner", "serve", "--listen", "127.0.0.1:0",
                                              "--log-format", "json"])
        address, planner = listening(hub_log, "hub_listening"), listening(planner_log, "planner_listening")
        print(f"== pve-hub serve on {address} (SQLite in {tmp / 'hub'})")
        password = tmp / "password"
        password.write_text("secret\n")
        for node in nodes:
            procs.start(node, [*EXECUTOR, "run", "--node", node, "--pve-url", f"https://127.0.0.1:{fake.pve.port}",
                               "--pve-user", "root@pam", "--pve-password-file", str(password), "--pve-ca-file",
                               certfile, "--planner", planner, "--hub", address, "--hub-heartbeat", "1",
                               "--trust-store", str(trust), "--state-dir", str(tmp / f"state-{node}"),
                               "--listen", f"unix:{tmp / f'run-{node}' / 'executor.sock'}", "--interval", "1",
                               "--log-format", "json"])
        print(f"== pve-executor run --hub {address}, on {', '.join(nodes)}")
        channel = grpc.insecure_channel(address)
        hub = pb_grpc.HubServiceStub(channel)
        try:
            return converge_then_forge(tmp, fake.pve, nodes, hub, address)
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


def converged(pve: Any, number: int) -> bool:
    """Node ``number``'s guests as desired."""
    web, db = pve.guest(number * 100), pve.guest(number * 100 + 1)
    return (web.status, str(web.config.get("memory")), db.config.get("tags")) == ("running", "2048", "demo")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 when every node converged and refused the forgery."""
    parser = argparse.ArgumentParser(prog="demo_hub.py", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, choices=(1, 2, 3), default=3, help="nodes in the cluster (default 3)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the hub demo needs root: a trust store must be owned by root, as on a node (run: sudo make demo-hub)")
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pve-reconcile-demo-hub-") as tmp:
        code = run(Path(tmp), ALL_NODES[:args.nodes])
    print(f"{'done' if code == 0 else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
