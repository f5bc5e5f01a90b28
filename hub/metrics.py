"""Prometheus metrics of the hub (one registry per server, so tests can read their own).

The fleet's gauges (nodes by state, guests by sync state, approvals waiting, each node's report age) are read from
the store at scrape time (``FleetCollector``), never kept in this process: two replicas on one database agree.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hub.fleet import STALE_AFTER
from hub.store import NodeReport, NodeState, StoreError
from hub.store.model import SYNC_STATES

log = structlog.get_logger("hub.metrics")
NODE_STATES = ("ok", "nack", "stale")  # a node's one state: stale first, then its last verdict on a version


@dataclass
class HubMetrics:
    """Applies by outcome, watchers held, documents sent, reports by verdict, StateReports by kind and outcome."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.applies = Counter("pve_hub_applies", "Apply calls, by outcome (ok, invalid, conflict, unavailable).",
                               ["outcome"], registry=self.registry)
        self.watchers = Gauge("pve_hub_watchers", "Watch streams open on this hub.", registry=self.registry)
        self.sent = Counter("pve_hub_documents_sent", "Documents sent on Watch streams.", registry=self.registry)
        self.reports = Counter("pve_hub_reports", "Report calls, by verdict (ack, nack).", ["verdict"],
                               registry=self.registry)
        self.state_reports = Counter("pve_hub_state_reports", "StateReports received, by kind (full, delta) and "
                                     "outcome (applied, needs_full, invalid).", ["kind", "outcome"],
                                     registry=self.registry)
        # Every series at 0 from the start: a dashboard's rate() has a line before the first call of each kind.
        for verdict in ("ack", "nack"):
            self.reports.labels(verdict)
        for kind in ("full", "delta"):
            for outcome in ("applied", "needs_full", "invalid"):
                self.state_reports.labels(kind, outcome)

    def watch_fleet(self, read: Callable[[], tuple[Sequence[NodeState], Sequence[NodeReport]]],
                    clock: Callable[[], float] = time.time) -> None:
        """Serve the fleet's gauges from ``read()`` (every node's last StateReport and ACK/NACK) at each scrape."""
        self.registry.register(FleetCollector(read, clock))


class FleetCollector(Collector):
    """pve_hub_nodes{state}, pve_hub_guests{state}, pve_hub_pending_approvals, pve_hub_report_age_seconds{...},
    pve_hub_fleet_store_up: computed from the store at each scrape."""

    def __init__(self, read: Callable[[], tuple[Sequence[NodeState], Sequence[NodeReport]]],
                 clock: Callable[[], float]) -> None:
        self._read, self._clock = read, clock

    def describe(self) -> list[GaugeMetricFamily]:
        """Nothing at registration: the store is read only when scraped."""
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The fleet's gauges now; with the store unreachable, only pve_hub_fleet_store_up 0."""
        up = GaugeMetricFamily("pve_hub_fleet_store_up", "1 when the fleet's gauges could be read from the store.")
        try:
            states, acks = self._read()
        except StoreError as exc:
            log.warning("hub.metrics_store_unavailable", error=str(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _families(states, acks, self._clock())


def _families(states: Sequence[NodeState], acks: Sequence[NodeReport], now: float) -> Iterator[GaugeMetricFamily]:
    verdicts = {(a.cluster, a.node): a.ok for a in acks}
    nodes, guests, pending = Tally[str](), Tally[str](), 0
    age = GaugeMetricFamily("pve_hub_report_age_seconds", "Seconds since each node's last StateReport.",
                            labels=["cluster", "node"])
    for state in states:
        seconds = max(0.0, now - state.received.timestamp())
        age.add_metric([state.cluster, state.node], seconds)
        stale = seconds > STALE_AFTER * state.interval
        nodes["stale" if stale else "ok" if verdicts.get((state.cluster, state.node), True) else "nack"] += 1
        guests.update(state.counts)
        pending += state.pending
    reported = {(state.cluster, state.node) for state in states}
    for ack in acks:  # a node that watches and ACKs but never sent a StateReport still counts by its verdict
        if (ack.cluster, ack.node) not in reported:
            nodes["ok" if ack.ok else "nack"] += 1
    by_node = GaugeMetricFamily("pve_hub_nodes", "Nodes by state: ok, nack (its last verdict refused a version), "
                                "stale (no StateReport for two report intervals).", labels=["state"])
    for name in NODE_STATES:
        by_node.add_metric([name], nodes[name])
    by_guest = GaugeMetricFamily("pve_hub_guests", "Guests by sync state, from every node's last StateReport.",
                                 labels=["state"])
    for name in SYNC_STATES:
        by_guest.add_metric([name], guests[name])
    yield by_node
    yield by_guest
    yield GaugeMetricFamily("pve_hub_pending_approvals", "Changes waiting for a signed operation, over every node.",
                            value=pending)
    yield age
