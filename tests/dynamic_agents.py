"""SDK agents for tests/test_dynamic.py: a dynamic child, and an agent that spawns them."""

from __future__ import annotations

import os
import signal as signals

from agentd.agents import Agent, on
from agentd.bus import BusError


class Session(Agent):
    """A dynamic child: tells what it was spawned with; ends normally when told."""

    @on("session.args")
    def args_(self, signal, ctx):
        return {"args": self.args, "env": os.environ.get("AGENTD_ARGS"), "pid": os.getpid()}

    @on("session.quit")
    def quit(self, signal, ctx):
        os.kill(os.getpid(), signals.SIGTERM)  # the SDK's graceful stop: exit 0, a normal end


class Spawner(Agent):
    """Spawns and terminates dynamic children when asked (ctx.spawn / ctx.terminate)."""

    @on("spawner.spawn")
    async def spawn(self, signal, ctx):
        d = signal.data
        try:
            await ctx.spawn(d["supervisor"], d["name"], d.get("args"))
        except BusError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True}

    @on("spawner.terminate")
    async def terminate(self, signal, ctx):
        try:
            await ctx.terminate(signal.data)
        except BusError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True}
