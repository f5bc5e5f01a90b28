"""Red team (issue 13, second pass): blast radius, replays and the digest ABA, the API socket.

Each hole is an ``xfail(strict=True)`` test that shows it against a real engine on fakepve (HTTPS),
a real journal and, for the API, the real Unix-socket front; each counts what Proxmox received.
The plain tests are attacks that held, kept because they show why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.desired import FileProvider, provider_source
from executor.engine import Engine
from safety.classify import Source
from tests.test_blast_drain import stopped, write_hub

Make = Callable[..., Engine]


# --- blast radius ---------------------------------------------------------------------------------------------

@pytest.mark.xfail(strict=True, reason="H-A: guests stopped before the hub came count as managed and running: "
                   "a hub that declares them (no run state) dilutes the half rule and stops every running guest")
def test_a_hub_drains_every_running_guest_by_declaring_the_stopped_ones(fakepve: Any, make_engine: Make,
                                                                      tmp_path: Path) -> None:
    """Five running guests, five stopped by their owners (off, or templates). The hub declares all ten, the
    five stopped ones with no run state, and the five running ones stopped. ``managed`` is ten and nothing
    counts as already stopped, so 2 * stops never exceeds it: three windows later the node runs nothing,
    no approval asked."""
    for vmid in range(100, 110):
        fakepve.add_vm(vmid, f"vm{vmid}", status="running" if vmid < 105 else "stopped")
    desired = tmp_path / "desired.yaml"
    write_hub(desired, {**{v: "stopped" for v in range(100, 105)}, **{v: None for v in range(105, 110)}})
    engine = make_engine([], stop_window=0.0)  # every tick a new window: only the half rule holds the hub
    engine.provider = FileProvider(desired)
    assert provider_source(engine.provider) is Source.HUB
    refusals = []
    for _ in range(4):
        refusals.extend(engine.tick(wait=True).refusals)
    running = sorted(vm.vmid for vm in fakepve.vms if vm.status == "running")
    assert running, f"the hub stopped every running guest of the node ({stopped(fakepve)}), refusals: {refusals}"
