"""structlog setup: readable console lines on a terminal, JSON lines otherwise.

Under systemd stdout is not a terminal, so the journal gets one JSON object
per line; a person running `agentd run` by hand gets colourised text.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import msgspec
import structlog

LogFormat = Literal["auto", "json", "console"]


def configure(fmt: LogFormat = "auto", level: int = logging.INFO) -> None:
    """Configure structlog for the whole process."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "json":
        # msgspec's encoder: several times faster than json.dumps, and logging sits
        # on the restart path (four events per restart).
        encoder = msgspec.json.Encoder(enc_hook=str)
        renderer = structlog.processors.JSONRenderer(
            serializer=lambda obj, **_: encoder.encode(obj).decode()
        )
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str = "agentd") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
