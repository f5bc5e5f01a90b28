"""`make demo`: the whole loop on this machine, against an embedded fake Proxmox.

Starts fakepve (a faithful fake of the PVE API, HTTPS on loopback, a test/demo dependency only)
with a few guests, the planner service, and the executor with a sample desired-state file; shows
the plan, converges, shows the result, then stops everything it started.
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
from pathlib import Path
from typing import Any

from fakepve.certs import make_cert
from fakepve.server import FakePve

ROOT = Path(__file__).resolve().parent.parent
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
        self.pve = FakePve(user="root@pam", password="secret", host="127.0.0.1", port=0)
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
    pve.add_vm(900, "not-managed", status="running", config={"memory": 1024})


def show(pve: Any, title: str) -> None:
    """The node as the fake holds it."""
    print(f"\n== {title}")
    for vmid in (100, 101, 102, 103, 900):
        guest = pve.guest(vmid)
        config = {k: guest.config[k] for k in ("memory", "cores", "onboot", "tags", "description", "scsi0")
                  if k in guest.config}
        print(f"  {vmid} {guest.status:8} {config}")


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
            return code
        finally:
            if planner is not None:
                planner.send_signal(signal.SIGTERM)
                planner.wait(15)
            fake.stop()
            print("\nstopped the planner and the fake Proxmox")


if __name__ == "__main__":
    sys.exit(main())
