"""The executor's settings: TOML file < PVE_EXECUTOR_* environment < flags.

Each setting is declared once as an ``Option`` (its flag, variable, type, default and help) and
once as a typed field of ``ExecutorSettings``, the frozen object the daemon reads; a test keeps the
two lists equal, so mypy checks every use of a setting.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from common.config import Config, Option

ENV_PREFIX = "PVE_EXECUTOR_"
DEFAULT_LISTEN = "unix:/run/pve-reconcile/executor.sock"  # only root and the pve-reconcile group reach it
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
    Option(key="listen", default=DEFAULT_LISTEN,
           help="executor API: unix:PATH (0660, group pve-reconcile), or HOST:PORT (loopback; beyond it: mutual TLS)"),
    Option(key="tls_cert", help="executor API certificate (PEM)"),
    Option(key="tls_key", help="executor API private key (PEM)"),
    Option(key="tls_client_ca", help="CA (PEM) whose client certificates the executor API requires"),
    Option(key="metrics_listen", help="HOST:PORT for Prometheus /metrics (off when unset)"),
    Option(key="shutdown_timeout", kind=int, default=60, minimum=0, help="seconds a graceful shutdown gets"),
    Option(key="force_stop", kind=bool, default=True, help="force a stop after the shutdown timeout"),
    Option(key="grace", kind=float, default=30.0, minimum=0, help="seconds queued work gets on SIGTERM"),
    Option(key="lost_grace", kind=float, default=120.0, minimum=0,
           help="seconds after a lost Proxmox answer before a task list without its task proves it never ran"),
    Option(key="trust_store", help="TOML trust store of the keys that may sign operations "
                                   "(unset: signed operations are off; every non-benign step is refused)"),
    Option(key="executor_id",
           help="this executor's audience in signed ops (default NODE@CLUSTER from /cluster/status)"),
    Option(key="op_clock_skew", kind=float, default=120.0, minimum=0, maximum=300,
           help="seconds a signed op's not_before may lie in the future (at most 300)"),
    Option(key="hub", help="hub HOST:PORT (or a gRPC target) to take this cluster's signed desired state from "
                           "(not with desired: a node takes one source)"),
    Option(key="hub_ca", help="CA (PEM) of the hub's certificate (default: system CAs; TLS when any hub_* file is "
                              "given)"),
    Option(key="hub_client_cert", help="client certificate (PEM) for mutual TLS with the hub"),
    Option(key="hub_client_key", help="client key (PEM) for mutual TLS with the hub"),
    Option(key="hub_cluster", help="the cluster whose document to watch (default: the cluster part of executor_id, "
                                   "NODE@CLUSTER)"),
    Option(key="hub_heartbeat", kind=float, default=10.0, minimum=0.05,
           help="seconds between the hub's heartbeats; a stream silent for 3 of them is reconnected"),
    Option(key="max_stops_per_tick", kind=int, minimum=1,
           help="stops run per interval at most, however many ticks run in it (unset: unlimited for a "
                "root-owned local desired file, max(2, 10%% of the managed guests) for any other source)"),
)
EXTRAS = ("once", "json", "vmid")  # flags of one command, not settings
STATE = tuple(o for o in (*CONNECTION, *RUN) if o.key in ("state_dir", "log_format"))
PLAN = tuple(o for o in RUN if o.key in ("interval", "state_dir", "executor_id", "max_stops_per_tick"))  # plan reads


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorSettings:
    """Every setting of pve-executor, typed; built once from the resolved layers, never mutated."""

    node: str | None = None
    pve_url: str = "https://127.0.0.1:8006"
    pve_token_id: str | None = None
    pve_token_file: str | None = None
    pve_token_secret: str | None = None
    pve_user: str | None = None
    pve_password_file: str | None = None
    pve_password: str | None = None
    pve_ca_file: str | None = None
    pve_insecure: bool = False
    pve_timeout: float = 30.0
    planner: str = "127.0.0.1:50051"
    planner_tls: bool = False
    planner_ca: str | None = None
    planner_client_cert: str | None = None
    planner_client_key: str | None = None
    desired: str | None = None
    log_format: str = "auto"
    state_dir: str = "/var/lib/pve-reconcile"
    interval: float = 30.0
    max_parallel: int = 4
    listen: str = DEFAULT_LISTEN
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    metrics_listen: str | None = None
    shutdown_timeout: int = 60
    force_stop: bool = True
    grace: float = 30.0
    lost_grace: float = 120.0
    trust_store: str | None = None
    executor_id: str | None = None
    op_clock_skew: float = 120.0
    hub: str | None = None
    hub_ca: str | None = None
    hub_client_cert: str | None = None
    hub_client_key: str | None = None
    hub_cluster: str | None = None
    hub_heartbeat: float = 10.0
    max_stops_per_tick: int | None = None
    once: bool = False
    json: bool = False
    vmid: int | None = None

    @classmethod
    def from_config(cls, config: Config, **extras: Any) -> ExecutorSettings:
        """The resolved values (a command's own options) over the declared defaults; ``extras`` are EXTRAS."""
        values = {o.key: o.default for o in (*CONNECTION, *RUN)} | dict(config.values)
        return cls(**values, **extras)


def settings_fields() -> frozenset[str]:
    """The typed settings' field names (for the test that keeps them equal to the options)."""
    return frozenset(f.name for f in fields(ExecutorSettings))
