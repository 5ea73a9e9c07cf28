"""agentd agent SDK: `from agentd.agents import Agent, on`.

See `agentd.agents.sdk` for the whole story; `python -m agentd.agents
pkg.mod:Class` runs an agent class under agentd (or standalone, given
AGENTD_BUS).
"""

from .sdk import Agent, BusError, BusTimeout, Context, RemoteError, Signal, on

__all__ = ["Agent", "BusError", "BusTimeout", "Context", "RemoteError", "Signal", "on"]
