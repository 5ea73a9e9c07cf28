"""Endpoints: the one reading of `ipc://PATH` and `tcp://HOST:PORT`.

agentd serves two ZeroMQ transports. An ipc socket is a file, guarded by its
permissions; a tcp port reaches past the host, so it is CurveZMQ only (there is
no unauthenticated network endpoint). Config validation, the daemon, the
broker, ctl, the Client and the SDK all ask `parse_endpoint` which one a string
is and what it names, so they cannot disagree about it — and a string that is
neither is refused here, with the forms it may take, not by ZeroMQ at bind time.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FORMS = "ipc://PATH or tcp://HOST:PORT"


class Endpoint(msgspec.Struct, frozen=True):
    """A parsed endpoint; `url` is the text as given, what ZeroMQ binds or connects to."""

    url: str
    scheme: Literal["ipc", "tcp"]
    path: str | None = None  # ipc: the socket file
    host: str | None = None  # tcp: a name, an address (IPv6 without its brackets) or *
    port: int | None = None  # tcp: 1..65535

    @property
    def needs_keys(self) -> bool:
        """True for tcp: a network endpoint needs CurveZMQ keys; an ipc one never does."""
        return self.scheme == "tcp"


def parse_endpoint(text: str) -> Endpoint:
    """`text` as an Endpoint; ValueError saying what is wrong and what would do.

    ZeroMQ's transport names are lower case (it refuses `TCP://`), and so are ours.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f"{text!r} is not an endpoint: expected {FORMS}")
    if scheme == "ipc":
        if not rest:
            raise ValueError(f"{text!r}: an ipc endpoint needs a socket path (ipc://PATH)")
        return Endpoint(text, "ipc", path=rest)
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            raise ValueError(f"{text!r}: a tcp endpoint needs a host and a port (tcp://HOST:PORT)")
        if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{text!r}: the tcp port must be a number from 1 to 65535")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return Endpoint(text, "tcp", host=host, port=int(port))
    raise ValueError(f"{text!r}: unknown transport {scheme!r}: expected {FORMS}")
