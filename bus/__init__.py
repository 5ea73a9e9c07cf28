"""agentd bus: the ZeroMQ broker, its wire envelope, and the client.

`from agentd.bus import Client, BusError` is all a script needs.

The client is imported on first use (PEP 562), not with the package: `agentd
ctl`, kept import-light, needs only `agentd.bus.endpoint` for most commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import BusError, BusTimeout, Client, RemoteError

__all__ = ["BusError", "BusTimeout", "Client", "RemoteError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
