"""``pve-hub serve`` settings: TOML file < PVE_HUB_* environment < flags."""

from __future__ import annotations

from common.config import Option

ENV_PREFIX = "PVE_HUB_"
DEFAULT_ADDRESS = "127.0.0.1:50061"
OPTIONS = (
    Option(key="listen", default=DEFAULT_ADDRESS, help="HOST:PORT to bind; port 0 picks a free one"),
    Option(key="state_dir", default="/var/lib/pve-hub",
           help="directory of the SQLite store (hub.sqlite3), made 0700; unused with --postgres-dsn-file"),
    Option(key="postgres_dsn_file",
           help="file holding a libpq connection string: store in PostgreSQL (several replicas share it)"),
    Option(key="heartbeat", kind=float, default=10.0, minimum=0.05, help="seconds between heartbeats on a Watch"),
    Option(key="max_watchers", kind=int, default=1024, minimum=1,
           help="Watch streams this hub holds at most (each holds a thread; more are RESOURCE_EXHAUSTED)"),
    Option(key="grace", kind=float, default=5.0, minimum=0, help="seconds in-flight calls get on SIGTERM"),
    Option(key="log_format", default="auto", choices=("auto", "json", "console"),
           help="auto: console on a TTY, JSON lines otherwise"),
    Option(key="metrics_listen", help="HOST:PORT for Prometheus /metrics (off when unset)"),
    Option(key="web_listen", help="HOST:PORT for the read-only web page (off when unset; plain HTTP: keep it on "
                                  "loopback or behind a TLS proxy)"),
    Option(key="tls_cert", help="server certificate (PEM): serve TLS"),
    Option(key="tls_key", help="server private key (PEM)"),
    Option(key="tls_client_ca", help="CA (PEM) whose client certificates are required: mutual TLS (a node's "
                                     "certificate must name it: Watch and Report check)"),
)
