"""The Proxmox writer: every mutating call, held only by the gate's lane (``executor.gate.lane``).

A module of its own so that an import-linter contract can name who may import it: only the daemon,
which wires the writer into the gate. Nothing else in the executor can reach a mutating call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from executor.pve.node import QEMU, PveError, Session
from safety.keys import API_PARAMETERS

_KEY = re.compile(r"[a-z][a-z0-9_.-]*", re.ASCII)  # one config key (raw LXC keys have dots)


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
                   digest: str, *, force: bool = False) -> str | None:
        """QEMU: POST (a qmconfig task); LXC: PUT (synchronous). The digest guards both.

        ``force`` (QEMU only; PVE requires a delete with it) frees a deleted disk's volume instead of
        keeping it as ``unusedN``. LXC's config API has no such flag: refused here, before any request.
        """
        # PVE splits a delete list on commas, semicolons, whitespace and NUL: a key is one plain name or nothing.
        bad = sorted(set(values) & API_PARAMETERS) + [k for k in delete if not _KEY.fullmatch(k) or k in API_PARAMETERS]
        if bad:  # the last line of defence: a key named like a parameter would become that parameter
            raise PveError(f"config keys {', '.join(map(repr, bad))} are parameters of PVE's config call or not one "
                           "key", 400)
        params: dict[str, Any] = dict(values)
        if delete:
            params["delete"] = ",".join(delete)
        if digest:
            params["digest"] = digest
        if force:
            if guest_type != QEMU or not delete:
                raise PveError("force frees deleted QEMU disks only: LXC's config has no force, and it needs a "
                               "delete", 400)
            params["force"] = 1
        guest = self._session.guest
        if guest_type == QEMU:
            answer = self._session.call(lambda api: guest(api, guest_type, vmid).config.post(**params))
        else:
            answer = self._session.call(lambda api: guest(api, guest_type, vmid).config.put(**params))
        return str(answer) if answer else None

    def destroy(self, guest_type: str, vmid: int, *, purge: bool, destroy_unreferenced_disks: bool) -> str:
        """DELETE /nodes/{n}/{type}/{vmid}: qmdestroy or vzdestroy. Never ``skiplock``, never LXC's ``force``."""
        params = {name: 1 for name, on in (("purge", purge),
                                           ("destroy-unreferenced-disks", destroy_unreferenced_disks)) if on}
        return str(self._session.call(lambda api: self._session.guest(api, guest_type, vmid).delete(**params)))

    def resize(self, guest_type: str, vmid: int, disk: str, size: str, digest: str) -> str | None:
        """PUT .../resize with an absolute size (no ``+``) and the digest: a ``resize`` task on PVE 8+."""
        params: dict[str, Any] = {"disk": disk, "size": size}
        if digest:
            params["digest"] = digest
        answer = self._session.call(lambda api: self._session.guest(api, guest_type, vmid).resize.put(**params))
        return str(answer) if answer else None

    def snapshot(self, guest_type: str, vmid: int, snapname: str, *, vmstate: bool) -> str:
        """POST .../snapshot: qmsnapshot or vzsnapshot (``vmstate`` exists for QEMU only)."""
        params: dict[str, Any] = {"snapname": snapname}
        if vmstate:
            if guest_type != QEMU:
                raise PveError("vmstate: LXC snapshots have no RAM state", 400)
            params["vmstate"] = 1
        return str(self._session.call(
            lambda api: self._session.guest(api, guest_type, vmid).snapshot.post(**params)))

    def rollback(self, guest_type: str, vmid: int, snapname: str) -> str:
        """POST .../snapshot/{snapname}/rollback: qmrollback or vzrollback (never ``start``)."""
        return str(self._session.call(
            lambda api: self._session.guest(api, guest_type, vmid).snapshot(snapname).rollback.post()))

    def delete_snapshot(self, guest_type: str, vmid: int, snapname: str, *, force: bool) -> str:
        """DELETE .../snapshot/{snapname}: qmdelsnapshot or vzdelsnapshot."""
        params = {"force": 1} if force else {}
        return str(self._session.call(
            lambda api: self._session.guest(api, guest_type, vmid).snapshot(snapname).delete(**params)))
