"""agentd bus: the ZeroMQ broker, its wire envelope, and the client.

`from agentd.bus import Client, BusError` is all a script needs.
"""

from .client import BusError, BusTimeout, Client, RemoteError

__all__ = ["BusError", "BusTimeout", "Client", "RemoteError"]
