"""The daemon's side of the bus: its agent table out, agent events in.

The daemon connects a DEALER with the reserved routing id `agentd`. It sends
the full agent table (`table`, versioned, in parts if it would pass `max_frame`)
and re-sends it until the broker confirms that version — which also covers a
broker that was just restarted and knows nothing. Once the broker has a table,
a change (a spawn, a terminate) goes as a `table_patch` of what changed: sending
ten thousand entries for every spawn made spawning N children N².

The broker answers with `event` frames: connected, ready, hung, disconnected;
and with `notice` frames, things the operator should see (`bus.dead_lettered`,
`bus.journal_unavailable`, ...), handed to `on_notice`.
`stats()` asks for the broker's counters (for `ctl status` and the metrics).
A peer's `spawn` and `terminate` frames (dynamic supervisors) come through the
broker too: `on_request(frame, reply)` gets each, and `reply(ok, error)` sends
the `spawn_reply` back to the peer that asked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from .endpoint import parse_endpoint
from .envelope import (
    DAEMON_ID,
    AgentEntry,
    AgentEvent,
    Down,
    Heartbeat,
    Notice,
    Reconnect,
    Spawn,
    SpawnReply,
    Stats,
    Table,
    TableOk,
    TablePatch,
    Terminate,
    encoder,
    peer_decoder,
)

__all__ = ["AgentEntry", "BrokerEvent", "BrokerLink", "Notice"]


def _log() -> Any:
    import structlog

    return structlog.get_logger("agentd.bus.link")


RESEND = 0.25  # seconds between table re-sends until confirmed
PROBE = 1.0  # seconds between heartbeats once confirmed: a new broker answers RECONNECT


class BrokerEvent(msgspec.Struct, frozen=True):
    """What the broker saw happen to an agent incarnation."""

    kind: str  # "connected" | "ready" | "hung" | "disconnected"
    name: str
    incarnation: int

    @property
    def event(self) -> str:
        """The same as `kind` (an older spelling)."""
        return self.kind


class BrokerLink:
    """Keeps the broker's agent table current and reports what the broker sees."""

    def __init__(
        self,
        endpoint: str,
        on_event: Callable[[BrokerEvent], None],
        keys_dir: str | None = None,
        on_notice: Callable[[Notice], None] | None = None,
        on_request: Callable[[Spawn | Terminate, Callable[[bool, str | None], None]], None]
        | None = None,
        max_frame: int = 1024 * 1024,
    ) -> None:
        self.endpoint = endpoint
        self.on_request = on_request
        self.keys_dir = keys_dir
        self.on_event = on_event
        self.on_notice = on_notice
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None
        self.enc = encoder()
        self.dec = peer_decoder()
        self.max_frame = max_frame  # the broker's: a larger table goes in parts
        self.version = 0
        self.confirmed = -1
        self.entries: dict[str, AgentEntry] = {}
        # The version the broker has, or will once it reads what we sent (None: unknown,
        # so the whole table goes next), and what changed since.
        self.sent: int | None = None
        self._upserts: dict[str, AgentEntry] = {}
        self._removed: set[str] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._changed = asyncio.Event()
        self._confirmed = asyncio.Event()
        self._stats: asyncio.Future[Stats] | None = None  # the Stats request awaiting its answer

    async def start(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, DAEMON_ID)
        sock.setsockopt(zmq.LINGER, 0)
        # The broker may not have bound yet: retry soon (ZeroMQ's default is 100 ms).
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if parse_endpoint(self.endpoint).needs_keys and self.keys_dir:
            from pathlib import Path

            from .keys import client_curve

            client_curve(sock, Path(self.keys_dir))
        sock.connect(self.endpoint)
        self.sock = sock
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receive()), loop.create_task(self._sync())]

    def set_agents(self, entries: list[AgentEntry]) -> None:
        """The full table; agents not in it are gone for good. Always a new version:
        the first table must go even when it is empty."""
        new = {e.name: e for e in entries}
        removed = [n for n in self.entries if n not in new]
        self._apply([e for e in entries if self.entries.get(e.name) != e], removed)
        self._new_version()

    def update(self, entries: list[AgentEntry], removed: list[str]) -> None:
        """New or changed entries, and names gone for good (a spawn, a terminate)."""
        if self._apply(entries, removed):
            self._new_version()

    def _apply(self, entries: list[AgentEntry], removed: list[str]) -> bool:
        """Into `entries`, and into what the next patch carries; true if anything changed."""
        changed = False
        for name in removed:
            if self.entries.pop(name, None) is not None:
                self._upserts.pop(name, None)
                self._removed.add(name)
                changed = True
        for entry in entries:
            if self.entries.get(entry.name) != entry:
                self.entries[entry.name] = entry
                self._upserts[entry.name] = entry
                self._removed.discard(entry.name)
                changed = True
        return changed

    def _new_version(self) -> None:
        self.version += 1
        self._changed.set()

    def broker_restarted(self) -> None:
        """A new broker knows nothing: send the table again (same content, new version)."""
        self.sent = None
        self._new_version()

    def agent_down(self, name: str, incarnation: int) -> None:
        """This incarnation exited: hold its traffic now rather than when ZeroMQ notices."""
        if self.sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send(self.enc.encode(Down(name, incarnation)), zmq.NOBLOCK)

    async def stats(self, timeout: float) -> Stats | None:
        """The broker's counters and per-agent figures; None if no answer within `timeout`.

        Callers at the same time share one request. One that timed out is given up:
        the next call asks again (a late answer still serves whoever is waiting then).
        """
        if self.sock is None:
            return None
        if self._stats is None or self._stats.done():
            self._stats = asyncio.get_running_loop().create_future()
            with contextlib.suppress(zmq.ZMQError):
                await self.sock.send(self.enc.encode(Stats(per_agent=True)), zmq.NOBLOCK)
        asking = self._stats
        try:
            return await asyncio.wait_for(asyncio.shield(asking), timeout)
        except TimeoutError:
            if self._stats is asking:
                self._stats = None
            return None

    async def wait_confirmed(self, timeout: float) -> bool:
        """Until the broker has confirmed a table: it is up and knows where to report."""
        try:
            await asyncio.wait_for(self._confirmed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _sync(self) -> None:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while True:
            if self.confirmed == self.version:
                # Confirmed: a heartbeat now and then, so that a broker restarted behind our
                # back (no broker_restarted() call) says RECONNECT and gets the table again.
                frames: list[Any] = [Heartbeat()]
                delay = PROBE
            elif self.sent is not None and self.sent != self.version:
                frames, delay = [self._patch(self.sent)], RESEND
            else:  # never sent, or sent and not confirmed in RESEND: the whole table
                frames, delay = self._table(), RESEND
            if self.confirmed != self.version:
                self.sent = self.version
                self._upserts, self._removed = {}, set()
            with contextlib.suppress(zmq.ZMQError):
                for frame in frames:
                    await self.sock.send(self.enc.encode(frame), zmq.NOBLOCK)
            # A timer rather than wait_for(): cancelling wait_for() can be lost on 3.11.
            timer = loop.call_later(delay, self._changed.set)
            try:
                await self._changed.wait()
            finally:
                timer.cancel()
            self._changed.clear()

    def _patch(self, base: int) -> TablePatch:
        return TablePatch(self.version, base, list(self._upserts.values()), sorted(self._removed))

    def _table(self) -> list[Table]:
        """The whole table, in parts that each fit in half a frame."""
        budget = self.max_frame // 2
        parts: list[Table] = []
        part: list[AgentEntry] = []
        size = 0
        for entry in self.entries.values():
            cost = len(self.enc.encode(entry))
            if part and size + cost > budget:
                parts.append(Table(self.version, part, more=True))
                part, size = [], 0
            part.append(entry)
            size += cost
        parts.append(Table(self.version, part))
        return parts

    async def _receive(self) -> None:
        assert self.sock is not None
        while True:
            payload = await self.sock.recv()
            try:
                frame = self.dec.decode(payload)
            except msgspec.DecodeError:
                continue
            if isinstance(frame, Reconnect):
                self.broker_restarted()
            elif isinstance(frame, TableOk):
                if frame.version == self.version:
                    self.confirmed = frame.version
                    self._confirmed.set()
                    self._changed.set()
            elif isinstance(frame, AgentEvent):
                event = BrokerEvent(frame.event, frame.name, frame.incarnation)
                self._call(self.on_event, event, frame.event)
            elif isinstance(frame, Stats):
                if self._stats is not None and not self._stats.done():
                    self._stats.set_result(frame)
            elif isinstance(frame, Notice) and self.on_notice is not None:
                self._call(self.on_notice, frame, frame.event)
            elif isinstance(frame, (Spawn, Terminate)) and self.on_request is not None:
                request = (frame, self._replier(frame))
                self._call(lambda r: self.on_request(*r), request, type(frame).__name__)

    def _replier(self, frame: Spawn | Terminate) -> Callable[[bool, str | None], None]:
        """How the daemon answers one request: a spawn_reply routed back to its caller."""

        def reply(ok: bool, error: str | None) -> None:
            if self.sock is None or frame.caller is None:
                return
            answer = SpawnReply(frame.id, ok, error, to=frame.caller)
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send(self.enc.encode(answer), zmq.NOBLOCK)

        return reply

    @staticmethod
    def _call(callback: Callable[[Any], None], arg: Any, about: str) -> None:
        try:
            callback(arg)
        except Exception:  # the daemon's callback must not kill the link
            # Not `event=`: that is structlog's own first argument (a TypeError here
            # would end the receive loop, the very thing this guards against).
            _log().exception("bus.link_callback_failed", about=about)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        if self.sock is not None:
            self.sock.close(0)
        self.ctx.term()
