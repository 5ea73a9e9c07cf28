"""The agent SDK: subclass `Agent`, route signals with `@on`, run under agentd.

    class Summarizer(Agent):
        def setup(self): ...                       # once per process, before READY
        @on("doc.created")                         # a route, and a subscription
        async def summarize(self, signal, ctx):    # def or async def
            await ctx.emit("doc.summarized", {"id": signal.data["id"]})
            return {"ok": True}                    # the reply, if it was a request

The runner (`AgentRunner`) does the protocol for you: HELLO with the routes as
subscriptions, `setup()`, READY, a heartbeat every `heartbeat / 3` seconds,
replies and error replies, acks (for `ack = true` agents), and a graceful
SIGTERM — no new signals, the handlers in flight finish, then exit 0.

Dynamic supervisors (SPEC §12): `await ctx.spawn(supervisor, name, args)` starts
a child from the supervisor's template and `await ctx.terminate(name)` stops
one; agentd answers over the bus (RemoteError with its reason if it cannot). A
spawned child finds its args in `self.args`.

Tracing: while a handler runs, whatever it sends, emits or requests, and its
reply, is a new span in the handled signal's trace (`traceparent`) with
`causation_id` = the handled signal's id — also from tasks the handler
starts, and through `self.ctx`, since the handling is a context variable of
the task. Anything sent outside a handler (`setup`, a background task it
starts) begins a new trace; `with ctx.trace(traceparent):` continues one
that came from elsewhere (an HTTP header, say).

`def` handlers run on the agent's own event loop. That is deliberate: a
handler that blocks forever also stops the heartbeat, so the broker reports
the agent hung and agentd restarts it. Use `async def` for anything that
waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import os
import signal as signals
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from agentd.bus.client import BusError, BusTimeout, RemoteError
from agentd.bus.endpoint import parse_endpoint
from agentd.bus.envelope import (
    Ack,
    Batch,
    Bye,
    Error,
    Heartbeat,
    Hello,
    Nack,
    Ready,
    Receipt,
    Reconnect,
    Signal,
    Spawn,
    SpawnReply,
    Terminate,
    encoder,
    new_id,
    peer_decoder,
)
from agentd.bus.envelope import signal as make_signal
from agentd.bus.patterns import Trie
from agentd.bus.tracecontext import accept, new_trace, next_span

Handler = Callable[..., Any]

# (traceparent, signal id) of the signal being handled in this task, if any: what a
# signal sent now is caused by. A context variable, so each handler (and every task it
# starts) sees its own, whether it is a `def` or an `async def` and however many run.
_cause: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "agentd_cause", default=None
)


def _caused() -> tuple[str, str | None]:
    """(traceparent, causation_id) for a signal sent now: a child of the cause, or a new trace."""
    cause = _cause.get()
    if cause is None:
        return new_trace(), None
    return next_span(cause[0]), cause[1]


__all__ = ["Agent", "BusError", "BusTimeout", "Context", "Signal", "on"]


def on(*patterns: str) -> Callable[[Handler], Handler]:
    """Route signals whose type matches `pattern` to this method (and subscribe to them)."""

    def mark(fn: Handler) -> Handler:
        fn.__dict__.setdefault("_agentd_routes", []).extend(patterns)
        return fn

    return mark


class Context:
    """What a handler (or any agent code) uses to talk on the bus."""

    def __init__(self, runner: AgentRunner, signal: Signal | None = None) -> None:
        self._runner = runner
        self.signal = signal

    @property
    def name(self) -> str:
        return self._runner.name

    @property
    def incarnation(self) -> int:
        return self._runner.incarnation

    async def emit(self, type: str, data: Any = None, *, subject: str | None = None) -> int:
        """Publish to every agent subscribed to a matching pattern; how many it reached.

        Returns once the broker has it (journaled, for `ack = true` subscribers), so an
        agent that acks its own signal after an emit never acks work whose result was
        lost; BusError if the broker refused it.
        """
        tp, cause = _caused()
        sig = make_signal(
            type, data, self.name, subject=subject, receipt=True, traceparent=tp, causation_id=cause
        )
        return (await self._runner.send_with_receipt(sig)).delivered

    async def send(self, to: str, type: str, data: Any = None) -> None:
        """Direct to an agent, a pool (one member) or a client; BusError if refused."""
        tp, cause = _caused()
        await self._runner.send_with_receipt(
            make_signal(
                type, data, self.name, to=to, receipt=True, traceparent=tp, causation_id=cause
            )
        )

    async def request(self, to: str, type: str, data: Any = None, timeout: float = 5.0) -> Any:
        """Send a request and wait for the reply's data (BusTimeout, BusError)."""
        return await self._runner.request(to, type, data, timeout)

    async def spawn(
        self, supervisor: str, name: str, args: Any = None, timeout: float = 30.0
    ) -> None:
        """Start child `name` of dynamic `supervisor` (its `self.args` = `args`); once it runs.

        RemoteError with agentd's reason if it cannot (name taken, max_children, ...).
        """
        tp, cause = _caused()
        frame = Spawn(new_id(), supervisor, name, args, traceparent=tp, causation_id=cause)
        await self._runner.ask_daemon(frame, f"spawn {name}", timeout)

    async def terminate(self, name: str, timeout: float = 30.0) -> None:
        """Stop dynamic child `name` for good; returns once it is gone."""
        tp, cause = _caused()
        frame = Terminate(new_id(), name, traceparent=tp, causation_id=cause)
        await self._runner.ask_daemon(frame, f"terminate {name}", timeout)

    @contextlib.contextmanager
    def trace(self, traceparent: str | None = None) -> Iterator[str]:
        """Within the block, what this task sends is in the trace of `traceparent`.

        For work that comes from outside the bus with a W3C `traceparent` (an
        HTTP request's header): invalid or None starts a new trace. Yields the
        traceparent in effect, to hand back to the caller.
        """
        tp = accept(traceparent)
        token = _cause.set((tp, None))
        try:
            yield tp
        finally:
            _cause.reset(token)


