"""fakepve's answers tampered with on the wire: lost after PVE acted, late before it acted, malformed.

fakepve injects errors, drops and hangs *before* it handles a request; a lost answer (PVE took the
request, the answer never came back) and a malformed one (a string where an object belongs, a
config value of the wrong type, no digest) need a hook *after* it. ``AnswerFaults`` wraps the
server's request handler of one running fakepve (its ``_answer``, which runs after the request was
recorded in ``fakepve.requests``), so everything still goes over real HTTPS to the real fake.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(slots=True)
class _Fault:
    method: str
    suffix: str
    kind: str  # lost, late, swallowed
    secs: float
    freeze: bool = False
    times: int = 1


class AnswerFaults:
    """Installed on one fakepve for the life of the test; each fault hits the first matching request(s)."""

    def __init__(self, fakepve: Any) -> None:
        self._pve = fakepve
        self._answer = fakepve._answer  # the one hook after a request was recorded
        self._faults: list[_Fault] = []
        self._rewrites: list[tuple[str, str, Callable[[Any], Any]]] = []
        self._frozen_until = 0.0
        fakepve._answer = self._tampered

    def lose(self, method: str, suffix: str, secs: float, *, freeze: bool = False) -> None:
        """PVE handles the request, then its answer is held ``secs`` (the client times out first).

        ``freeze``: the node hangs meanwhile: every other request waits until the hold ends.
        """
        self._faults.append(_Fault(method, suffix, "lost", secs, freeze))

    def late(self, method: str, suffix: str, secs: float) -> None:
        """The request waits ``secs`` in PVE before it is handled (it arrived; PVE acts on it later)."""
        self._faults.append(_Fault(method, suffix, "late", secs))

    def swallow(self, method: str, suffix: str, secs: float) -> None:
        """The request is never handled: after ``secs`` the connection gets a bare 500 (no task exists)."""
        self._faults.append(_Fault(method, suffix, "swallowed", secs))

    def rewrite(self, method: str, suffix: str, change: Callable[[Any], Any]) -> None:
        """Every answer to ``method`` on a path ending with ``suffix`` has its ``data`` replaced by ``change(data)``."""
        self._rewrites.append((method, suffix, change))

    def stop_rewriting(self) -> None:
        """From now on, answers as fakepve gives them."""
        self._rewrites.clear()

    def _take(self, request: web.Request) -> _Fault | None:
        for fault in self._faults:
            if fault.times > 0 and request.method == fault.method and request.path.endswith(fault.suffix):
                fault.times -= 1
                return fault
        return None

    async def _tampered(self, request: web.Request, *args: Any) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        if self._frozen_until > loop.time():
            await asyncio.sleep(self._frozen_until - loop.time())
        fault = self._take(request)
        if fault is not None and fault.kind == "swallowed":
            await asyncio.sleep(fault.secs)
            return web.Response(status=500, text="swallowed")
        if fault is not None and fault.kind == "late":
            await asyncio.sleep(fault.secs)
        response = await self._answer(request, *args)
        if fault is not None and fault.kind == "lost":
            if fault.freeze:
                self._frozen_until = loop.time() + fault.secs
            await asyncio.sleep(fault.secs)
        return self._rewritten(request, response)

    def _rewritten(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        changes = [c for m, s, c in self._rewrites if request.method == m and request.path.endswith(s)]
        if not changes or not isinstance(response, web.Response) or response.status != 200 or response.text is None:
            return response
        body = json.loads(response.text)
        for change in changes:
            body["data"] = change(body.get("data"))
        return web.json_response(body)
