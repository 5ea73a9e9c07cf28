"""The idle SDK agent of bench/scale.py: it answers one signal and otherwise waits."""

from agentd.agents import Agent, on


class Idle(Agent):
    @on("idle.ping")
    def ping(self, signal, ctx):
        return "pong"
