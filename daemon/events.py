"""Events: every state change, numbered, logged, kept in a bounded ring and streamed.

Each event gets `seq`, 1, 2, 3... in the order the daemon emitted it, and
`run`, a random token of this daemon run: seq restarts at 1 when the daemon
does, so `run` is what tells "event 12 of this run" from "event 12 of the run
before". `agentd ctl events` prints the last `RECENT` of the ring, and
`events --since [RUN:]SEQ` everything after SEQ that the ring still holds (the
last `daemon.event_history` events, `HISTORY` by default); `-f` then follows
from the ring itself, so a stream is gap-free by construction and a reader that
falls more than the ring behind is told so instead of silently skipping. Each
event is also one structlog line (with `seq` and `run`), so the journal and the
stream always agree.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import deque
from typing import Any

import msgspec

from .log import get_logger

#: Events kept for `ctl events --since` by default (`daemon.event_history`; older ones
#: are only in the daemon's log).
HISTORY = 10_000
#: Events plain `ctl events` prints (SPEC §7).
RECENT = 100
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
#: Keys of an event's own log line: a data key among them is logged with a trailing `_`.
_LOG_FIELDS = frozenset({"event", "agent", "seq", "run", "level", "timestamp"})


class Event(msgspec.Struct, frozen=True):
    """One event, as streamed (JSON lines) by `agentd ctl events`."""

    seq: int  # 1, 2, 3... per daemon run, no gaps
    run: str  # this daemon run's token: seq restarts with a new one
    time: float
    event: str  # agent.starting, agent.ready, agent.exited, ...
    name: str
    data: dict[str, Any] = {}


class NotHeld(Exception):
    """The ring no longer holds what a reader asked for: resuming would leave a gap."""


class EventLog:
    """The ring of recent events, a wake-up for ring readers, and queue followers."""

    def __init__(self, capacity: int = HISTORY) -> None:
        self.run = secrets.token_hex(6)
        self.history: deque[Event] = deque(maxlen=capacity)
        self.newest = 0  # the seq of the last event emitted (0: none yet)
        self.followers: set[asyncio.Queue[Event]] = set()
        self.log = get_logger("agentd")
        self._grew = asyncio.Event()  # set (and replaced) on every emit

    def emit(self, event: str, name: str, **data: Any) -> Event:
        self.newest += 1
        record = Event(self.newest, self.run, time.time(), event, name, data)
        self.history.append(record)
        level = "warning" if event in WARNINGS else "info"
        fields = {(f"{k}_" if k in _LOG_FIELDS else k): v for k, v in data.items()}
        getattr(self.log, level)(event, agent=name, seq=record.seq, run=self.run, **fields)
        self._grew.set()
        self._grew = asyncio.Event()
        for queue in list(self.followers):
            try:
                queue.put_nowait(record)
            except asyncio.QueueFull:
                self.followers.discard(queue)  # a stuck follower is dropped, never waited on
        return record

    @property
    def oldest(self) -> int:
        """The seq of the oldest event held (newest + 1 when none is)."""
        return self.history[0].seq if self.history else self.newest + 1

    def after(self, seq: int) -> list[Event]:
        """Every held event with a seq above `seq`, oldest first.

        Raises NotHeld when seq + 1 has already left the ring: the caller would
        otherwise see a gap. A seq at or past the newest gives [] (nothing yet).
        """
        if seq >= self.newest:
            return []
        if seq + 1 < self.oldest:
            raise NotHeld(
                f"event {seq + 1} is no longer held: the daemon keeps the last "
                f"{self.history.maxlen} events and the oldest it holds is {self.oldest}"
            )
        return list(itertools.islice(self.history, seq + 1 - self.oldest, None))

    def recent(self, count: int = RECENT) -> list[Event]:
        """The last `count` events (what plain `ctl events` prints)."""
        skip = max(0, len(self.history) - count)
        return list(itertools.islice(self.history, skip, None))

    async def wait_beyond(self, seq: int) -> None:
        """Return once an event with a seq above `seq` has been emitted."""
        while self.newest <= seq:
            await self._grew.wait()

    def follow(self) -> asyncio.Queue[Event]:
        """A queue of every event from now on (in-process readers; ctl reads the ring)."""
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=10_000)
        self.followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[Event]) -> None:
        self.followers.discard(queue)
