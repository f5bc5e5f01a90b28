"""The shared shutdown trigger: SIGTERM or SIGINT sets an event (and is logged once each)."""

from __future__ import annotations

import signal
import threading

import structlog

log = structlog.get_logger("common.signals")


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT; call from the main thread."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return stop
