"""The web page's HTTP server: stdlib ThreadingHTTPServer on its own thread, GET and HEAD only, strict headers."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import jinja2
import structlog

from common.grpcserver import bind_error
from hub.store import StoreError
from hub.web import pages
from hub.web.fleet import Fleet, now_ms, state_name

log = structlog.get_logger("hub.web")
REFRESH_SECONDS = 10
# No script at all, styles only from this origin, nothing framed, no form posts anywhere.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
STYLE = resources.files("hub.web").joinpath("static/style.css").read_bytes()


def url(*segments: object) -> str:
    """An absolute path of quoted segments: ``url('clusters', c, 'nodes', n)`` (nothing in a name escapes it)."""
    return "/" + "/".join(quote(str(s), safe="") for s in segments)


def when(unix_ms: int) -> str:
    """A time as UTC, to the second."""
    return datetime.fromtimestamp(unix_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if unix_ms else "never"


def ago(unix_ms: int) -> str:
    """How long ago, in the largest unit that fits (``12 s ago``, ``3 min ago``...)."""
    if not unix_ms:
        return "never"
    seconds = max(0, (now_ms() - unix_ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def environment() -> jinja2.Environment:
    """The templates, every one autoescaped (whatever its name), undefined names an error."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("hub.web", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(url=url, when=when, ago=ago, state_name=state_name, refresh=REFRESH_SECONDS)
    return env


@dataclass(frozen=True, slots=True)
class Response:
    """What a request gets: status, content type, body."""

    status: HTTPStatus
    content_type: str
    body: bytes


class Site:
    """The pages over one fleet, rendered."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet, self.env = fleet, environment()

    def render(self, template: str, status: HTTPStatus = HTTPStatus.OK, **context: Any) -> Response:
        """A template as a UTF-8 HTML response."""
        body = self.env.get_template(template).render(**context).encode("utf-8")
        return Response(status, "text/html; charset=utf-8", body)

    def get(self, raw_path: str) -> Response:
        """The response to GET ``raw_path``."""
        path = urlsplit(raw_path).path
        if path == "/style.css":
            return Response(HTTPStatus.OK, "text/css; charset=utf-8", STYLE)
        segments = [unquote(s, errors="strict") for s in path.strip("/").split("/") if s] if path != "/" else []
        try:
            page = pages.route(self.fleet, segments)
        except pages.NotFound as exc:
            return self.render("error.html", HTTPStatus.NOT_FOUND, title="Not found", message=str(exc))
        except StoreError as exc:
            log.warning("hub.web.store_error", error=str(exc))
            return self.render("error.html", HTTPStatus.SERVICE_UNAVAILABLE, title="Store unavailable",
                               message="the hub cannot read its store; try again")
        return self.render(page.template, **page.context)


REQUEST_TIMEOUT = 10.0  # seconds a connection may idle (reading a request, or between keep-alive requests)
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host headers a loopback listener answers (a DNS-rebinding page names its own host); None: any."""
    if host not in LOOPBACK:
        return None  # reached by its address or through a proxy: the operator decides who reaches it
    return frozenset({f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"})


class _Handler(BaseHTTPRequestHandler):
    site: Site  # set on the subclass each server makes
    timeout = REQUEST_TIMEOUT  # a client that sends nothing is cut off: idle sockets never pin a thread each
    hosts: frozenset[str] | None = None  # set once the port is known (see allowed_hosts)
    server_version = "pve-hub"
    sys_version = ""

    def _send(self, response: Response, *, body: bool) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(response.body)

    def _answer(self, *, body: bool) -> None:
        if self.hosts is not None and self.headers.get("Host", "").lower() not in self.hosts:
            response = self.site.render("error.html", HTTPStatus.MISDIRECTED_REQUEST, title="Wrong host",
                                        message="this page answers only its loopback address")
            self._send(response, body=body)
            return
        try:
            response = self.site.get(self.path)
        except UnicodeDecodeError:
            response = self.site.render("error.html", HTTPStatus.NOT_FOUND, title="Not found", message="no such page")
        except Exception:  # a page that fails must not take the listener down; the log says why
            log.exception("hub.web.page_failed", path=self.path[:200])
            response = self.site.render("error.html", HTTPStatus.INTERNAL_SERVER_ERROR, title="Error",
                                        message="this page failed; the hub's log says why")
        self._send(response, body=body)

    def do_GET(self) -> None:
        """Serve a page."""
        self._answer(body=True)

    def do_HEAD(self) -> None:
        """A page's headers."""
        self._answer(body=False)

    def _refuse(self) -> None:
        response = self.site.render("error.html", HTTPStatus.METHOD_NOT_ALLOWED, title="Read-only",
                                    message="this page is read-only")
        self._send(response, body=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged one by one (the page refreshes itself every few seconds)."""


@dataclass(frozen=True, slots=True)
class WebEndpoint:
    """A running web page server."""

    server: ThreadingHTTPServer
    thread: threading.Thread
    port: int

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_web(listen: str, fleet: Fleet) -> WebEndpoint:
    """Serve the pages at http://HOST:PORT/ (port 0 picks one) on a thread; OSError "cannot listen on ..." if taken."""
    host, _, port = listen.rpartition(":")

    class Handler(_Handler):
        site = Site(fleet)

    host = host.strip("[]") or "127.0.0.1"
    kind = type("Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6 if ":" in host
                                                   else socket.AF_INET})
    try:
        server = kind((host, int(port)), Handler)
    except OSError as exc:
        raise bind_error(listen, exc) from exc
    server.daemon_threads = True
    Handler.hosts = allowed_hosts(host, int(server.server_port))
    thread = threading.Thread(target=server.serve_forever, name="hub-web", daemon=True)
    thread.start()
    return WebEndpoint(server, thread, int(server.server_port))
