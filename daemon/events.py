"""Events: every state change, logged, kept (last 100) and streamed to followers.

`agentd ctl events` prints the history and `events -f` follows; both read from
the `EventLog`, which also writes each event as one structlog line so the
journal and the stream always agree.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import msgspec

from .log import get_logger

HISTORY = 100
#: Logged as warnings: something an operator should look at.
WARNINGS = frozenset(
    {
        "agent.hung",
        "supervisor.gave_up",
        "bus.dead_lettered",
        "bus.dropped",
        "bus.journal_unavailable",
        "bus.journal_corrupt",
    }
)


class Event(msgspec.Struct, frozen=True):
    """One event, as streamed (JSON lines) by `agentd ctl events`."""

    time: float
    event: str  # agent.starting, agent.ready, agent.exited, ...
    name: str
    data: dict[str, Any] = {}


class EventLog:
    """Recent events plus live followers (one bounded queue per follower)."""

    def __init__(self) -> None:
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self.followers: set[asyncio.Queue[Event]] = set()
        self.log = get_logger("agentd")

    def emit(self, event: str, name: str, **data: Any) -> Event:
        record = Event(time.time(), event, name, data)
        self.history.append(record)
        level = "warning" if event in WARNINGS else "info"
        getattr(self.log, level)(event, agent=name, **data)
        for queue in list(self.followers):
            try:
                queue.put_nowait(record)
            except asyncio.QueueFull:
                self.followers.discard(queue)  # a stuck follower is dropped, never waited on
        return record

    def follow(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=10_000)
        self.followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[Event]) -> None:
        self.followers.discard(queue)
