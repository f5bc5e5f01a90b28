"""Where the executor API is and how to reach it: flags, PVE_EXECUTOR_API, or the daemon's own executor.toml.

``--api`` beats ``PVE_EXECUTOR_API``, which beats ``listen`` in ``--config FILE`` (or PVE_EXECUTOR_CONFIG),
which beats the default socket. The file is the one ``pve-executor run --config`` reads: its ``listen``
gives the address (a wildcard host is reached on loopback) and, for HOST:PORT, its TLS settings say
whether to talk TLS (``tls_cert``: the API's certificate, trusted as its own CA unless ``--api-ca``
names one) and whether a client certificate is required (``tls_client_ca``). Other keys are the
daemon's business and are left alone.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError
from opctl.cli import API_ENV, DEFAULT_API

CONFIG_ENV = "PVE_EXECUTOR_CONFIG"
FILE_KEYS = ("listen", "tls_cert", "tls_client_ca")  # what the client needs of the daemon's settings
WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}  # a server binds these; a client cannot


@dataclass(frozen=True, slots=True, kw_only=True)
class Connection:
    """The API's address and the client TLS files (``tls`` False: plaintext, as on the Unix socket)."""

    target: str
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


def read_settings(path: str) -> dict[str, str]:
    """``listen``, ``tls_cert`` and ``tls_client_ca`` of the executor.toml at ``path`` (ConfigError: exit 2)."""
    try:
        with Path(path).open("rb") as handle:
            doc: dict[str, Any] = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc
    found = {}
    for key in FILE_KEYS:
        value = doc.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(key, f"must be str, got {value!r}", path)
        if value:
            found[key] = value
    return found


def client_target(listen: str) -> str:
    """The address a client dials for a server's ``listen`` (a wildcard host becomes loopback)."""
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    return f"{WILDCARDS.get(host, host)}:{port}"


def connection(args: argparse.Namespace) -> Connection:
    """The API's address and TLS from the flags, the environment and ``--config``."""
    path = args.config or os.environ.get(CONFIG_ENV)
    settings = read_settings(path) if path else {}
    target = args.api or os.environ.get(API_ENV) or client_target(settings.get("listen", DEFAULT_API))
    ca, cert, key = args.api_ca, args.api_client_cert, args.api_client_key
    from_file = not (args.api or os.environ.get(API_ENV)) and "listen" in settings
    file_tls = from_file and not target.startswith("unix:") and "tls_cert" in settings
    if not (ca or cert or key or file_tls):
        return Connection(target=target)
    if file_tls and not cert and "tls_client_ca" in settings:
        raise ConfigError("tls_client_ca", "the executor API requires client certificates: give "
                                           "--api-client-cert and --api-client-key", str(path))
    return Connection(target=target, tls=True, ca=ca or (settings["tls_cert"] if file_tls else None), cert=cert,
                      key=key)
