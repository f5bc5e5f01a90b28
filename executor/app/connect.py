"""Settings to connections: the Proxmox connection, TLS towards the planner, TLS of the executor API."""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlsplit

from common.config import ConfigError
from common.grpcserver import PLANNER_CLIENT, ClientTls, ServerTls, is_loopback, pair, server_tls, socket_path
from common.unixfront import too_long
from executor.config import ExecutorSettings
from executor.loop.hub import HUB_CLIENT
from executor.pve.node import Connection, Credentials


def _secret(path: str | None, value: str | None, key: str) -> str | None:
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    return value


def connection(settings: ExecutorSettings) -> Connection:
    """The Proxmox connection the settings describe (ConfigError when incomplete)."""
    if not settings.node:
        raise ConfigError("node", "required (--node or PVE_EXECUTOR_NODE)")
    url = urlsplit(settings.pve_url)
    if url.scheme != "https" or not url.hostname:
        raise ConfigError("pve_url", f"must be https://HOST:PORT, got {settings.pve_url!r}")
    if settings.pve_token_id:
        secret = _secret(settings.pve_token_file, settings.pve_token_secret, "pve_token_file")
        if not secret or "!" not in settings.pve_token_id:
            raise ConfigError("pve_token_id", "USER@REALM!ID needs pve_token_file (or PVE_EXECUTOR_PVE_TOKEN_SECRET)")
        credentials = Credentials(user=settings.pve_token_id, token_secret=secret)
    elif settings.pve_user:
        password = _secret(settings.pve_password_file, settings.pve_password, "pve_password_file")
        if not password:
            raise ConfigError("pve_user", "needs pve_password_file (or PVE_EXECUTOR_PVE_PASSWORD)")
        credentials = Credentials(user=settings.pve_user, password=password)
    else:
        raise ConfigError("pve_token_id", "give pve_token_id (recommended) or pve_user")
    if settings.pve_ca_file:
        _ca_loadable(settings.pve_ca_file, "pve_ca_file")
    return Connection(host=url.hostname, port=url.port or 8006, node=settings.node, credentials=credentials,
                      ca_file=settings.pve_ca_file, insecure=settings.pve_insecure, timeout=settings.pve_timeout)


def _ca_loadable(path: str, key: str) -> None:
    """ConfigError naming ``key`` and the file unless it reads and holds a PEM CA certificate.

    Else the first request would fail as "no answer from HOST: SSLError", naming neither.
    """
    try:
        Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(key, f"{path}: no such file") from exc
    except OSError as exc:  # permission denied (on it or a directory above it), a directory: said as it is
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(path)
    except ssl.SSLError as exc:
        raise ConfigError(key, f"{path}: not a PEM CA certificate ({exc.reason or exc})") from exc


def _server_loadable(tls: ServerTls) -> None:
    """ConfigError naming the setting and the file unless the API's files read, parse and the key fits."""
    for path, key in ((tls.cert, "tls_cert"), (tls.key, "tls_key"), (tls.client_ca, "tls_client_ca")):
        if path:
            try:
                Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as exc:
        reason = str(exc.reason or "not PEM")
        problem = (f"{tls.key} is not the key of {tls.cert}: give tls_cert and tls_key from one pair"
                   if reason == "KEY_VALUES_MISMATCH" else
                   f"{tls.cert} (tls_cert) and {tls.key} (tls_key) do not load as a PEM certificate and its key "
                   f"({reason})")
        raise ConfigError("tls_key", problem) from exc
    if tls.client_ca:
        _ca_loadable(tls.client_ca, "tls_client_ca")


def planner_tls(settings: ExecutorSettings) -> ClientTls | None:
    """TLS towards the planner, when asked for (a client certificate makes it mutual); its files checked now."""
    pair(settings.planner_client_cert, settings.planner_client_key, PLANNER_CLIENT[1:])
    if not (settings.planner_tls or settings.planner_ca or settings.planner_client_cert):
        return None
    tls = ClientTls(ca=settings.planner_ca, cert=settings.planner_client_cert, key=settings.planner_client_key,
                    names=PLANNER_CLIENT)
    _loadable(tls)
    return tls


def _loadable(tls: ClientTls) -> None:
    """ConfigError naming the flag and the file unless every file reads, parses, and the key fits its certificate.

    gRPC would only say "Failed to create security handshaker" at the first call, and naming nothing.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for path, key in zip((tls.ca, tls.cert, tls.key), tls.names, strict=True):
        if path:
            try:
                Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    if tls.ca:
        try:
            context.load_verify_locations(tls.ca)
        except ssl.SSLError as exc:
            raise ConfigError(tls.names[0], f"{tls.ca}: not a PEM CA certificate ({exc.reason or exc})") from exc
    if tls.cert and tls.key:
        try:
            context.load_cert_chain(tls.cert, tls.key)
        except ssl.SSLError as exc:
            problem = _pair_problem(tls.cert, tls.key, str(exc.reason or "not PEM"), tls.names)
            raise ConfigError(tls.names[2], problem) from exc


def _pair_problem(cert: str, key: str, reason: str, names: tuple[str, str, str] = PLANNER_CLIENT) -> str:
    """What is wrong with a client certificate and key that do not load together (both flags, both files)."""
    cert_flag, key_flag = (f"--{name.replace('_', '-')}" for name in names[1:])
    if reason == "KEY_VALUES_MISMATCH":
        return f"{key} is not the key of {cert}: give {cert_flag} and {key_flag} from one pair"
    return (f"{cert} ({cert_flag}) and {key} ({key_flag}) do not load as a PEM "
            f"certificate and its key ({reason})")


def hub_tls(settings: ExecutorSettings) -> ClientTls | None:
    """TLS towards the hub when any of its files is given (a client certificate makes it mutual); checked now."""
    pair(settings.hub_client_cert, settings.hub_client_key, HUB_CLIENT[1:])
    if not (settings.hub_ca or settings.hub_client_cert):
        return None
    tls = ClientTls(ca=settings.hub_ca, cert=settings.hub_client_cert, key=settings.hub_client_key, names=HUB_CLIENT)
    _loadable(tls)
    return tls


def api_tls(settings: ExecutorSettings) -> ServerTls | None:
    """TLS of the executor API; beyond loopback it must be mutual: Reconcile mutates. A socket is local."""
    tls = server_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    if tls is not None:
        _server_loadable(tls)
    path = socket_path(settings.listen)
    if path is not None:
        problem = too_long(path) if path else f"{settings.listen}: give unix:PATH"
        if problem is not None:
            raise ConfigError("listen", problem)
        return tls
    if not is_loopback(settings.listen) and not (tls and tls.client_ca):
        raise ConfigError("listen", f"{settings.listen} is beyond loopback: the executor API (Reconcile mutates) "
                                    "then requires tls_cert, tls_key and tls_client_ca (mutual TLS)")
    return tls
