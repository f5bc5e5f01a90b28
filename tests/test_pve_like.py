"""The PVE-like layer over fakepve (``tests.pve_like``) answers as PVE's qemu-server does, over real HTTPS.

Each test names the PVE behaviour it checks; the last one shows plain fakepve still answers otherwise
(the day it answers like PVE, that test fails and the layer can go).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from executor.pve.node import Connection, ProxmoxNode, PveError
from tests import pve_like

MAC_NIC = re.compile(r"virtio=([0-9A-F]{2}:){5}[0-9A-F]{2},bridge=vmbr1")


@pytest.fixture(name="fakepve")
def _fakepve(_fakepve_pki: tuple[str, str]) -> Iterator[pve_like.PveLike]:
    """This module's fakepve answers like PVE."""
    with pve_like.serving(_fakepve_pki) as pve:
        yield pve


def config(node: ProxmoxNode, vmid: int, **query: Any) -> dict[str, Any]:
    """GET .../qemu/{vmid}/config as PVE's JSON has it (``query``: current, snapshot)."""
    answer: dict[str, Any] = node.session.call(lambda api: api.nodes("pve1").qemu(vmid).config.get(**query))
    return answer


def write(node: ProxmoxNode, vmid: int, **values: Any) -> None:
    """PUT .../qemu/{vmid}/config (PVE's synchronous config write)."""
    node.session.call(lambda api: api.nodes("pve1").qemu(vmid).config.put(**values))


def test_a_running_guests_config_read_is_pending_applied_unless_current(fakepve: Any, node: ProxmoxNode) -> None:
    """PVE::API2::Qemu vm_config: the config with the pending changes applied (a staged memory, a staged
    delete); ``current=1`` gives the running values; /pending lists both."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024, "cores": 2})
    write(node, 100, memory=2048, delete="cores")
    assert fakepve.vm(100).pending == {"memory": "2048", "cores": None}
    applied, running = config(node, 100), config(node, 100, current=1)
    assert (applied["memory"], "cores" in applied, running["memory"], running["cores"]) == ("2048", False, "1024", 2)
    assert applied["digest"] == running["digest"]
    section = node.pending("qemu", 100)
    assert (section.current["memory"], section.set, section.delete) == ("1024", {"memory": "2048"},
                                                                        frozenset({"cores"}))
    assert node.config("qemu", 100)[0]["memory"] == "2048"  # the executor's read is PVE's default one


def test_snapshot_and_current_together_are_refused(fakepve: Any, node: ProxmoxNode) -> None:
    """vm_config raises a parameter error for ``snapshot`` with ``current``."""
    fakepve.add_vm(100, "web", status="stopped")
    with pytest.raises(PveError, match="cannot use 'snapshot' parameter with 'current'") as caught:
        config(node, 100, current=1, snapshot="before")
    assert caught.value.status == 400


def test_a_nic_written_without_a_mac_gets_one_drawn(fakepve: Any, node: ProxmoxNode) -> None:
    """$update_vm_api "add macaddr": parse_net draws a MAC for a netN that has none, print_net writes it
    model=MAC; a MAC that is written stays; each write without one draws a new one."""
    fakepve.add_vm(100, "web", status="stopped", config={"net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"})
    write(node, 100, net1="virtio,bridge=vmbr1")
    first = config(node, 100)["net1"]
    assert MAC_NIC.fullmatch(first)
    write(node, 100, net1="virtio,bridge=vmbr1")
    assert MAC_NIC.fullmatch(config(node, 100)["net1"]) and config(node, 100)["net1"] != first
    write(node, 100, net2="e1000=BC:24:11:00:00:07,bridge=vmbr2")
    assert config(node, 100)["net2"] == "e1000=BC:24:11:00:00:07,bridge=vmbr2"


def test_a_write_that_only_stages_moves_the_digest(fakepve: Any, node: ProxmoxNode) -> None:
    """parse_vm_config: the digest is the SHA-1 of the whole file, [PENDING] included: staging a change moves
    it, and a write carrying the digest from before is refused."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024})
    before = config(node, 100)["digest"]
    write(node, 100, memory=2048, digest=before)
    assert config(node, 100)["digest"] != before and fakepve.vm(100).config["memory"] == 1024
    with pytest.raises(PveError, match="checksum mismatch"):
        write(node, 100, memory=4096, digest=before)


def test_writing_the_running_value_back_clears_the_pending_entry(fakepve: Any, node: ProxmoxNode) -> None:
    """cleanup_pending after each update: a pending value equal to the current one is dropped."""
    fakepve.add_vm(100, "web", status="running", config={"memory": "1024"})
    write(node, 100, memory=2048)
    write(node, 100, memory=1024)
    assert fakepve.vm(100).pending == {} and not node.pending("qemu", 100)


def test_a_start_applies_the_staged_change(fakepve: Any, node: ProxmoxNode) -> None:
    """After a restart the running values are the staged ones and nothing is pending (fakepve's own start)."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 1024})
    write(node, 100, memory=2048)
    node.session.call(lambda api: api.nodes("pve1").qemu(100).status.stop.post())
    node.session.call(lambda api: api.nodes("pve1").qemu(100).status.start.post())
    assert config(node, 100, current=1)["memory"] == "2048" and not node.pending("qemu", 100)


def test_plain_fakepve_still_answers_otherwise(_fakepve_pki: tuple[str, str],
                                               connect: Callable[..., Connection]) -> None:
    """Why the layer exists: fakepve's own QEMU config read gives the running values and keeps a NIC without
    a MAC. When this fails, fakepve answers like PVE and ``tests.pve_like`` can go."""
    from fakepve.pytest_plugin import _Serving  # noqa: PLC0415
    from fakepve.server import FakePve  # noqa: PLC0415

    plain = FakePve(host="127.0.0.1", port=0)
    plain.time_scale = 0
    served = _Serving(plain, *_fakepve_pki)
    try:
        plain.add_vm(100, "web", status="running", config={"memory": 1024})
        node = ProxmoxNode(connect(port=plain.port))
        write(node, 100, memory=2048, net1="virtio,bridge=vmbr1")
        assert (config(node, 100)["memory"], node.pending("qemu", 100).set["net1"]) == ("1024", "virtio,bridge=vmbr1")
    finally:
        served.stop()
