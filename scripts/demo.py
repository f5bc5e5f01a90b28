"""`make demo`: start the planner on loopback, send it a sample snapshot, show the plan, stop it.

The executor issue extends this into the full loop against an embedded fake Proxmox.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from planner.v1 import planner_pb2 as pb
from planner.v1 import planner_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


def sample() -> pb.PlanRequest:
    """A node with five guests and a declared state for four of them."""
    request = pb.PlanRequest()
    request.actual.add(vmid=100, type=pb.GUEST_TYPE_QEMU, run_state=pb.RUN_STATE_STOPPED, config_known=True,
                       digest="3f2a", config={"name": "web", "memory": "2048", "onboot": "0", "tags": "web",
                                              "net0": "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0,firewall=1",
                                              "description": "web tier\n"})
    request.actual.add(vmid=101, type=pb.GUEST_TYPE_LXC, run_state=pb.RUN_STATE_RUNNING, config_known=True,
                       digest="9c1d", config={"hostname": "cache", "memory": "512", "swap": "512",
                                              "rootfs": "local-lvm:vm-101-disk-0,size=8G"})
    request.actual.add(vmid=102, type=pb.GUEST_TYPE_QEMU, run_state=pb.RUN_STATE_RUNNING, config_known=True,
                       digest="77ab", lock="backup", config={"name": "db"})
    request.actual.add(vmid=900, type=pb.GUEST_TYPE_QEMU, run_state=pb.RUN_STATE_RUNNING, config_known=True,
                       digest="0001", config={"name": "unmanaged"})
    web = request.desired.add(vmid=100, run_state=pb.RUN_STATE_RUNNING, description="web tier")
    web.spec.config.update({"memory": "4096", "onboot": "true", "tags": "web,prod",
                            "net0": "virtio,bridge=vmbr0,firewall=on"})
    cache = request.desired.add(vmid=101, run_state=pb.RUN_STATE_STOPPED)
    cache.spec.config.update({"memory": "512", "rootfs": "local-lvm:vm-101-disk-0,size=16G"})
    request.desired.add(vmid=102, run_state=pb.RUN_STATE_STOPPED)
    request.desired.add(vmid=150, run_state=pb.RUN_STATE_RUNNING)
    return request


def show(response: pb.PlanResponse) -> None:
    """Print the plan as a person reads it."""
    print("plan:")
    for action in response.actions:
        kind = action.WhichOneof("kind")
        guest = f"  {pb.GuestType.Name(action.type).removeprefix('GUEST_TYPE_').lower()} {action.vmid}"
        if kind == "set_config":
            changes = ", ".join(f"{k}={v}" for k, v in sorted(action.set_config.set.items()))
            deletes = "".join(f", delete {k}" for k in action.set_config.delete)
            print(f"{guest}: set {changes}{deletes} (digest {action.set_config.digest})")
        else:
            print(f"{guest}: {kind}")
    print("skipped:")
    for skip in response.skipped:
        print(f"  {skip.vmid}: {pb.SkipReason.Name(skip.reason).removeprefix('SKIP_REASON_').lower()}: {skip.detail}")


def main() -> int:
    """Start, plan, show, stop."""
    proc = subprocess.Popen([sys.executable, "-m", "planner", "serve", "--listen", "127.0.0.1:0",
                             "--log-format", "json"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        address = next(json.loads(line)["address"] for line in proc.stderr
                       if json.loads(line)["event"] == "planner_listening")
        print(f"planner listening on {address}")
        with grpc.insecure_channel(address) as channel:
            show(pb_grpc.PlannerServiceStub(channel).Plan(sample(), timeout=10))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    print(f"planner stopped (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
