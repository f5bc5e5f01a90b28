"""Who calls a gRPC service, per call: the kernel's word on a Unix socket, else the certificate or the address.

``CallerInterceptor`` names the caller of every call before its handler runs, refuses a call that
reached a fronted server's private socket without the front (nobody vouches for it), logs the
audited methods with the caller (``api_call``), and lets the handler read the caller with ``current()``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from common.unixfront import UnixFront

log = structlog.get_logger("common.callers")


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """One call's caller; ``key`` is what a per-caller limit counts by (``uid:N``, ``tls:NAME``, ``ip:HOST``)."""

    key: str
    peer: str
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None

    def fields(self) -> dict[str, object]:
        """The caller as log fields (uid, gid and pid only when the kernel named them)."""
        named = {"uid": self.uid, "gid": self.gid, "pid": self.pid}
        return {"caller": self.key, "peer": self.peer, **{k: v for k, v in named.items() if v is not None}}


NOBODY = Caller(key="", peer="")  # outside a call (in-process use): one shared key
_CURRENT: ContextVar[Caller] = ContextVar("caller", default=NOBODY)


def current() -> Caller:
    """The caller of the call this thread is handling (NOBODY outside one)."""
    return _CURRENT.get()


def host_of(peer: str) -> str:
    """The address part of a gRPC peer string: ``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``, ``ipv6:[::1]:5`` -> ``::1``.

    The port is left out: a caller picks a new one with each connection, so it names nobody.
    """
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def identify(context: grpc.ServicerContext, front: UnixFront | None) -> Caller | None:
    """The call's caller; None when the server is fronted and the call did not come through the front."""
    peer = str(context.peer())
    if front is not None:
        cred = front.credentials(peer)
        if cred is None:
            return None
        return Caller(key=f"uid:{cred.uid}", peer=f"unix:{front.path}", pid=cred.pid, uid=cred.uid, gid=cred.gid)
    names = context.peer_identities()  # mutual TLS: the client certificate's names
    if names:
        return Caller(key="tls:" + bytes(names[0]).decode("utf-8", "replace"), peer=peer)
    return Caller(key=f"ip:{host_of(peer)}", peer=peer)


Behavior = Callable[[Any, grpc.ServicerContext], Any]
CALLS_PER_CALLER = 4  # calls one caller may have in progress at once (streams included); the server has more workers


class CallerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Names each call's caller; refuses the unvouched; logs ``audited`` methods as ``api_call``."""

    def __init__(self, front: UnixFront | None, audited: frozenset[str], *, per_caller: int = CALLS_PER_CALLER) -> None:
        self._front, self._audited, self._per_caller = front, audited, per_caller
        self._lock = threading.Lock()
        self._busy: collections.Counter[str] = collections.Counter()  # calls in progress, by caller key

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        """The method's handler, wrapped."""
        handler = continuation(details)
        if handler is None:
            return None
        method = str(details.method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method),
                                                        handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream),
                                                     handler.request_deserializer, handler.response_serializer)

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        caller = identify(context, self._front)
        if caller is None:  # only the daemon's own user can reach the private socket; still, nobody vouches
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "this API answers through its socket only")
        assert caller is not None
        return caller

    def _enter(self, caller: Caller, context: grpc.ServicerContext) -> None:
        """Take one of the caller's call slots, or refuse the call at once: one caller (a member of the socket's
        group holding idle streams) must never hold every worker of the server."""
        with self._lock:
            full = self._busy[caller.key] >= self._per_caller
            if not full:
                self._busy[caller.key] += 1
        if full:
            log.warning("api_caller_busy", limit=self._per_caller, **caller.fields())
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self._per_caller} calls of this caller are in progress: wait for one to end")

    def _leave(self, caller: Caller) -> None:
        with self._lock:
            self._busy[caller.key] -= 1
            if not self._busy[caller.key]:
                del self._busy[caller.key]

    def _unary(self, behavior: Behavior, method: str) -> Behavior:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            caller = self._caller(context)
            if method in self._audited:
                log.info("api_call", method=method, **caller.fields())
            self._enter(caller, context)
            token = _CURRENT.set(caller)
            try:
                return behavior(request, context)
            finally:
                _CURRENT.reset(token)
                self._leave(caller)
        return call

    def _stream(self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Behavior:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            caller = self._caller(context)
            self._enter(caller, context)
            try:
                yield from behavior(request, context)
            finally:
                self._leave(caller)
        return call
