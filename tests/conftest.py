"""Fixtures: real planner servers on loopback, stopped after each test."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from planner import server


@pytest.fixture(name="planner")
def _planner() -> Iterator[server.Running]:
    """A real planner on 127.0.0.1 with a free port."""
    running = server.start("127.0.0.1:0")
    try:
        yield running
    finally:
        server.stop(running, grace=1)


@pytest.fixture(name="channel")
def _channel(planner: server.Running) -> Iterator[grpc.Channel]:
    """A real client channel to the planner fixture, sized for large snapshots."""
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{planner.port}", options=options) as channel:
        yield channel
