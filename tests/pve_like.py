"""fakepve answering like PVE where it does not: a QEMU guest's config read, NIC writes, the digest.

fakepve is faithful on most of the API, but three answers of its QEMU side differ from PVE's own
(qemu-server), and each one hides a case a reconcile loop must handle:

- ``GET .../qemu/{vmid}/config`` gives the *current* values; PVE gives the config **with the pending
  changes applied**, and the running values only with ``current=1`` (PVE::API2::Qemu ``vm_config``:
  "Get the virtual machine configuration with pending configuration changes applied. Set the
  'current' parameter to get the current configuration instead"; it calls
  ``PVE::QemuConfig->load_current_config($vmid, $param->{current})``, which lays the [PENDING]
  section over the config unless ``current`` is set, then drops ``pending`` and ``snapshots``).
  ``snapshot`` and ``current`` together are PVE's 400. (fakepve's LXC side already answers so.)
- A ``netN`` written without a MAC keeps none on fakepve; PVE draws one (PVE::API2::Qemu
  ``$update_vm_api``: "# add macaddr", ``PVE::QemuServer::Network::parse_net`` sets ``macaddr`` to
  ``PVE::Tools::random_ether_addr`` when the value has none, ``print_net`` writes it ``model=MAC``).
- The digest covers the config only; PVE's is the SHA-1 of the whole file, [PENDING] section
  included (PVE::QemuServer ``parse_vm_config``: ``digest => Digest::SHA::sha1_hex($raw)``), so a
  write that only stages a change moves it too. And PVE drops pending entries that change nothing
  (``PVE::QemuConfig->cleanup_pending`` after every update): writing the current value back clears it.

``PveLike`` is fakepve itself (its HTTPS server, its model, its request log), with those handlers
reshaped; everything else answers as fakepve does. A test module opts in by overriding the
``fakepve`` fixture with ``serving`` (so ``connect``, ``node``, ``make_engine`` all talk to it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from fakepve import schema as pve_schema
from fakepve.model import FakeVm, PveError
from fakepve.pytest_plugin import _Serving
from fakepve.qemu import with_mac
from fakepve.server import FakePve, ok, params

NET = re.compile(r"net\d+")


class PveLikeVm(FakeVm):  # type: ignore[misc]  # fakepve has no type hints
    """A QEMU guest whose digest covers its pending section, as the file PVE hashes holds it."""

    def digest(self) -> str:
        """SHA-1 over the config and the pending section (and the snapshots, as fakepve's)."""
        blob = [self.config, self.pending, self.snapshots]
        return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()


class _Guests(list[Any]):
    """fakepve's VM list; every VM added (add_vm, create, clone) becomes a ``PveLikeVm``."""

    def append(self, vm: Any) -> None:
        if type(vm) is FakeVm:
            vm.__class__ = PveLikeVm  # same fields, one method more faithful: no copy, no lost reference
        super().append(vm)


class PveLike(FakePve):  # type: ignore[misc]  # fakepve has no type hints
    """fakepve whose QEMU config read, NIC writes and digest answer as PVE's do (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vms = _Guests()

    async def _config_get(self, request: web.Request) -> web.Response:
        """PVE's vm_config: the pending-applied view unless ``current=1``; ``snapshot`` with ``current`` is a 400."""
        query = await params(request)
        current = pve_schema.parse_boolean(str(query.get("current", "0"))) == "1"
        if current and query.get("snapshot"):
            text = "cannot use 'snapshot' parameter with 'current'"
            raise PveError(400, "Parameter verification failed.", {"snapshot": text, "current": text})
        vm = self._vm(request, "VM.Audit")
        config = dict(vm.config)
        if not current:  # AbstractConfig load_current_config: pending values over the config, pending deletes out
            for key, value in vm.pending.items():
                if value is None:
                    config.pop(key, None)
                else:
                    config[key] = value
        if "memory" in config:
            config["memory"] = str(config["memory"])  # PVE sends it as a string (as fakepve does)
        config["digest"] = vm.digest()
        answer: web.Response = ok(config)
        return answer

    async def _apply_config(self, vm: Any, user: str, p: dict[str, Any]) -> None:
        """fakepve's update, with PVE's MAC for a NIC written without one, and cleanup_pending after it."""
        drawn = {key: with_mac(value) for key, value in p.items() if NET.fullmatch(key)}
        await super()._apply_config(vm, user, {**p, **drawn})
        for key, value in list(vm.pending.items()):
            if (value is None and key not in vm.config) or (value is not None and vm.config.get(key) == value):
                del vm.pending[key]  # PVE::QemuConfig->cleanup_pending: an entry that changes nothing is dropped


@contextmanager
def serving(pki: tuple[str, str], **options: Any) -> Iterator[PveLike]:
    """A started ``PveLike`` on 127.0.0.1 with a free port, as the ``fakepve`` fixture serves its FakePve.

    ``pki``: the plugin's (certfile, keyfile) (the ``_fakepve_pki`` fixture); ``options``: ``time_scale``.
    """
    pve = PveLike(host="127.0.0.1", port=0)
    pve.time_scale = options.get("time_scale", 0)
    running = _Serving(pve, *pki)
    try:
        yield pve
    finally:
        running.stop()
