"""Prometheus metrics of the planner (one registry per server, so tests can read their own)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

SIZE_BUCKETS = (0, 1, 10, 100, 1_000, 10_000, 50_000, 100_000)


@dataclass
class PlannerMetrics:
    """plans served, their latency and their size; no per-guest labels."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.plans = Counter("pve_planner_plans", "Plan calls served, by outcome (ok, invalid, error).",
                             ["outcome"], registry=self.registry)
        self.duration = Histogram("pve_planner_plan_duration_seconds", "Time to validate and plan one request.",
                                  registry=self.registry)
        self.guests = Histogram("pve_planner_plan_desired_guests", "Desired guests per Plan request.",
                                buckets=SIZE_BUCKETS, registry=self.registry)
        self.actions = Histogram("pve_planner_plan_actions", "Actions per Plan response.",
                                 buckets=SIZE_BUCKETS, registry=self.registry)
