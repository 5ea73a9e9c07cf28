"""The hub's worker pools: `text` (TextWorker) and `math` (MathWorker).

Each pool member is one OS process; `replicas = N` in the config makes
members NAME@0 .. NAME@N-1, and the orchestrator addresses the *pool's* name:
the broker hands each task to one ready member, round robin.

The task contract (a Node.js worker implements it too, see
agents/examples/node/): a request whose type is the task type
(`task.text.upper`, `task.text.wordcount`, `task.math.sum`) and whose data
is the Task as a map — `{"job", "key", "pool", "type", "payload"}`. The
reply is the result map from `jobs.work`; a bad task is an error reply
(the handler raises).

With `ack = true` in the config a task stays the broker's until the
handler has finished: if this process dies mid-task, the broker gives the
task to another member of the pool, flagged `redelivered`. Nothing here has
to do anything for that — which is the point.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from agentd.agents import Agent, Context, Signal, on
from agentd.bus.log import get_logger

from .jobs import task_delay, work


class Worker(Agent):
    """What both pools share: log the task, take the asked-for time, do the work."""

    def setup(self) -> None:
        self.log = get_logger("agentd.worker").bind(agent=self.name, pid=os.getpid())

    async def handle(self, signal: Signal, ctx: Context) -> dict[str, Any]:
        task = signal.data
        payload = task["payload"]
        # One line per task, so `agentd ctl logs text@0` shows who is busy with what.
        self.log.info(
            "task.started",
            job=task["job"],
            key=task["key"],
            type=signal.type,
            redelivered=signal.redelivered,
        )
        delay = task_delay(payload)
        if delay:
            await asyncio.sleep(delay)  # async: the heartbeat goes on while we "work"
        return work(signal.type, payload)


class TextWorker(Worker):
    """The `text` pool: upper-casing and word counts."""

    @on("task.text.*")
    async def text(self, signal: Signal, ctx: Context) -> dict[str, Any]:
        return await self.handle(signal, ctx)


class MathWorker(Worker):
    """The `math` pool: sums."""

    @on("task.math.*")
    async def math(self, signal: Signal, ctx: Context) -> dict[str, Any]:
        return await self.handle(signal, ctx)
