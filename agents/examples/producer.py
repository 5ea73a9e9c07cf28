"""Topology 1's producer: a bounded workflow of two agents (etc/examples/single.toml).

Every `PRODUCER_INTERVAL` seconds (default 1) it makes a `math.sum` job of
a few random numbers, asks the worker named `PRODUCER_WORKER` (default
"math", a `MathWorker`) for the sum over the bus, checks the answer and
logs one line — so `agentd ctl logs producer` shows the workflow running:

    work.done  numbers=[3, 9, 4] sum=16 ms=1.2 ok=True

Kill the worker and the next request waits for its restart (the broker
holds it for a configured agent), then the lines go on: the tree at work.
It also shows that an agent is more than its handlers: `setup()` starts a
loop of its own on the agent's event loop, and `teardown()` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid

import msgspec

from agentd.agents import Agent, BusError
from agentd.bus.log import get_logger

from .jobs import split


class Producer(Agent):
    """Makes work, sends it to the worker, logs what came back."""

    def setup(self) -> None:
        self.interval = float(os.environ.get("PRODUCER_INTERVAL", "1.0"))
        self.worker = os.environ.get("PRODUCER_WORKER", "math")
        self.log = get_logger("agentd.producer").bind(agent=self.name)
        self.loop_task = asyncio.get_running_loop().create_task(self.produce())

    async def teardown(self) -> None:
        self.loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.loop_task

    async def produce(self) -> None:
        """Forever: one unit of work per interval; a failure is logged, not fatal."""
        while True:
            numbers = [random.randint(0, 9) for _ in range(3)]
            [task] = split(uuid.uuid4().hex, "math.sum", {"numbers": numbers})
            t0 = time.perf_counter()
            try:
                reply = await self.ctx.request(
                    self.worker, task.type, msgspec.to_builtins(task), timeout=10
                )
            except BusError as exc:  # BusTimeout too: the worker is restarting, say
                self.log.warning("work.failed", numbers=numbers, error=str(exc))
            else:
                ms = round((time.perf_counter() - t0) * 1000, 1)
                ok = reply.get("sum") == sum(numbers)
                self.log.info("work.done", numbers=numbers, sum=reply.get("sum"), ms=ms, ok=ok)
            await asyncio.sleep(self.interval)