class Agent:
    """Base class for agents: override `setup` and add `@on` handlers."""

    name: str
    incarnation: int
    ctx: Context
    args: Any = None  # a dynamic child's spawn args (decoded AGENTD_ARGS); else None

    def setup(self) -> Awaitable[None] | None:
        """Once per process, before READY. May be async."""

    def teardown(self) -> Awaitable[None] | None:
        """Once, on graceful shutdown, after the last handler finished. May be async."""


class AgentRunner:
    """Runs one Agent instance on the bus."""

    def __init__(
        self,
        agent: Agent,
        name: str,
        incarnation: int,
        endpoint: str,
        heartbeat: float = 10.0,
        ack: bool = False,
    ) -> None:
        self.agent = agent
        self.name = name
        self.incarnation = incarnation
        self.endpoint = endpoint
        self.heartbeat = heartbeat
        self.ack = ack
        self.enc = encoder()
        self.dec = peer_decoder()
        self.routes: list[tuple[str, Handler]] = []
        self.trie = Trie()
        self.rank: list[tuple[int, int, int, int]] = []
        seen: set[str] = set()
        for klass in type(agent).__mro__:  # subclass first, then in definition order
            for attr, fn in vars(klass).items():
                if attr in seen:
                    continue
                seen.add(attr)
                for pattern in getattr(fn, "_agentd_routes", ()):
                    index = len(self.routes)
                    self.routes.append((pattern, getattr(agent, attr)))
                    self.rank.append((*_specificity(pattern), index))
                    self.trie.add(pattern, str(index))
        self.receipts: dict[str, asyncio.Future[Receipt]] = {}
        self.daemon_asks: dict[str, asyncio.Future[SpawnReply]] = {}  # spawn, terminate
        self.requests: dict[str, asyncio.Future[Signal]] = {}
        self.inflight: set[asyncio.Task[Any]] = set()
        self._acks: list[str] = []  # handled, not yet acknowledged (sent once per turn)
        self.stopping = False
        self.ready = False
        self.zmq_context = zmq.asyncio.Context()
        self.sock = self.zmq_context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, name.encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self._raw = zmq.Socket.shadow(self.sock.underlying)  # for heartbeats (_beat)
        self._heartbeat_frame = self.enc.encode(Heartbeat())
        self._beat_timer: asyncio.TimerHandle | None = None
        self._done = asyncio.Event()
        from agentd.bus.log import get_logger

        self.log = get_logger("agentd.agent").bind(agent=name)

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signals.SIGTERM, signals.SIGINT):
            loop.add_signal_handler(sig, self._on_term)
        if parse_endpoint(self.endpoint).needs_keys:
            self._curve()
        self.sock.connect(self.endpoint)
        self.agent.name = self.name
        self.agent.incarnation = self.incarnation
        self.agent.args = _spawn_args()
        self.agent.ctx = Context(self)
        self.send(self._hello())
        self._beat()
        result = self.agent.setup()
        if inspect.isawaitable(result):
            await result
        self.send(Ready())
        self.ready = True
        self.log.info(
            "agent.ready", incarnation=self.incarnation, routes=sorted({p for p, _ in self.routes})
        )
        receiver = loop.create_task(self._receive())
        await self._done.wait()
        receiver.cancel()
        if self.inflight:
            await asyncio.gather(*self.inflight, return_exceptions=True)
        result = self.agent.teardown()
        if inspect.isawaitable(result):
            await result
        self._beat_timer.cancel()
        self._flush_acks()
        self.send(Bye())
        self.sock.close(linger=2000)
        self.zmq_context.term()
        return 0

    def _curve(self) -> None:
        """A tcp bus is CurveZMQ only: the client keys agentd hands over in AGENTD_KEYS_DIR."""
        from pathlib import Path

        from agentd.bus.keys import client_curve

        keys_dir = os.environ.get("AGENTD_KEYS_DIR")
        if not keys_dir:
            raise BusError("a tcp bus needs AGENTD_KEYS_DIR (CurveZMQ keys)")
        client_curve(self.sock, Path(keys_dir))

    def _hello(self) -> Hello:
        patterns = sorted({p for p, _ in self.routes})
        return Hello(self.name, self.incarnation, os.getpid(), patterns)

    def _on_term(self) -> None:
        """Graceful stop: finish what is in flight, then exit 0."""
        self.stopping = True
        self._done.set()

    def _beat(self) -> None:
        """A heartbeat, and the next in heartbeat/3 s: a loop timer, so a stuck loop stops it.

        It is what an idle agent costs, so it is the cheapest send there is: one
        pre-encoded frame, written on a non-owning shadow of the socket rather than
        through pyzmq's asyncio send, whose futures and event rescheduling doubled an
        idle agent's CPU (bench/scale.py). A full queue (SNDHWM) skips a beat: the
        broker is not reading anyway.
        """
        with contextlib.suppress(zmq.Again):
            self._raw.send(self._heartbeat_frame, zmq.NOBLOCK)
        self._beat_timer = asyncio.get_running_loop().call_later(
            max(0.05, self.heartbeat / 3), self._beat
        )

    # --- sending -------------------------------------------------------------------------

    def send(self, frame: Any) -> None:
        self.sock.send(self.enc.encode(frame), copy=True)

    async def _answer(
        self, waiting: dict[str, asyncio.Future[Any]], frame: Any, timeout: float, late: str
    ) -> Any:
        """Send `frame` and wait for the answer filed under its id in `waiting`.

        The receiving side resolves the future; BusTimeout(`late`) after `timeout`.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiting[frame.id] = future
        self.send(frame)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise BusTimeout(late) from None
        finally:
            waiting.pop(frame.id, None)

    async def send_with_receipt(self, sig: Signal, timeout: float = 5.0) -> Receipt:
        late = f"no receipt for {sig.type} to {sig.to} in {timeout}s"
        receipt = await self._answer(self.receipts, sig, timeout, late)
        if not receipt.ok:
            raise BusError(receipt.error or "refused")
        return receipt

    async def request(self, to: str, type: str, data: Any, timeout: float) -> Any:
        tp, cause = _caused()
        sig = make_signal(type, data, self.name, to=to, traceparent=tp, causation_id=cause)
        sig = msgspec.structs.replace(sig, correlation_id=sig.id)
        late = f"no reply from {to} to {type} within {timeout}s"
        reply = await self._answer(self.requests, sig, timeout, late)
        if reply.error is not None:
            raise RemoteError(f"{to}: {reply.error}")
        return reply.data

    async def ask_daemon(self, frame: Spawn | Terminate, what: str, timeout: float) -> None:
        """Send a spawn/terminate (the broker hands it to agentd); raise unless it is done."""
        late = f"no answer to {what} within {timeout}s"
        answer = await self._answer(self.daemon_asks, frame, timeout, late)
        if not answer.ok:
            raise RemoteError(answer.error or "refused")

    # --- receiving -------------------------------------------------------------------------

    async def _receive(self) -> None:
        while not self.stopping:
            payload = await self.sock.recv()
            try:
                frame = self.dec.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.log.warning("agent.bad_frame", error=str(exc))
                continue
            if isinstance(frame, Signal):
                await self._signal(frame)
            elif isinstance(frame, Batch):
                for sig in frame.signals:
                    await self._signal(sig)
            elif isinstance(frame, Receipt):
                future = self.receipts.get(frame.id)
                if future is not None and not future.done():
                    future.set_result(frame)
            elif isinstance(frame, SpawnReply):
                asked = self.daemon_asks.get(frame.id)
                if asked is not None and not asked.done():
                    asked.set_result(frame)
            elif isinstance(frame, Error):
                self._error(frame)
            elif isinstance(frame, Reconnect):
                # The broker was restarted and forgot us: announce again.
                self.send(self._hello())
                if self.ready:
                    self.send(Ready())
            self._flush_acks()

    def _error(self, error: Error) -> None:
        if error.id is not None:
            future = self.requests.get(error.id)
            if future is not None and not future.done():
                future.set_exception(BusError(error.reason))
                return
        self.log.warning("agent.bus_error", reason=error.reason, id=error.id, to=error.to)

    async def _signal(self, sig: Signal) -> None:
        if sig.reply:
            future = self.requests.get(sig.correlation_id or "")
            if future is not None and not future.done():
                future.set_result(sig)
            return
        matches = self.trie.match(sig.type)
        if not matches:
            if sig.correlation_id is not None:
                self._reply(sig, None, f"no handler for {sig.type!r}")
            self._ack(sig)
            return
        # The most specific matching route wins; among equals, the first defined.
        _, handler = self.routes[min(self.rank[int(i)] for i in matches)[-1]]
        ctx = Context(self, sig)
        # What the handler sends is caused by `sig`: the task copies this at creation.
        token = _cause.set((accept(sig.traceparent), sig.id))  # checked once, here
        try:
            if inspect.iscoroutinefunction(handler):
                loop = asyncio.get_running_loop()
                task = loop.create_task(self._run_async(handler, sig, ctx))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
                return
            try:
                result = handler(sig, ctx)  # on the loop, by design (see the module docstring)
            except Exception as exc:
                self._failed(sig, exc)
            else:
                self._done_with(sig, result)
        finally:
            _cause.reset(token)
        # A busy agent is not a hung one: between two `def` handlers the loop runs its
        # timers, so heartbeats keep going out however long the backlog.
        await asyncio.sleep(0)

    async def _run_async(self, handler: Handler, sig: Signal, ctx: Context) -> None:
        try:
            result = await handler(sig, ctx)
        except Exception as exc:
            self._failed(sig, exc)
        else:
            self._done_with(sig, result)

    def _failed(self, sig: Signal, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        self.log.error(
            "agent.handler_failed",
            type=sig.type,
            id=sig.id,
            error=error,
            traceback="".join(traceback.format_exception(exc)),
        )
        if sig.correlation_id is not None:
            self._ack(sig)  # on a request, the error reply is the outcome
            self._reply(sig, None, error)
        elif self.ack:
            self._flush_acks()
            self.send(Nack([sig.id], error))  # a failed delivery: retried after a backoff

    def _done_with(self, sig: Signal, result: Any) -> None:
        # The broker settles a request by its reply and anything else by this ack,
        # so their order does not matter.
        self._ack(sig)
        if sig.correlation_id is not None:
            self._reply(sig, result, None)

    def _reply(self, sig: Signal, data: Any, error: str | None) -> None:
        reply = make_signal(
            f"{sig.type}.reply",
            data,
            self.name,
            to=sig.reply_to or sig.source,
            correlation_id=sig.correlation_id,
            traceparent=next_span(_reply_parent(sig)),
            causation_id=sig.id,
        )
        self.send(msgspec.structs.replace(reply, reply=True, error=error))

    def _ack(self, sig: Signal) -> None:
        """Acks go out together: at the end of the frame in hand, or on the next loop turn."""
        if not self.ack:
            return
        self._acks.append(sig.id)
        if len(self._acks) == 1:
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        if self._acks:
            ids, self._acks = self._acks, []
            self.send(Ack(ids))


def _spawn_args() -> Any:
    """AGENTD_ARGS decoded (a dynamic child's spawn args), None when absent."""
    text = os.environ.get("AGENTD_ARGS")
    return None if text is None else json.loads(text)


def _reply_parent(sig: Signal) -> str:
    """The reply is in the trace the handler's sends went into (one trace, even if invalid)."""
    cause = _cause.get()
    return cause[0] if cause is not None and cause[1] == sig.id else accept(sig.traceparent)


def _specificity(pattern: str) -> tuple[int, int, int]:
    """Sort key: fewer `**`, then fewer `*`, then more segments = more specific."""
    segments = pattern.split(".")
    return segments.count("**"), segments.count("*"), -len(segments)


def load(target: str) -> type[Agent]:
    """`pkg.mod:Class` → the class."""
    import importlib

    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise TypeError(f"{target} is not an agentd.agents.Agent subclass")
    return cls


def main(argv: list[str] | None = None) -> int:
    """`python -m agentd.agents pkg.mod:Class`, configured by AGENTD_* variables."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or ":" not in argv[0]:
        print("usage: python -m agentd.agents pkg.mod:Class", file=sys.stderr)
        return 2
    from agentd.bus.log import configure

    configure("console")
    if _endpoint_problem():
        return 2
    sys.path.insert(0, os.getcwd())
    return run_class(load(argv[0]), argv[0].rpartition(":")[2].lower())


def _endpoint_problem() -> bool:
    """AGENTD_BUS missing or malformed: say so on stderr."""
    endpoint = os.environ.get("AGENTD_BUS")
    if not endpoint:
        print("AGENTD_BUS is not set (the bus endpoint)", file=sys.stderr)
        return True
    try:
        parse_endpoint(endpoint)
    except ValueError as exc:
        print(f"AGENTD_BUS: {exc}", file=sys.stderr)
        return True
    return False


def run_class(cls: type[Agent], default_name: str | None = None) -> int:
    """Run one instance of `cls` on the bus named by AGENTD_*, until it stops.

    The one path from a loaded class to a running agent: `main` (exec) and a warm
    template's forked child (agents/template.py) both end here.
    """
    env = os.environ
    if _endpoint_problem():
        return 2
    runner = AgentRunner(
        cls(),
        name=env.get("AGENTD_NAME") or default_name or cls.__name__.lower(),
        incarnation=int(env.get("AGENTD_INCARNATION", "0")),
        endpoint=env["AGENTD_BUS"],
        heartbeat=float(env.get("AGENTD_HEARTBEAT", "10")),
        ack=env.get("AGENTD_ACK") == "1",
    )
    return asyncio.run(runner.run())
