"""The planner's settings: TOML file < PVE_PLANNER_* environment < flags."""

from __future__ import annotations

from common.config import Option

ENV_PREFIX = "PVE_PLANNER_"
OPTIONS = (
    Option(key="listen", default="127.0.0.1:50051", help="HOST:PORT to bind; port 0 picks a free one"),
    Option(key="max_message_mb", kind=int, default=256, minimum=1,
           help="largest request/response in MiB (50,000 guests are ~30-40)"),
    Option(key="grace", kind=float, default=10.0, minimum=0, help="seconds in-flight calls get on SIGTERM"),
    Option(key="workers", kind=int, default=8, minimum=1, help="server thread pool size"),
    Option(key="log_format", default="auto", choices=("auto", "json", "console"),
           help="auto: console on a TTY, JSON lines otherwise"),
    Option(key="metrics_listen", help="HOST:PORT for Prometheus /metrics (off when unset)"),
    Option(key="tls_cert", help="server certificate (PEM): serve TLS"),
    Option(key="tls_key", help="server private key (PEM)"),
    Option(key="tls_client_ca", help="CA (PEM) whose client certificates are required: mutual TLS"),
)
