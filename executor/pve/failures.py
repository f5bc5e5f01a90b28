"""Why a call to Proxmox failed, as an operator can act on it: one row per cause, a stable code, the flag to fix.

A failure keeps its cause from the socket to the operator: the code (``tls_untrusted``, ``refused``,
``dns``, ``timeout``, ``auth``, ``privilege``...) goes to the log (``cause=``), to the metric's
``cause`` label and to the error; the hint (what to do, naming the flag) to the log (``hint=``) and to
the message. Only the verifier's words, the error's type and PVE's own text are used: never the request
(its URL, headers, form data), so a token secret or a password never reaches a message.
"""

from __future__ import annotations

import errno
import http.client
import re
import socket
import ssl
from dataclasses import dataclass
from typing import TypeVar

import requests
import urllib3

E = TypeVar("E", bound=BaseException)


@dataclass(frozen=True, slots=True)
class Cause:
    """One row: a stable code (logs, metrics), what happened, and what to do (``{...}`` filled per failure)."""

    code: str
    what: str
    hint: str


CAUSES = {cause.code: cause for cause in (
    Cause("tls_untrusted", "TLS certificate not trusted",
          "give the CA that signed Proxmox's certificate with --pve-ca-file (on a PVE node: /etc/pve/pve-root-ca.pem)"),
    Cause("tls_expired", "TLS certificate expired", "renew Proxmox's certificate, or correct this host's clock"),
    Cause("tls_name", "TLS certificate names another host",
          "give --pve-url a name the certificate holds, or reissue it for this one"),
    Cause("tls", "TLS handshake failed", "check that --pve-url is Proxmox's https port (8006) and --pve-ca-file"),
    Cause("dns", "unknown host", "check the host name in --pve-url"),
    Cause("timeout", "no answer within {timeout:g} s",
          "check the network and firewall between here and the node, or raise --pve-timeout"),
    Cause("refused", "connection refused",
          "nothing listens there: check the port in --pve-url (Proxmox's API listens on 8006) and that pveproxy runs"),
    Cause("reset", "connection closed before the answer", "check --pve-url (a proxy or a non-Proxmox service?)"),
    Cause("unreachable", "no route to the host", "check --pve-url and the network between here and the node"),
    Cause("network", "connection failed", "check --pve-url and the network between here and the node"),
    Cause("auth", "credentials refused (401)", "check {credentials}"),
    Cause("auth_tfa", "this account logs in with a second factor, which an unattended executor cannot give",
          "use an API token: --pve-token-id and --pve-token-file"),
    Cause("privilege", "permission denied (403)", "{grant}"),
)}

# Transport failures, first match wins, found anywhere in the exception's chain: TLS before the socket errors
# it wraps; a name that does not resolve, and a refused connection, before the timeouts (urllib3 makes every
# connection error a ConnectTimeoutError too).
TRANSPORT: tuple[tuple[type[BaseException], str], ...] = (
    (ssl.SSLCertVerificationError, "tls_untrusted"),  # refined by its verify code (VERIFY_CODES)
    (ssl.SSLError, "tls"),
    (urllib3.exceptions.NameResolutionError, "dns"),
    (socket.gaierror, "dns"),
    (ConnectionRefusedError, "refused"),
    (requests.exceptions.Timeout, "timeout"),
    (TimeoutError, "timeout"),  # socket.timeout; not urllib3's, which every connection error subclasses
    (ConnectionResetError, "reset"),
    (http.client.RemoteDisconnected, "reset"),
    (urllib3.exceptions.ProtocolError, "reset"),
)
VERIFY_CODES = {10: "tls_expired", 62: "tls_name", 64: "tls_name"}  # OpenSSL: expired, hostname/IP mismatch
UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})
CREDENTIALS = {True: "--pve-token-id (USER@REALM!ID) and the secret in --pve-token-file",
               False: "--pve-user (USER@REALM) and the password in --pve-password-file"}
LOGIN_STATUS = re.compile(r"code: (?P<status>\d{3})")  # proxmoxer's login error: "... code: 401"
PERMISSION = re.compile(r"Permission check failed \((?P<path>[^,()]*), (?P<privilege>[^()]+)\)")


@dataclass(frozen=True, slots=True)
class Failure:
    """One failure: its cause's code, the message (what happened, then what to do) and the hint alone."""

    code: str
    message: str
    hint: str


def transport(exc: BaseException, where: str, timeout: float) -> Failure:
    """A call that got no HTTP answer (``where``: HOST:PORT), classified by the first TRANSPORT row found."""
    code, detail = "network", ""
    for wanted, row in TRANSPORT:
        found = found_in(exc, wanted)
        if found is not None:
            code = row
            if isinstance(found, ssl.SSLCertVerificationError):
                code = VERIFY_CODES.get(found.verify_code, row)
                detail = str(found.verify_message or "").rstrip(".")
            elif isinstance(found, ssl.SSLError):
                detail = str(found.reason or "")  # OpenSSL's reason: WRONG_VERSION_NUMBER is not TLS at all
            break
    else:
        oserror = found_in(exc, OSError)
        if oserror is not None and oserror.errno in UNREACHABLE:
            code = "unreachable"
    cause = CAUSES[code]
    what = cause.what.format(timeout=timeout) + (f" ({detail})" if detail else "")
    return Failure(code, f"cannot reach {where}: {what}: {cause.hint}", cause.hint)


def answered(status: int, text: str, user: str) -> Failure | None:
    """A 401 or 403 answer (``text``: PVE's own words) as a failure naming what to fix; None for any other."""
    token = "!" in user
    if status == 401:
        hint = CAUSES["auth"].hint.format(credentials=CREDENTIALS[token])
        return Failure("auth", f"the credentials of {user} were refused (401 {text}): {hint}", hint)
    if status == 403:
        hint = CAUSES["privilege"].hint.format(grant=grant(text, user))
        return Failure("privilege", f"{text} (403 for {user}): {hint}", hint)
    return None


def login_refused(text: str, user: str) -> tuple[int | None, Failure | None]:
    """proxmoxer's login error (``text``: its words, which hold no password) as (HTTP status, failure)."""
    if "Two Factor" in text:
        cause = CAUSES["auth_tfa"]
        return 401, Failure(cause.code, f"login as {user}: {cause.what}: {cause.hint}", cause.hint)
    found = LOGIN_STATUS.search(text)
    status = int(found["status"]) if found else 401
    return status, answered(status, "authentication failure", user) if status == 401 else None


def grant(text: str, user: str) -> str:
    """What to grant, from PVE's ``Permission check failed (PATH, PRIVILEGE)``: the privilege, its path, a command."""
    match = PERMISSION.search(text)
    if match is None:
        return f"give {user} the privilege this call needs (PVE said: {text})"
    path, privilege = match["path"] or "/", match["privilege"]
    who = "--tokens" if "!" in user else "--users"
    return (f"{user} lacks {privilege} on {path}: grant it, e.g. `pveum acl modify {path} {who} '{user}' "
            f"--roles ROLE` with a role holding {privilege}")


def found_in(exc: BaseException, wanted: type[E]) -> E | None:
    """The first ``wanted`` among ``exc``, its args, ``reason`` and causes (urllib3 nests the socket error there)."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop(0)
        if isinstance(item, wanted):
            return item
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        todo.extend((*item.args, getattr(item, "reason", None), item.__cause__, item.__context__))
    return None
