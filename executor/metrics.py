"""Prometheus metrics of the executor (one registry per engine; no per-guest labels)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class ExecutorMetrics:
    """Ticks, actions, queue, in-flight operations, task waits, Proxmox errors, journal latency."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.ticks = Counter("pve_executor_ticks", "Ticks run, by outcome.", ["outcome"], registry=r)
        self.tick_duration = Histogram("pve_executor_tick_duration_seconds", "Wall time of a tick.", registry=r)
        self.actions = Counter("pve_executor_actions", "Actions run, by kind (start, stop, set_config) and outcome "
                               "(ok, failed, unknown).", ["kind", "outcome"], registry=r)
        self.task_wait = Histogram("pve_executor_task_wait_seconds", "Time from a task's UPID to its end.",
                                   buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900), registry=r)
        self.pve_errors = Counter("pve_executor_pve_api_errors", "Proxmox API errors, by HTTP status (none: no "
                                  "answer) and cause (tls_untrusted, refused, dns, timeout, auth, privilege, ...; "
                                  "http: any other error answer).", ["status", "cause"], registry=r)
        self.journal_append = Histogram("pve_executor_journal_append_seconds", "Latency of a durable journal append.",
                                        buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
                                        registry=r)
        self.gate_decisions = Counter("pve_executor_gate_decisions", "Safety gate decisions, by class (benign, "
                                      "approval, destructive), decision (admitted, refused, deferred) and reason.",
                                      ["class", "decision", "reason"], registry=r)
        self.refusals_standing = Gauge("pve_executor_gate_refusals_standing", "Refusals standing now, by guest and "
                                       "op kind (each logged once, when it appears or changes).", registry=r)
        self.queue_depth = Gauge("pve_executor_queue_depth", "Jobs queued or running.", registry=r)
        self.busy_guests = Gauge("pve_executor_busy_guests", "Guests with queued or running work.", registry=r)
        self.in_flight = Gauge("pve_executor_in_flight_operations", "Journal operations begun and not ended.",
                               registry=r)
        self.hub_held_version = Gauge("pve_executor_hub_held_version", "The hub document version held here (0: "
                                      "none).", registry=r)
        self.hub_held_age = Gauge("pve_executor_hub_held_age_seconds", "Seconds since the held version was signed "
                                  "(its created time): grows while a hub withholds newer versions.", registry=r)
        self.hub_held_trusted = Gauge("pve_executor_hub_held_document_trusted", "0 when the held version's document "
                                      "no longer verifies here (signer revoked): nothing is managed.", registry=r)
        self.hub_held_info = Gauge("pve_executor_hub_held_info", "1, labelled with the hub document version held "
                                   "here and its payload sha256 (0 and \"\": none): two nodes holding two documents "
                                   "under one version differ here, for a monitor that is not the hub to compare.",
                                   ["version", "sha256"], registry=r)
        self.hub_connected = Gauge("pve_executor_hub_connected", "1 while a Watch stream to the hub is up.",
                                   registry=r)
        self.hub_reports = Counter("pve_executor_hub_reports", "Hub documents ACKed or NACKed, by verdict (ack, "
                                   "nack) and reason.", ["verdict", "reason"], registry=r)
        self.hub_state_reports = Counter("pve_executor_hub_state_reports", "State reports sent to the hub, by kind "
                                         "(full, delta) and outcome (ok, needs_full, or the failed call's status "
                                         "code).", ["kind", "outcome"], registry=r)

    def pve_error(self, status: int | None, cause: str) -> None:
        """Count one Proxmox API error by its status and its cause (``executor.pve.failures``)."""
        self.pve_errors.labels("none" if status is None else str(status), cause).inc()

    def watch(self, busy: Callable[[], dict[int, int]], in_flight: Callable[[], int]) -> None:
        """Compute the gauges at scrape time."""
        self.queue_depth.set_function(lambda: float(sum(busy().values())))
        self.busy_guests.set_function(lambda: float(len(busy())))
        self.in_flight.set_function(lambda: float(in_flight()))
