"""`make demo`: the whole loop on this machine, against an embedded fake Proxmox.

Starts fakepve (a faithful fake of the PVE API, HTTPS on loopback, a test/demo dependency only; answering like PVE
where it does not, ``tests/pve_like.py``)
with a few guests, the planner service, and the executor with a sample desired-state file; shows
the plan, converges, shows the result. Then the safety core: two operators' keys and a trust
store, the daemon serving its API, a disk detach proposed, refused with one signature, run with
two, refused when replayed. Then it stops everything it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fakepve.certs import make_cert

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# fakepve reshaped where its QEMU side answers unlike PVE (the config read is PVE's pending-applied view, the digest
# covers the pending section): on plain fakepve a running guest's staged memory change reads as undone, and the demo
# would show it written again on every tick, as no real node does.
from tests.pve_like import PveLike  # noqa: E402

DESIRED = """\
guests:
  - vmid: 100                 # QEMU, stopped: start it with more memory and a description
    state: running
    config: {memory: 4096, cores: 2, onboot: true, tags: "web,prod", net0: "virtio,bridge=vmbr0"}
    description: web tier
  - vmid: 101                 # LXC, running: stop it, change its memory
    state: stopped
    config: {memory: 1024}
  - vmid: 102                 # locked by a backup: skipped, with the reason
    state: stopped
  - vmid: 103                 # its disk differs: data-bearing, never written, reported
    config: {scsi0: "local-lvm:vm-103-disk-0,size=64G"}
"""


class Fake:
    """fakepve on its own event loop in a thread."""

    def __init__(self, certfile: str, keyfile: str) -> None:
        self.pve = PveLike(user="root@pam", password="secret", host="127.0.0.1", port=0)
        self.pve.time_scale = 0.002
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self.pve.start(certfile, keyfile))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self._call(self.pve.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def guests(pve: Any) -> None:
    """Add the sample node's guests."""
    pve.add_vm(100, "web", status="stopped", config={"memory": 2048, "cores": 1, "ostype": "l26",
                                                     "net0": "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0,firewall=1"})
    pve.add_ct(101, "cache", status="running", config={"memory": 512, "hostname": "cache"})
    pve.add_vm(102, "db", status="running", config={"memory": 8192})
    pve.snapshot_lock(102, "backup")
    pve.add_vm(103, "files", status="running", config={"scsi0": "local-lvm:vm-103-disk-0,size=32G"})
    pve.add_vm(104, "scratch", status="stopped", config={"memory": 1024, "scsi0": "local-lvm:vm-104-disk-0,size=8G",
                                                         "scsi1": "local-lvm:vm-104-disk-1,size=4G"})
    pve.add_vm(900, "not-managed", status="running", config={"memory": 1024})


def show(pve: Any, title: str) -> None:
    """The node as the fake holds it."""
    print(f"\n== {title}")
    for vmid in (100, 101, 102, 103, 104, 900):
        guest = pve.guest(vmid)
        config = {k: guest.config[k] for k in ("memory", "cores", "onboot", "tags", "description", "scsi0", "scsi1")
                  if k in guest.config}
        print(f"  {vmid} {guest.status:8} {config}")


ROLES = """\
version = 1
[[roles]]
name = "destroyer"
kinds = ["config.disk_detach", "guest.destroy"]
classes = ["DESTRUCTIVE"]
audiences = ["pve1@fakecluster"]
vmids = ["100-199"]
max_ttl = "1h"
threshold = 2
"""


