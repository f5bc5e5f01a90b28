"""structlog set-up for both services: JSON lines in production, console on a TTY."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure(fmt: str = "auto", stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Configure structlog once, from ``main()``; ``fmt`` is auto, json or console."""
    out = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    # The console renderer formats exceptions itself; JSON lines want them as structured data.
    tail: list[structlog.typing.Processor] = (
        [structlog.dev.ConsoleRenderer()] if console
        else [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
