"""The Proxmox writer: every mutating call, held only by the safety gate (``executor.gate``).

A module of its own so that an import-linter contract can name who may import it: the gate, and
the daemon that wires the gate up. Nothing else in the executor can reach a mutating call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from executor.pve import QEMU, Session


class ProxmoxWriter:
    """``PveWriter`` over the reader's session (one HTTPS session per process)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def start(self, guest_type: str, vmid: int) -> str:
        """POST .../status/start."""
        return str(self._session.call(lambda api: self._session.guest(api, guest_type, vmid).status.start.post()))

    def shutdown(self, guest_type: str, vmid: int, timeout: int, force: bool) -> str:
        """POST .../status/shutdown with PVE's own timeout and forceStop fallback."""
        params = {"timeout": timeout, "forceStop": 1 if force else 0}
        return str(self._session.call(
            lambda api: self._session.guest(api, guest_type, vmid).status.shutdown.post(**params)))

    def set_config(self, guest_type: str, vmid: int, values: Mapping[str, str], delete: Sequence[str],
                   digest: str) -> str | None:
        """QEMU: POST (a qmconfig task); LXC: PUT (synchronous). The digest guards both."""
        params: dict[str, Any] = dict(values)
        if delete:
            params["delete"] = ",".join(delete)
        if digest:
            params["digest"] = digest
        guest = self._session.guest
        if guest_type == QEMU:
            answer = self._session.call(lambda api: guest(api, guest_type, vmid).config.post(**params))
        else:
            answer = self._session.call(lambda api: guest(api, guest_type, vmid).config.put(**params))
        return str(answer) if answer else None
