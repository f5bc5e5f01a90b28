"""Realistic PlanRequests for benchmarks and large-snapshot tests."""

from __future__ import annotations

from planner.v1 import planner_pb2 as pb


def snapshot(n: int, drift_every: int = 100) -> pb.PlanRequest:
    """``n`` running QEMU guests as PVE reports them; one in ``drift_every`` has drifted memory.

    Actual configs carry what a PVE config answer does (generated MAC, vmgenid, smbios1, disks);
    desired declares power, six keys (some in a different spelling than PVE's) and a description.
    """
    request = pb.PlanRequest()
    for i in range(n):
        vmid = 100 + i
        mac = f"BC:24:11:{i >> 16 & 255:02X}:{i >> 8 & 255:02X}:{i & 255:02X}"
        request.actual.add(
            vmid=vmid, type=pb.GUEST_TYPE_QEMU, run_state=pb.RUN_STATE_RUNNING, config_known=True,
            digest=f"{vmid:040x}",
            config={
                "name": f"vm{vmid}", "memory": "4096", "cores": "2", "sockets": "1", "onboot": "1",
                "ostype": "l26", "scsihw": "virtio-scsi-single", "boot": "order=scsi0;net0", "agent": "1",
                "net0": f"virtio={mac},bridge=vmbr0,firewall=1", "cpu": "x86-64-v2-AES",
                "scsi0": f"local-lvm:vm-{vmid}-disk-0,iothread=1,size=32G", "tags": "prod;web",
                "smbios1": "uuid=7b1c5e8e-1f4f-4c1e-9a55-6f5c1e2d3a4b", "vmgenid": "0a1b2c3d-1111-2222",
                "description": "web tier\n",
            },
        )
        guest = request.desired.add(vmid=vmid, run_state=pb.RUN_STATE_RUNNING, description="web tier")
        guest.spec.config.update({
            "memory": "8192" if i % drift_every == 0 else "4096", "cores": "2", "onboot": "1",
            "net0": "virtio,bridge=vmbr0,firewall=1", "tags": "web,prod", "ostype": "l26",
        })
    return request
