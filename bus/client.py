"""`Client`: a synchronous bus peer for scripts and servers that are not agents.

    with Client(name="loader") as c:                 # endpoint: $AGENTD_BUS by default
        c.send("worker", "doc.created", {"id": 1})   # BusError if refused
        c.publish("doc.created", {"id": 2})
        reply = c.request("worker", "doc.summarize", {"id": 3}, timeout=5.0)

Each signal starts a new trace, unless the call is given a `traceparent` (a
server that received one in a request of its own): then it is a new span in
that trace. `trace(id)` is the broker's record of a signal's whole trace.

Plain pyzmq, no asyncio, no threads: `agentd ctl send/publish/request` use
it and start fast. Every call that reports success waited for the broker's
receipt (or the reply).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

import zmq

from .envelope import (
    Batch,
    DeadLetter,
    Dlq,
    DlqReply,
    Error,
    Hello,
    Receipt,
    Signal,
    Stats,
    Subscribe,
    Trace,
    TraceRecord,
    TraceReply,
    encoder,
    peer_decoder,
)
from .envelope import signal as make_signal
from .tracecontext import child


class BusError(Exception):
    """The broker refused a signal (unknown recipient, full queue, ...) or a handler failed."""


class BusTimeout(BusError, TimeoutError):
    """No receipt or reply in time."""


class RemoteError(BusError):
    """The request reached its handler, which answered with an error (asking again won't help)."""


class Client:
    """A named DEALER on the bus; one request at a time."""

    def __init__(
        self,
        endpoint: str | None = None,
        name: str | None = None,
        *,
        keys_dir: str | None = None,
        receipt_timeout: float = 5.0,
    ) -> None:
        endpoint = endpoint or os.environ.get("AGENTD_BUS")
        if not endpoint:
            raise BusError("no bus endpoint: pass one or set AGENTD_BUS")
        self.endpoint = endpoint
        self.name = name or f"client-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.receipt_timeout = receipt_timeout
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, self.name.encode())
        self._sock.setsockopt(zmq.LINGER, 1000)
        if endpoint.startswith("tcp://"):
            from pathlib import Path

            from agentd.daemon.keys import client_curve

            keys_dir = keys_dir or os.environ.get("AGENTD_KEYS_DIR")
            if not keys_dir:
                raise BusError("a tcp bus endpoint needs keys_dir (CurveZMQ)")
            client_curve(self._sock, Path(keys_dir))
        self._sock.connect(endpoint)
        self._enc = encoder()
        self._dec = peer_decoder()
        self._sock.send(self._enc.encode(Hello(self.name, 0, os.getpid())))
        self.inbox: list[Signal] = []  # signals that arrived while we waited for something else

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, linger: float | None = None) -> None:
        """Close; unsent frames get `linger` seconds (default: the socket's 1 s)."""
        if not self._sock.closed:
            self._sock.close(None if linger is None else int(linger * 1000))
            self._ctx.term()

    # --- sending -------------------------------------------------------------------------

    def send(
        self,
        to: str,
        type: str,
        data: Any = None,
        *,
        receipt: bool = True,
        traceparent: str | None = None,
    ) -> None:
        """A direct signal to an agent, a pool or a client; BusError if refused."""
        tp = child(traceparent)
        self._emit(make_signal(type, data, self.name, to=to, receipt=receipt, traceparent=tp))

    def publish(
        self, type: str, data: Any = None, *, receipt: bool = True, traceparent: str | None = None
    ) -> int:
        """To every subscriber whose pattern matches; the number it went to."""
        tp = child(traceparent)
        return self._emit(make_signal(type, data, self.name, receipt=receipt, traceparent=tp))

    def subscribe(self, *patterns: str) -> None:
        """Receive published signals matching these patterns (see `receive`).

        Returns once the broker has them: it handles one peer's frames in order,
        so its answer to the STATS asked right after means the SUBSCRIBE is done.
        """
        self._sock.send(self._enc.encode(Subscribe(list(patterns))))
        self.stats()

    def stats(self) -> dict[str, int]:
        """The broker's counters (routed, delivered, held, malformed, ...)."""
        self._sock.send(self._enc.encode(Stats()))
        deadline = time.monotonic() + self.receipt_timeout
        while True:
            frame = self._next(deadline, f"no answer from the broker at {self.endpoint}")
            if isinstance(frame, Stats):
                return frame.counters
            self._keep(frame)

    def send_batch(
        self, signals: list[tuple[str | None, str, Any]], *, traceparent: str | None = None
    ) -> None:
        """Many signals in one frame (no receipts): [(to or None, type, data), ...]."""
        batch = [
            make_signal(t, d, self.name, to=to, traceparent=child(traceparent))
            for to, t, d in signals
        ]
        self._sock.send(self._enc.encode(Batch(batch)))

    def send_confirmed(
        self,
        signals: Iterable[tuple[str | None, str, Any]],
        *,
        window: int = 256,
        traceparent: str | None = None,
    ) -> list[Receipt]:
        """Pipelined receipted sends: up to `window` unconfirmed at a time.

        `signals` are (to or None, type, data). Returns one receipt per signal,
        in order; a refused one has `ok=False` and its `error` (for example
        "full") — nothing raises for a refusal, so a caller sees exactly which
        signals the broker accepted. BusTimeout if the broker stops answering.
        """
        receipts: dict[str, Receipt] = {}
        order: list[str] = []
        waiting: set[str] = set()
        enc, sock = self._enc, self._sock
        for to, type_, data in signals:
            tp = child(traceparent)
            sig = make_signal(type_, data, self.name, to=to, receipt=True, traceparent=tp)
            order.append(sig.id)
            waiting.add(sig.id)
            sock.send(enc.encode(sig))
            while len(waiting) >= window:
                self._collect(waiting, receipts)
        while waiting:
            self._collect(waiting, receipts)
        return [receipts[i] for i in order]

    def _collect(self, waiting: set[str], receipts: dict[str, Receipt]) -> None:
        """Take the next frame: a receipt (or error) for one of `waiting`, or keep it."""
        frame = self._next(time.monotonic() + self.receipt_timeout, "no receipt from the broker")
        if isinstance(frame, Receipt) and frame.id in waiting:
            waiting.discard(frame.id)
            receipts[frame.id] = frame
        elif isinstance(frame, Error) and frame.id in waiting:
            waiting.discard(frame.id)
            receipts[frame.id] = Receipt(frame.id, False, error=frame.reason)
        else:
            self._keep(frame)

    def dead_letters(self, agent: str | None = None) -> list[DeadLetter]:
        """The broker's dead-letter queue (of one agent, or all)."""
        return self._dlq(Dlq("list", agent))

    def redrive(self, agent: str | None = None, id: str | None = None) -> list[DeadLetter]:
        """Deliver dead letters again (their count reset); returns those moved."""
        return self._dlq(Dlq("redrive", agent, id))

    def purge(self, agent: str | None = None, id: str | None = None) -> list[DeadLetter]:
        """Drop dead letters for good; returns those dropped."""
        return self._dlq(Dlq("purge", agent, id))

    def _dlq(self, query: Dlq) -> list[DeadLetter]:
        self._sock.send(self._enc.encode(query))
        deadline = time.monotonic() + self.receipt_timeout
        while True:
            frame = self._next(deadline, f"no answer from the broker at {self.endpoint}")
            if isinstance(frame, DlqReply):
                if frame.error:
                    raise BusError(frame.error)
                return frame.dead_letters
            if isinstance(frame, Error) and frame.id is None:
                raise BusError(frame.reason)
            self._keep(frame)

    def trace(self, id: str) -> list[TraceRecord]:
        """The broker's records of every signal in the trace of signal `id` (or trace id `id`).

        BusError if the broker knows neither (its ring holds the last signals only).
        """
        self._sock.send(self._enc.encode(Trace(id)))
        deadline = time.monotonic() + self.receipt_timeout
        while True:
            frame = self._next(deadline, f"no answer from the broker at {self.endpoint}")
            if isinstance(frame, TraceReply):
                if frame.error:
                    raise BusError(frame.error)
                return frame.records
            if isinstance(frame, Error) and frame.id is None:
                raise BusError(frame.reason)
            self._keep(frame)

    def request(
        self,
        to: str,
        type: str,
        data: Any = None,
        timeout: float = 5.0,
        *,
        traceparent: str | None = None,
    ) -> Any:
        """Send a request and wait for its reply's data."""
        correlation = uuid.uuid4().hex
        tp = child(traceparent)
        sig = make_signal(type, data, self.name, to=to, correlation_id=correlation, traceparent=tp)
        self._sock.send(self._enc.encode(sig))
        deadline = time.monotonic() + timeout
        while True:
            frame = self._next(deadline, f"no reply from {to} within {timeout}s")
            if isinstance(frame, Signal) and frame.reply and frame.correlation_id == correlation:
                if frame.error is not None:
                    raise RemoteError(f"{to}: {frame.error}")
                return frame.data
            if isinstance(frame, Error) and frame.id == sig.id:
                raise BusError(frame.reason)
            self._keep(frame)

    def receive(self, timeout: float | None = None) -> Signal | None:
        """The next signal sent to this client (None on timeout)."""
        if self.inbox:
            return self.inbox.pop(0)
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            try:
                frame = self._next(deadline, "")
            except BusTimeout:
                return None
            if isinstance(frame, Signal):
                return frame
            if isinstance(frame, Batch):
                self.inbox.extend(frame.signals)
                return self.inbox.pop(0) if self.inbox else None

    # --- internals --------------------------------------------------------------------

    def _emit(self, sig: Signal) -> int:
        self._sock.send(self._enc.encode(sig))
        if not sig.receipt:
            return 0
        deadline = time.monotonic() + self.receipt_timeout
        while True:
            frame = self._next(deadline, f"no receipt from the broker at {self.endpoint}")
            if isinstance(frame, Receipt) and frame.id == sig.id:
                if not frame.ok:
                    raise BusError(frame.error or "refused")
                return frame.delivered
            if isinstance(frame, Error) and frame.id == sig.id:
                raise BusError(frame.reason)
            self._keep(frame)

    def _next(self, deadline: float, why: str) -> Any:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._sock.poll(int(remaining * 1000)):
            raise BusTimeout(why)
        return self._dec.decode(self._sock.recv())

    def _keep(self, frame: Any) -> None:
        if isinstance(frame, Signal) and not frame.reply:
            self.inbox.append(frame)
        elif isinstance(frame, Batch):
            self.inbox.extend(frame.signals)
