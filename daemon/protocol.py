"""Frames between `agentd ctl` and the daemon's control socket (MessagePack).

A ctl DEALER sends one `Request`; the daemon's ROUTER answers at once with
`Ack` (so ctl can tell "no daemon" from "slow command" within two seconds),
then zero or more `Item`s (for `-f` streams and long listings) and finally one
`Reply`. This module is imported by ctl, so it stays tiny: msgspec only.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Request(msgspec.Struct, tag="request"):
    cmd: str
    args: dict[str, Any] = {}


class Ack(msgspec.Struct, tag="ack"):
    pass


class Item(msgspec.Struct, tag="item"):
    data: Any


class Reply(msgspec.Struct, tag="reply"):
    ok: bool
    data: Any = None
    error: str | None = None
    code: int = 0  # ctl's exit status: 0 done, 1 refused


Frame = Request | Ack | Item | Reply

encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Frame)
