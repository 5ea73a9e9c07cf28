"""SDK agents used by the bus tests (run as `python -m agentd.agents tests.bus_agents:X`)."""

from __future__ import annotations

import asyncio
import json
import os
import time

from agentd.agents import Agent, on


def record(name: str, entry: dict) -> None:
    path = os.path.join(os.environ["REC_DIR"], f"{name}.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (json.dumps(entry) + "\n").encode())
    os.close(fd)


class Recorder(Agent):
    """Records every signal it gets; replies with what it got."""

    def setup(self) -> None:
        record(self.name, {"setup": self.incarnation, "pid": os.getpid()})

    @on("**")
    async def anything(self, signal, ctx):
        record(
            ctx.name,
            {
                "type": signal.type,
                "data": signal.data,
                "source": signal.source,
                "redelivered": signal.redelivered,
                "incarnation": ctx.incarnation,
                "id": signal.id,
                "traceparent": signal.traceparent,
                "causation_id": signal.causation_id,
            },
        )
        if signal.type == "work.slow":
            await asyncio.sleep(60)
        return {"got": signal.data, "by": ctx.name}


class Blocker(Agent):
    """A def handler that never returns: the heartbeat stops, the agent is hung."""

    @on("block")
    def block(self, signal, ctx):
        record(ctx.name, {"blocking": True})
        while True:
            time.sleep(1)

    @on("ping")
    def ping(self, signal, ctx):
        return "pong"


class Relay(Agent):
    """Uses ctx.send / ctx.emit / ctx.request from inside a handler."""

    @on("relay.request")
    async def relay(self, signal, ctx):
        answer = await ctx.request(signal.data["to"], "echo", signal.data["value"], timeout=3)
        await ctx.emit("relay.done", {"answer": answer})
        return answer


class Tracer(Agent):
    """Sends, emits and requests while handling, for the trace tests (tests/test_trace.py)."""

    def setup(self) -> None:
        self.tasks: set[asyncio.Future] = set()
        self.wake: asyncio.Queue[str] = asyncio.Queue()
        # The agent's own background task, started outside any handler: a new trace.
        self.tasks.add(asyncio.get_running_loop().create_task(self.loop()))

    async def loop(self) -> None:
        while True:
            await self.ctx.send(await self.wake.get(), "trace.background")

    @on("trace.fan")
    async def fan(self, signal, ctx):
        to = signal.data["to"]
        await asyncio.sleep(signal.data.get("wait", 0))  # concurrent handlers interleave
        await ctx.send(to, "trace.sent", signal.data)
        await self.ctx.emit("trace.emitted", signal.data)  # the agent-wide ctx: the same
        return await ctx.request(to, "trace.asked", signal.data, timeout=3)

    @on("trace.spawn")
    def spawn(self, signal, ctx):
        """A def handler that starts a task: what the task sends is caused by `signal`."""
        to = signal.data["to"]
        self.tasks.add(asyncio.ensure_future(ctx.send(to, "trace.spawned")))
        self.wake.put_nowait(to)
        return "spawned"


class Worker(Agent):
    """Fails on request, or finishes slowly (for graceful SIGTERM)."""

    @on("work.fail")
    def fail(self, signal, ctx):
        raise ValueError(f"cannot do {signal.data}")

    @on("work.finish")
    async def finish(self, signal, ctx):
        record(ctx.name, {"type": signal.type, "started": True})
        await asyncio.sleep(1.0)
        record(ctx.name, {"type": signal.type, "finished": True})
        return "finished"

    @on("**")
    def echo(self, signal, ctx):
        return signal.data


class SlowSetup(Agent):
    """setup() never returns: HELLO without READY, hung after `heartbeat`."""

    def setup(self) -> None:
        while True:
            time.sleep(1)


class Ledger(Agent):
    """An ack = true sink: writes down each signal it handles (id, flags), then returns.

    The ledger file is the ground truth of the durability tests: a line is
    written (write(2), so it survives a kill -9 of the agent) before the SDK
    acks, so a signal that is acked is always in it, and a signal handled
    twice shows up twice.
    """

    @on("**")
    def take(self, signal, ctx):
        time.sleep(float(os.environ.get("LEDGER_SLEEP", "0")))
        record(
            ctx.name,
            {
                "id": signal.id,
                "redelivered": signal.redelivered,
                "deliveries": signal.deliveries,
                "pid": os.getpid(),
            },
        )
