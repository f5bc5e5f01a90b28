"""Prometheus metrics of the hub (one registry per server, so tests can read their own); no per-node labels."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass
class HubMetrics:
    """Applies by outcome, watchers held, documents sent, reports by verdict."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.applies = Counter("pve_hub_applies", "Apply calls, by outcome (ok, invalid, conflict, unavailable).",
                               ["outcome"], registry=self.registry)
        self.watchers = Gauge("pve_hub_watchers", "Watch streams open on this hub.", registry=self.registry)
        self.sent = Counter("pve_hub_documents_sent", "Documents sent on Watch streams.", registry=self.registry)
        self.reports = Counter("pve_hub_reports", "Report calls, by verdict (ack, nack).", ["verdict"],
                               registry=self.registry)
