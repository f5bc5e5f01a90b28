"""Prometheus metrics: the planner's plans by outcome, latency and size; the executor's ticks, actions and waits."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from executor.loop.desired import Declared
from executor.loop.planner_client import PlannerClient, PlannerRefusedError
from planner import server
from tests.builders import ONE_GUEST, want


def test_planner_metrics_endpoint(tmp_path: Path) -> None:
    """/metrics shows plans by outcome, latency and size, in Prometheus' naming."""
    running = server.start("127.0.0.1:0", metrics_listen="127.0.0.1:0")
    try:
        client = PlannerClient(f"127.0.0.1:{running.port}")
        client.plan(*ONE_GUEST)
        with pytest.raises(PlannerRefusedError):
            client.plan([want(0)], [])
        assert running.metrics_endpoint is not None
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_endpoint.port}/metrics", timeout=5).read()
        body = text.decode()
        assert 'pve_planner_plans_total{outcome="ok"} 1.0' in body
        assert 'pve_planner_plans_total{outcome="invalid"} 1.0' in body
        assert "pve_planner_plan_duration_seconds_count 1.0" in body
        assert "pve_planner_plan_actions_sum 1.0" in body
    finally:
        server.stop(running, 1)


def test_executor_metrics_count_ticks_actions_and_waits(fakepve: Any, make_engine: Any) -> None:
    """Ticks, actions by kind and outcome, task waits and journal appends are counted; no vmid label."""
    fakepve.add_vm(100, "web", status="stopped")
    engine = make_engine([Declared(vmid=100, state="running")])
    engine.tick(wait=True)
    body = generate_latest(engine.metrics.registry).decode()
    assert 'pve_executor_ticks_total{outcome="ok"} 1.0' in body
    assert 'pve_executor_actions_total{kind="start",outcome="ok"} 1.0' in body
    assert "pve_executor_task_wait_seconds_count 1.0" in body
    assert "pve_executor_journal_append_seconds_count 3.0" in body
    assert "pve_executor_queue_depth 0.0" in body and "pve_executor_in_flight_operations 0.0" in body
    assert "vmid" not in body