def signed_ops(base: list[str], tmp: Path, pve: Any) -> int:
    """Two keys, a trust store, the daemon's API, and a detach approved by two operators (0 when it ran once)."""
    cli = [sys.executable, "-m", "executor"]
    entries = []
    for name in ("alice", "bob"):
        out = subprocess.run([*cli, "keys", "generate", "--out", str(tmp / f"{name}.key"), "--owner",
                              f"{name}@example.org"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        entries.append(out.replace("roles = []", 'roles = ["destroyer"]'))
    trust = tmp / "trust.toml"
    trust.write_text(ROLES + "\n" + "\n".join(entries))
    trust.chmod(0o644)
    print("\n== the trust store (two destroyers, threshold 2)\n" + trust.read_text())
    api = f"unix:{tmp / 'run' / 'executor.sock'}"  # a node uses /run/pve-reconcile/executor.sock, the default
    print(f"== the daemon's API: {api} (try: grpcurl -plaintext -unix {api.removeprefix('unix:')} list)")
    daemon = subprocess.Popen([*base[:3], "run", *base[3:], "--state-dir", str(tmp / "state"), "--interval", "1",
                               "--trust-store", str(trust), "--listen", api, "--log-format", "json"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        operator = [*cli, "op"]
        for _ in range(100):  # the API serves once recovery is done
            ready = subprocess.run([*cli, "pending", "--api", api], cwd=ROOT, capture_output=True, check=False)
            if ready.returncode == 0:
                break
            time.sleep(0.1)
        proposal, single, double = tmp / "detach.json", tmp / "detach.op", tmp / "detach2.op"
        print("== pve-executor op propose --vmid 104 config.disk_detach delete=scsi1")
        proposal.write_text(subprocess.run([*operator, "propose", "--api", api, "--vmid", "104", "config.disk_detach",
                                            "delete=scsi1"], cwd=ROOT, capture_output=True, text=True,
                                           check=True).stdout)
        print(proposal.read_text())
        print("== pve-executor op sign --key alice.key --role destroyer (what alice is shown)")
        subprocess.run([*operator, "sign", "--key", str(tmp / "alice.key"), "--role", "destroyer", "--yes", "--reason",
                        "retire the scratch disk", "--out", str(single), str(proposal)], cwd=ROOT, check=True)
        print("\n== pve-executor op submit (one signature)")
        subprocess.run([*operator, "submit", "--api", api, str(single)], cwd=ROOT, check=False)
        print("\n== pve-executor op cosign --key bob.key, then op submit")
        double.write_bytes(single.read_bytes())
        subprocess.run([*operator, "cosign", "--key", str(tmp / "bob.key"), "--yes", str(double)], cwd=ROOT,
                       check=True, stderr=subprocess.DEVNULL)
        subprocess.run([*operator, "submit", "--api", api, str(double)], cwd=ROOT, check=False)
        for _ in range(100):
            if "scsi1" not in pve.guest(104).config:
                break
            time.sleep(0.1)
        show(pve, "the node after the approved detach")
        print("\n== pve-executor op submit (the same envelope again)")
        replay = subprocess.run([*operator, "submit", "--api", api, str(double)], cwd=ROOT, check=False)
        ran_once = "scsi1" not in pve.guest(104).config and replay.returncode != 0
        return 0 if ran_once else 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:  # never leave it behind
            daemon.kill()
            daemon.wait()


def main() -> int:
    """Run the demo; exit code 0 when the node converged."""
    with tempfile.TemporaryDirectory(prefix="pve-reconcile-demo-") as tmp:
        certfile, keyfile, _ = make_cert(tmp, hosts=("127.0.0.1",))
        fake = Fake(certfile, keyfile)
        planner = None
        try:
            guests(fake.pve)
            show(fake.pve, "the node before")
            planner = subprocess.Popen([sys.executable, "-m", "planner", "serve", "--listen", "127.0.0.1:0",
                                        "--log-format", "json"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            assert planner.stderr is not None
            address = next(json.loads(line)["address"] for line in planner.stderr
                           if json.loads(line)["event"] == "planner_listening")
            desired, password = Path(tmp, "desired.yaml"), Path(tmp, "password")
            desired.write_text(DESIRED)
            password.write_text("secret\n")
            base = [sys.executable, "-m", "executor", "--node", "pve1", "--pve-url",
                    f"https://127.0.0.1:{fake.pve.port}", "--pve-user", "root@pam", "--pve-password-file",
                    str(password), "--pve-ca-file", certfile, "--planner", address, "--desired", str(desired)]

            def executor(command: str, *extra: str) -> int:
                return subprocess.run([*base[:3], command, *base[3:], *extra], cwd=ROOT, check=False).returncode

            print(f"\n== desired state ({desired.name})\n{DESIRED}")
            print("== pve-executor plan (dry run)")
            executor("plan")
            print("\n== pve-executor run --once (converge)")
            code = executor("run", "--once", "--state-dir", str(Path(tmp, "state")))
            show(fake.pve, "the node after")
            print("\n== pve-executor plan (again)")
            executor("plan")
            if code == 0 and os.geteuid() == 0:  # the trust store must be root-owned, as on a node
                code = signed_ops(base, Path(tmp), fake.pve)
            elif code == 0:
                print("\n(signed operations skipped: the trust store must be root-owned; run the demo as root)")
            return code
        finally:
            if planner is not None:
                planner.send_signal(signal.SIGTERM)
                planner.wait(15)
            fake.stop()
            print("\nstopped the planner and the fake Proxmox")


if __name__ == "__main__":
    sys.exit(main())
