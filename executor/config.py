"""The executor's settings: TOML file < PVE_EXECUTOR_* environment < flags."""

from __future__ import annotations

from common.config import Option

ENV_PREFIX = "PVE_EXECUTOR_"
CONNECTION = (
    Option(key="node", help="this node's name in the cluster (required)"),
    Option(key="pve_url", default="https://127.0.0.1:8006", help="https://HOST:PORT of the Proxmox API"),
    Option(key="pve_token_id", help="USER@REALM!ID of an API token (recommended)"),
    Option(key="pve_token_file", help="file holding the token secret"),
    Option(key="pve_token_secret", secret=True, help="the token secret itself (prefer the file)"),
    Option(key="pve_user", help="USER@REALM for password login"),
    Option(key="pve_password_file", help="file holding the password"),
    Option(key="pve_password", secret=True, help="the password itself (prefer the file)"),
    Option(key="pve_ca_file", help="CA certificate (PEM) to verify the Proxmox API with"),
    Option(key="pve_insecure", kind=bool, default=False,
           help="do not verify the API's certificate (never in production)"),
    Option(key="pve_timeout", kind=float, default=30.0, minimum=1, help="seconds per Proxmox request"),
    Option(key="planner", default="127.0.0.1:50051",
           help="planner HOST:PORT, or a gRPC target such as dns:///planner.example:50051 or ipv4:A:P,B:P"),
    Option(key="planner_tls", kind=bool, default=False, help="talk TLS to the planner"),
    Option(key="planner_ca", help="CA (PEM) of the planner's certificate (default: system CAs)"),
    Option(key="planner_client_cert", help="client certificate (PEM) for mutual TLS with the planner"),
    Option(key="planner_client_key", help="client key (PEM) for mutual TLS with the planner"),
    Option(key="desired", help="desired-state YAML file (unset: manage nothing)"),
    Option(key="log_format", default="auto", choices=("auto", "json", "console"),
           help="auto: console on a TTY, JSON lines otherwise"),
)
RUN = (
    Option(key="state_dir", default="/var/lib/pve-reconcile", help="journal directory"),
    Option(key="interval", kind=float, default=30.0, minimum=0.05, help="seconds between ticks"),
    Option(key="max_parallel", kind=int, default=4, minimum=1, help="guests mutated at once"),
    Option(key="listen", default="127.0.0.1:50052", help="executor API HOST:PORT (beyond loopback: mutual TLS)"),
    Option(key="tls_cert", help="executor API certificate (PEM)"),
    Option(key="tls_key", help="executor API private key (PEM)"),
    Option(key="tls_client_ca", help="CA (PEM) whose client certificates the executor API requires"),
    Option(key="metrics_listen", help="HOST:PORT for Prometheus /metrics (off when unset)"),
    Option(key="shutdown_timeout", kind=int, default=60, minimum=0, help="seconds a graceful shutdown gets"),
    Option(key="force_stop", kind=bool, default=True, help="force a stop after the shutdown timeout"),
    Option(key="grace", kind=float, default=30.0, minimum=0, help="seconds queued work gets on SIGTERM"),
)
