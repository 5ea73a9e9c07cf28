"""The bus wire format: MessagePack maps tagged by `kind` (see docs/PROTOCOL.md).

Every ZeroMQ message between a peer's DEALER and the broker's ROUTER is one
frame holding one of these structs. Two decoders exist for the same bytes:
peers decode `data` as a value, while the broker decodes it as
`msgspec.Raw` — it routes on the envelope alone and forwards the sender's
original bytes, so a payload is never decoded or re-encoded in transit.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

from .tracecontext import new_trace

Raw = msgspec.Raw


class _Frame(msgspec.Struct, tag_field="kind", omit_defaults=True, forbid_unknown_fields=False):
    pass


class Hello(_Frame, tag="hello"):
    """First frame of a connection: who this is (the DEALER's routing id is `name`)."""

    name: str
    incarnation: int = 0
    pid: int = 0
    subscribe: list[str] = []  # patterns routed to this peer (the SDK's @on routes)


class Ready(_Frame, tag="ready"):
    """The agent's setup is done: it is *started* as far as the tree is concerned."""


class Heartbeat(_Frame, tag="heartbeat"):
    """Any frame counts as a sign of life; this one is for when there is nothing else."""


class Bye(_Frame, tag="bye"):
    """A clean goodbye: the peer is leaving on purpose."""


class Reconnect(_Frame, tag="reconnect"):
    """Broker → peer: I do not know you (I was restarted): send HELLO (and READY) again."""


class Subscribe(_Frame, tag="subscribe"):
    """Add patterns for this peer after HELLO."""

    patterns: list[str]


class Signal(_Frame, tag="signal"):
    """A signal, CloudEvents-like, plus delivery flags."""

    id: str
    type: str
    source: str
    time: float
    data: Any = None
    subject: str | None = None
    to: str | None = None  # recipient (agent, pool or client); None = publish
    correlation_id: str | None = None  # set on requests and on their replies
    reply_to: str | None = None  # where a request's reply goes; default: source
    receipt: bool = False  # sender wants the broker's Receipt
    reply: bool = False  # this is the reply to the request with correlation_id
    error: str | None = None  # an error reply (the handler raised)
    redelivered: bool = False  # set by the broker on redelivery (ack = true agents)
    deliveries: int = 0  # set by the broker on a redelivery (ack = true): the count; 0 first
    traceparent: str | None = None  # W3C trace context: its trace, and its own span (tracecontext)
    causation_id: str | None = None  # the id of the signal being handled when this one was sent


class RawSignal(Signal, tag="signal"):
    """The broker's view of a signal: `data` left as undecoded MessagePack."""

    data: Raw = Raw(b"\xc0")


class Batch(_Frame, tag="batch"):
    """Several signals in one frame (each is a full `signal` map)."""

    signals: list[Signal]


class RawBatch(Batch, tag="batch"):
    signals: list[Raw]


class Receipt(_Frame, tag="receipt"):
    """The broker's answer to a signal sent with receipt = true."""

    id: str
    ok: bool
    error: str | None = None
    delivered: int = 0  # recipients it went to (or was held for)


class Error(_Frame, tag="error"):
    """Something the sender sent could not be handled (never a silent drop)."""

    reason: str
    id: str | None = None  # the signal it is about, if any
    to: str | None = None


class Ack(_Frame, tag="ack"):
    """An ack = true agent has finished with these signal ids."""

    ids: list[str]


class Nack(_Frame, tag="nack"):
    """An ack = true agent failed these signals (its handler raised): retry after backoff."""

    ids: list[str]
    error: str = ""


class DeadLetter(msgspec.Struct, frozen=True):
    """A signal an ack = true agent never finished: `max_deliveries` failed deliveries."""

    id: str
    agent: str  # the agent (or pool) it was kept for
    type: str
    source: str
    deliveries: int
    error: str
    time: float  # when it was dead-lettered (unix seconds)


class Dlq(_Frame, tag="dlq"):
    """Ask the broker about its dead letters: list, redrive or purge (answer: DlqReply)."""

    op: str = "list"  # list | redrive | purge
    agent: str | None = None  # None: every agent
    id: str | None = None  # None: every dead letter of `agent`


class DlqReply(_Frame, tag="dlq_reply"):
    dead_letters: list[DeadLetter] = []  # list: what matched; redrive/purge: what was moved
    error: str | None = None


class TraceRecord(msgspec.Struct, omit_defaults=True, gc=False):
    """What the broker knows of one signal it routed (its trace ring, bus/traces.py).

    `outcome` is the latest news: routed, delivered, held, kept (journaled,
    waiting for its agent), acked, replied, nacked, retrying, dead-lettered,
    redriven, purged, error. A publication's `to` is None and `outcomes`
    has one per subscriber; a signal to a pool names the member in `member`.
    """

    id: str
    type: str
    source: str
    time: float  # the signal's own time (unix seconds)
    to: str | None = None
    traceparent: str | None = None
    causation_id: str | None = None
    correlation_id: str | None = None
    reply: bool = False
    outcome: str = "routed"
    error: str = ""  # why, for error, nacked, retrying, dead-lettered (and error replies)
    deliveries: int = 0  # ack = true: deliveries so far
    member: str | None = None  # the pool member it went to
    outcomes: dict[str, str] | None = None  # a publication: subscriber -> outcome


class Trace(_Frame, tag="trace"):
    """Ask the broker for the trace of a signal id (or of a trace id): answer TraceReply."""

    id: str


class TraceReply(_Frame, tag="trace_reply"):
    records: list[TraceRecord] = []  # every signal the broker knows in that trace
    error: str | None = None


class AgentStats(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the broker has for one agent or pool right now (in a `stats` answer)."""

    held: int = 0  # at most once: in its hold queue, waiting for it to be back
    pending: int = 0  # ack = true: kept, waiting to be handed over (or out a retry backoff)
    in_flight: int = 0  # ack = true: handed to it (a pool member) and not yet finished
    dead_letters: int = 0  # ack = true: in its dead-letter queue


class Stats(_Frame, tag="stats"):
    """Ask the broker for its counters (the answer is a Stats with `counters`).

    With `per_agent` the answer also has `agents`: the figures of every agent or
    pool that has anything held, pending, in flight or dead (absent: all zero).
    """

    counters: dict[str, int] = {}
    per_agent: bool = False
    agents: dict[str, AgentStats] = {}


class Spawn(_Frame, tag="spawn"):
    """Peer → broker → daemon: start child `name` of a dynamic supervisor (SPEC §12).

    The broker hands it to the daemon with `caller` set to the sender (whatever the
    sender put there); the answer is a SpawnReply with the same `id`, once the
    child is running or could not be spawned.
    """

    id: str
    supervisor: str
    name: str
    args: Any = None  # a JSON value: the child's self.args and AGENTD_ARGS
    caller: str | None = None  # set by the broker
    traceparent: str | None = None  # the spawn is part of the sender's trace (SPEC §13)
    causation_id: str | None = None  # the signal being handled when it was asked


class Terminate(_Frame, tag="terminate"):
    """Peer → broker → daemon: stop dynamic child `name` for good (answer: SpawnReply)."""

    id: str
    name: str
    caller: str | None = None  # set by the broker
    traceparent: str | None = None  # as for Spawn
    causation_id: str | None = None


class SpawnReply(_Frame, tag="spawn_reply"):
    """The daemon's answer to a Spawn or Terminate, through the broker to the caller."""

    id: str
    ok: bool
    error: str | None = None
    to: str | None = None  # daemon → broker: the caller; the broker clears it


# --- daemon <-> broker ------------------------------------------------------------


class AgentEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the broker must know about a configured agent instance."""

    name: str  # instance name, e.g. "worker@0" or "orchestrator"
    pool: str | None = None  # "worker" for pool members, else None
    subscribe: list[str] = []  # configured patterns (held while down)
    ack: bool = False
    heartbeat: float = 10.0  # seconds of silence after which the agent is hung
    max_deliveries: int = 5  # ack = true: failed deliveries before the dead-letter queue
    retry_backoff: float = 0.5  # ack = true: seconds before a failed delivery is retried
    max_in_flight: int = 100  # ack = true: delivered and not yet acknowledged, at most
    max_pending: int = 10_000  # ack = true: kept for the agent in all, at most


class Table(_Frame, tag="table"):
    """The daemon's full agent table; agents absent from it are gone for good.

    A table too large for one frame (`max_frame`) comes in parts of the same
    version: every part but the last has `more`, and the broker takes the table
    only once the last has come.
    """

    version: int
    agents: list[AgentEntry]
    more: bool = False


class TablePatch(_Frame, tag="table_patch"):
    """A change to the table the broker has (version `base`): what a spawn, a
    terminate or a reload changed, instead of the whole table again.

    A broker whose table is not `base` (it restarted, or missed a frame) answers
    `reconnect`, and gets the whole table.
    """

    version: int
    base: int
    agents: list[AgentEntry] = []  # new or changed entries
    removed: list[str] = []  # names gone for good


class TableOk(_Frame, tag="table_ok"):
    version: int


class Down(_Frame, tag="down"):
    """The daemon saw this incarnation exit: hold its traffic from now on."""

    name: str
    incarnation: int


class AgentEvent(_Frame, tag="event"):
    """Broker → daemon: connected, ready, hung, disconnected (the link's `BrokerEvent`)."""

    event: str
    name: str
    incarnation: int


class Notice(_Frame, tag="notice"):
    """Broker → daemon: something the operator should see as an event.

    `event` is the event name (`bus.dead_lettered`, `bus.dropped`,
    `bus.journal_unavailable`, `bus.journal_recovered`, `bus.journal_corrupt`),
    `agent` what it is about ("bus" for the broker itself), `info` its fields.
    """

    event: str
    agent: str
    info: dict[str, Any] = {}


Frame = (
    Hello
    | Ready
    | Heartbeat
    | Bye
    | Reconnect
    | Subscribe
    | Signal
    | Batch
    | Receipt
    | Error
    | Ack
    | Nack
    | Dlq
    | DlqReply
    | Trace
    | TraceReply
    | Stats
    | Spawn
    | Terminate
    | SpawnReply
    | Table
    | TablePatch
    | TableOk
    | Down
    | AgentEvent
    | Notice
)
BrokerFrame = (
    Hello
    | Ready
    | Heartbeat
    | Bye
    | Reconnect
    | Subscribe
    | RawSignal
    | RawBatch
    | Receipt
    | Error
    | Ack
    | Nack
    | Dlq
    | DlqReply
    | Trace
    | TraceReply
    | Stats
    | Spawn
    | Terminate
    | SpawnReply
    | Table
    | TablePatch
    | TableOk
    | Down
    | AgentEvent
    | Notice
)

DAEMON_ID = b"agentd"


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def peer_decoder() -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(Frame)


def broker_decoder() -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(BrokerFrame)


_counter = 0


def new_id() -> str:
    """Unique and time-ordered: nanoseconds, then pid and a counter (fixed width hex)."""
    global _counter
    _counter = (_counter + 1) & 0xFFFFFF
    return f"{time.time_ns():016x}{os.getpid() & 0xFFFFFF:06x}{_counter:06x}"


def signal(
    type: str,
    data: Any,
    source: str,
    *,
    to: str | None = None,
    subject: str | None = None,
    correlation_id: str | None = None,
    receipt: bool = False,
    traceparent: str | None = None,
    causation_id: str | None = None,
) -> Signal:
    """A new signal; without a `traceparent`, the first of a new trace."""
    return Signal(
        id=new_id(),
        type=type,
        source=source,
        time=time.time(),
        data=data,
        subject=subject,
        to=to,
        correlation_id=correlation_id,
        receipt=receipt,
        traceparent=traceparent or new_trace(),
        causation_id=causation_id,
    )
