"""Why the planner could not be reached, as an operator can act on it: one row per cause, the flag to fix.

gRPC says much in its status details (a refused port, a name that does not resolve, a certificate it
does not trust) and little when the peer just closes the connection: a plaintext client at a TLS
planner, and a TLS client without the certificate a mutual-TLS planner requires, both read "Socket
closed". For those a probe asks the planner itself: one TLS handshake from Python's ``ssl`` with the
same files (a plaintext client's probe verifies nothing: it only asks whether TLS is spoken there).
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
from dataclasses import dataclass

import grpc

from common.grpcserver import ClientTls
from executor.pve.failures import Cause

CAUSES = {cause.code: cause for cause in (
    Cause("refused", "connection refused", "nothing listens there: check --planner and that pve-planner runs"),
    Cause("dns", "unknown host", "check the host name in --planner"),
    Cause("timeout", "no answer in time", "check --planner and the network to it"),
    Cause("tls_required", "the planner speaks TLS, this executor plaintext",
          "give --planner-tls (and --planner-ca: the CA of the planner's certificate)"),
    Cause("tls_not_spoken", "the planner speaks plaintext, this executor TLS",
          "drop --planner-tls/--planner-ca, or serve TLS from the planner (its --tls-cert and --tls-key)"),
    Cause("tls_untrusted", "the planner's TLS certificate is not trusted",
          "give the CA that signed the planner's certificate with --planner-ca"),
    Cause("tls_client_cert_required", "the planner requires a client certificate (mutual TLS)",
          "give --planner-client-cert and --planner-client-key"),
    Cause("tls_client_cert_rejected", "the planner does not trust this executor's client certificate {cert}",
          "give --planner-client-cert/--planner-client-key a pair signed by the CA of the planner's "
          "--tls-client-ca"),
    Cause("tls_client_key", "the client key does not fit its certificate",
          "give --planner-client-cert and --planner-client-key from one pair"),
    Cause("closed", "the planner closed the connection", "check that --planner names the planner's port"),
)}

# gRPC's status details, first match wins; "closed" is refined by a probe (``probe``).
DETAILS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(text, re.IGNORECASE), code) for text, code in (
    (r"CERTIFICATE_VERIFY_FAILED", "tls_untrusted"),
    (r"WRONG_VERSION_NUMBER|HTTP_REQUEST|PACKET_LENGTH_TOO_LONG", "tls_not_spoken"),
    (r"security handshaker|invalid private key", "tls_client_key"),
    (r"Connection refused", "refused"),
    (r"Domain name not found|DNS resolution failed|errors resolving|hostname lookup", "dns"),
    (r"Socket closed|Connection reset|end of file|EOF", "closed"),
))
# What the planner's TLS alert says of this executor's client certificate, by OpenSSL's reason.
ALERTS = {"TLSV13_ALERT_CERTIFICATE_REQUIRED": "tls_client_cert_required",
          "PEER_DID_NOT_RETURN_A_CERTIFICATE": "tls_client_cert_required",
          "TLSV1_ALERT_UNKNOWN_CA": "tls_client_cert_rejected",
          "SSLV3_ALERT_BAD_CERTIFICATE": "tls_client_cert_rejected",
          "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "tls_client_cert_rejected",
          "SSLV3_ALERT_HANDSHAKE_FAILURE": "tls_client_cert_required"}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what a gRPC client sends first; the planner's alert answers it
PROBE_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class PlannerFailure:
    """A classified failure: the code, the whole message and the hint alone."""

    code: str
    message: str
    hint: str


def diagnose(code: grpc.StatusCode, details: str, target: str, tls: ClientTls | None) -> PlannerFailure | None:
    """The cause of a failed call to ``target`` (None: not a connection failure gRPC says enough about)."""
    found = "timeout" if code is grpc.StatusCode.DEADLINE_EXCEEDED else None
    if code is grpc.StatusCode.UNAVAILABLE:
        found = next((row for pattern, row in DETAILS if pattern.search(details)), None)
    if found == "closed":
        found = probe(target, tls) or found
    if found is None:
        return None
    cause = CAUSES[found]
    what = cause.what.format(cert=tls.cert if tls is not None else "")
    return PlannerFailure(found, f"planner at {target}: {what} ({code.name}): {cause.hint}", cause.hint)


def address(target: str) -> tuple[str, int] | None:
    """HOST and PORT of a one-address target (``HOST:PORT``, ``ipv4:`` or ``ipv6:`` the first); None otherwise."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target.removeprefix(scheme).split(",")[0]
    if "/" in target:  # dns:///, unix: and the like: not probed
        return None
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    return (host, int(port)) if host and port.isdigit() else None


def probe(target: str, tls: ClientTls | None) -> str | None:
    """Ask the planner what a closed connection meant: one TLS handshake with this executor's files."""
    where = address(target)
    if where is None:
        return None
    try:
        raw = socket.create_connection(where, timeout=PROBE_TIMEOUT)
    except OSError:
        return None
    with contextlib.closing(raw):
        return _handshake(raw, where[0], tls)


def _context(tls: ClientTls | None) -> ssl.SSLContext:
    """The probe's TLS client: this executor's CA and client pair; for a plaintext client, no verification."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    if tls is None:  # only: is TLS spoken there? Nothing is trusted, nothing is sent.
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context
    if tls.ca:
        context.load_verify_locations(tls.ca)
    else:
        context.load_default_certs()
    if tls.cert and tls.key:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def _handshake(raw: socket.socket, host: str, tls: ClientTls | None) -> str | None:
    try:
        context = _context(tls)
        with context.wrap_socket(raw, server_hostname=host) as wrapped:
            if tls is None:
                return "tls_required"
            wrapped.sendall(PREFACE)
            # A TLS 1.3 server refuses a client certificate after the handshake: with an alert, or (gRPC's)
            # by closing at once, where a planner that took the certificate sends its HTTP/2 settings.
            if not wrapped.recv(1):
                return "tls_client_cert_rejected" if tls.cert else "tls_client_cert_required"
    except ssl.SSLCertVerificationError:
        return "tls_untrusted"
    except ssl.SSLError as exc:
        return ALERTS.get(str(exc.reason))
    except OSError:
        return None
    return None
