"""The broker's decisions, without I/O: frames and time in, frames and records out.

`Router` is the whole routing logic of the bus — peers, pools, hold queues,
mailboxes of kept signals, request settling, heartbeats, the dead-letter
queue — in the sans-I/O style of the supervision tree (`daemon/tree.py`):
it never touches a socket, a file or a clock. The broker (`broker.py`)
feeds it what arrived (`handle`) and the time (`tick`), writes the journal
records it asks for (`take_records`, then `committed`), sends the frames it
asks for (`take_sends`) and tells it which sends failed (`send_failed`).
Because of that split the hardest code in the project is tested in
milliseconds with plain data and a fake clock (tests/test_router.py).

Two kinds of recipient:
- agents without `ack`: at most once. A connected peer gets the sender's
  bytes at once; a configured agent that is not connected gets them from a
  bounded hold queue when it is back.
- agents with `ack = true`: every signal for them is kept in their
  `Mailbox` (and in the journal) until acknowledged. The mailbox hands the
  agent at most `max_in_flight` at a time, keeps at most `max_pending`
  (then "full"), retries a failed delivery after a doubling backoff, and
  dead-letters a signal after `max_deliveries`. A signal for a pool's name
  waits in the pool's mailbox and goes to whichever ready member has room.

Group commit is the reason for the take/committed protocol: every signal
accepted in one loop turn is one batch of records; the receipts for those
signals (and their first delivery) leave only after `committed(True)`.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from .envelope import (
    DAEMON_ID,
    Ack,
    AgentEntry,
    AgentEvent,
    AgentStats,
    Bye,
    DeadLetter,
    Dlq,
    DlqReply,
    Down,
    Error,
    Heartbeat,
    Hello,
    Nack,
    Notice,
    RawBatch,
    RawSignal,
    Ready,
    Receipt,
    Reconnect,
    Spawn,
    SpawnReply,
    Stats,
    Subscribe,
    Table,
    TableOk,
    TablePatch,
    Terminate,
    Trace,
    broker_decoder,
    encoder,
)
from .journal import Stored
from .patterns import Trie, valid
from .traces import (
    ACKED,
    DEAD,
    DELIVERED,
    ERROR,
    HELD,
    NACKED,
    PURGED,
    REDRIVEN,
    REPLIED,
    RETRYING,
    ROUTED,
    TraceRing,
)
from .traces import KEPT as KEPT_OUTCOME  # (KEPT here is a kind of Send)

RESERVED = frozenset({"agentd", "bus", "ctl"})  # the daemon, the broker, the ctl command
BACKOFF_MAX = 30.0  # seconds: the longest retry backoff
STALL = 0.05  # seconds before a peer whose pipe was full is tried again
HEARTBEAT_CHECK = 0.05  # seconds between heartbeat checks
PROBE = 1.0  # seconds between probes of a journal that failed
DONE_BATCH = 4096  # "done" records written at the latest with this many waiting
FORWARD_BATCH = 1000  # at-most-once signals to one peer per frame, at most

# What a Send carries, for `send_failed`.
CONTROL = 0  # receipts, errors, events: nothing to do if it fails
FORWARD = 1  # at-most-once signals; items: (sender, signal id, payload)
KEPT = 2  # deliveries from a mailbox; items: signal ids


class Send(NamedTuple):
    to: str
    frame: Any  # bytes or a buffer (a batch item's raw bytes)
    kind: int = CONTROL
    items: tuple[Any, ...] = ()


SENT, GONE, FULL = "sent", "gone", "full"


@dataclass
class Peer:
    """A connected DEALER (agent or client), by routing id."""

    name: str
    incarnation: int = 0
    pid: int = 0
    ready: bool = False
    last_seen: float = 0.0
    hello_at: float | None = None  # None: known only from traffic (a broker restart)
    hung_reported: bool = False
    stalled_until: float = 0.0  # its pipe was full: no deliveries before this
    patterns: set[str] = field(default_factory=set)
    check_at: float = 0.0  # when its one entry in Router._checks falls due


@dataclass(slots=True, eq=False)
class Kept:
    """A signal kept for an ack = true agent (or pool) until it is finished."""

    box: str  # the mailbox it is kept in: the agent's name, or the pool's
    id: str
    frame: bytes  # the sender's bytes
    type: str = ""
    source: str = ""
    corr: str | None = None  # a request: its reply settles it
    deliveries: int = 0  # deliveries started
    error: str = ""  # the last failure
    recovered: bool = False  # loaded from the journal: may have been delivered already
    holder: str | None = None  # the agent it is in flight with
    dead_at: float | None = None  # unix seconds; None = not dead


@dataclass
class Mailbox:
    """Everything kept for one ack = true agent (or pool): the one place for acks.

    `pending` is what waits, in order; `retry` the failed deliveries waiting
    out their backoff; `in_flight` what the agent holds now (pool members hold
    signals of the pool's mailbox too); `replies` the requests among them,
    by correlation id; `dead` the dead-letter queue.
    """

    name: str
    pending: OrderedDict[str, Kept] = field(default_factory=OrderedDict)
    retry: list[tuple[float, int, Kept]] = field(default_factory=list)
    in_flight: dict[str, Kept] = field(default_factory=dict)
    replies: dict[str, str] = field(default_factory=dict)
    dead: OrderedDict[str, Kept] = field(default_factory=OrderedDict)
    kept: int = 0  # pending + retry + in flight of this box's own signals
    known: set[str] = field(default_factory=set)  # ids kept here, dead ones too (resends)

    def release(self, sig_id: str) -> Kept | None:
        """Take a signal back out of this holder's hands (acked, failed, undelivered)."""
        k = self.in_flight.pop(sig_id, None)
        if k is not None:
            if k.corr is not None:
                self.replies.pop(k.corr, None)
            k.holder = None
        return k

    def push_front(self, k: Kept) -> None:
        """Next in line: a signal that goes back is not sent behind newer ones."""
        self.pending[k.id] = k
        self.pending.move_to_end(k.id, last=False)


class Router:
    """Routing state and decisions. Feed it frames and time; carry out what it returns."""

    def __init__(
        self,
        *,
        max_frame: int = 1024 * 1024,
        queue_limit: int = 10_000,
        log: Callable[..., None] = lambda event, **kw: None,
        wall_offset: float = 0.0,
        table_wait: float = 0.0,
    ) -> None:
        self.max_frame = max_frame
        self.queue_limit = queue_limit
        self.log = log
        self.wall_offset = wall_offset  # unix time = monotonic now + this
        # Seconds signals wait for the daemon's first table (0: a broker of its own,
        # routing among whoever connects). Counted from the first frame.
        self.table_wait = table_wait
        self._table_deadline: float | None = None
        self.enc = encoder()
        self.dec = broker_decoder()
        self.table: dict[str, AgentEntry] = {}
        self.table_version = -1
        self.pools: dict[str, list[str]] = {}
        self.live: dict[str, list[str]] = {}  # pool -> its connected, ready members
        self._member_index: dict[str, int] = {}  # pool member -> its place in the pool
        # Per-peer work at a tick is proportional to what is due, not to the peers: at
        # 10,000 idle agents a scan of them all, 20 times a second, was most of the
        # broker's CPU. (when its heartbeat check falls due, name): one entry per peer.
        self._checks: list[tuple[float, str]] = []
        self._stalled_peers: set[str] = set()
        self._retrying: set[str] = set()  # mailboxes with a retry waiting
        self.rr: dict[str, int] = {}
        self.peers: dict[str, Peer] = {}
        self.incarnations: dict[str, int] = {}  # highest incarnation that said HELLO
        # At most once: name or pool -> (signal id, frame) waiting.
        self.held: dict[str, deque[tuple[str, bytes]]] = {}
        self.boxes: dict[str, Mailbox] = {}  # ack = true agents and pools
        self.trie = Trie()
        self.traces = TraceRing()  # what happened to the last signals (ctl trace)
        self.daemon_connected = False
        self.journal_ok = True
        self._probe_at = 0.0
        self._next_check = 0.0
        self._seq = itertools.count()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "received",
                "routed",
                "delivered",
                "held",
                "errors",
                "malformed",
                "oversized",
                "redelivered",
                "dropped",
                "internal_errors",
                "kept",
                "acked",
                "nacked",
                "dead_lettered",
                "journal_errors",
            ),
            0,
        )
        self._last_malformed_log = -1e9
        self.tick_interval = 1.0
        self._parts: tuple[int, list[AgentEntry]] | None = None  # a table coming in parts
        self._lowest_beat: float | None = None  # of the table's agents
        # Output of the current turn.
        self._sends: list[Send] = []
        self._forwards: dict[str, list[tuple[str, str, Any]]] = {}
        self._records: list[tuple[Any, ...]] = []
        self._taken: list[tuple[Any, ...]] = []  # the records being written
        # "done" records wait for the next write, or a tick: losing them in a crash
        # costs a flagged redelivery, not a promise, and an ack need not cost a write.
        self._done: list[tuple[Any, ...]] = []
        self._done_keys: set[tuple[str, str]] = set()
        self._done_due = False
        self._fresh: list[Kept] = []  # accepted this turn: undone if the commit fails
        self._receipts: list[Send] = []  # for signals with fresh entries: after the commit
        self._dirty: set[str] = set()  # agents and pools to hand signals to
        self._loaded: list[Kept] = []  # from the journal, waiting for the first table
        self.pending_notices: list[tuple[str, dict[str, Any]]] = []  # until the daemon is here
        self._before_table: list[tuple[str, RawSignal, bytes]] = []  # signals, until the table

    # === the broker's protocol =========================================================

    def take_records(self) -> list[tuple[Any, ...]]:
        """This turn's journal records. Write them, then call `committed`."""
        records = self._records
        if self._done and (records or self._done_due or len(self._done) >= DONE_BATCH):
            # After this turn's records: a write cut short loses acks (a flagged
            # redelivery), never a signal whose ack made it in.
            records = records + self._done
            self._done = []
            self._done_keys.clear()
        self._records, self._done_due = [], False
        self._taken = records
        return records

    def sync_all(self) -> None:
        """Write everything with the next turn (the broker is stopping)."""
        self._done_due = True

    def committed(self, ok: bool, now: float, error: str = "") -> None:
        """The journal write of the records taken last succeeded (or failed with `error`)."""
        taken, self._taken = self._taken, []
        if ok:
            self._fresh.clear()
            self._sends.extend(self._receipts)
            self._receipts.clear()
            if not self.journal_ok and any(r[0] == "z" for r in taken):
                self.journal_ok = True  # the probe, as large as any signal, went in
                self.log("bus.journal_recovered")
                self._notice("bus.journal_recovered", "bus")
            return
        self.counters["journal_errors"] += 1
        if self.journal_ok:
            self.journal_ok = False
            self.log("bus.journal_unavailable", error=error)
            self._notice("bus.journal_unavailable", "bus", error=error)
        self._probe_at = now + PROBE
        self._undo_fresh(taken)

    def take_sends(self, now: float) -> list[Send]:
        """Frames to send now (after `committed`): hand out what is due, then everything."""
        if self._receipts:
            return self._flush_forwards()  # records not committed yet: nothing may leave
        for name in list(self._dirty):
            self._dirty.discard(name)
            if name in self.pools:
                self._pump_pool(name, now)
            else:
                self._pump(name, now)
        return self._flush_forwards()

    def send_failed(self, send: Send, result: str, now: float) -> None:
        """A send came back `gone` (peer disconnected) or `full` (its pipe is full)."""
        if send.kind == CONTROL:
            return
        if send.kind == KEPT:
            if result == GONE:
                self._gone(send.to, "disconnected", now)
                return
            self._stalled(send.to, send.items, now)
            return
        # FORWARD: at most once, and the sender is told when it did not go.
        if result == GONE:
            self._gone(send.to, "disconnected", now)
        for sender, sig_id, payload in send.items:
            if result == GONE and send.to in self.table:
                ok, why = self._hold(send.to, payload, sig_id)
            elif result == GONE:
                ok, why = False, f"{send.to} is not connected"
            else:
                ok, why = False, f"{send.to} is not keeping up (its queue is full)"
                self.counters["dropped"] += 1
            if not ok:
                self.traces.mark(sig_id, ERROR, send.to, why or "refused")
            if not ok and sender:  # a hold-queue flush has no sender left to tell
                self._control(sender, Error(why or "refused", id=sig_id, to=send.to))

    def tick(self, now: float) -> None:
        """Time passed: heartbeats, retries whose backoff is over, stalled peers, probes."""
        if now < self._next_check:
            return
        self._next_check = now + HEARTBEAT_CHECK
        self._check_heartbeats(now)
        self._done_due = bool(self._done)
        if self._before_table and not self._waiting_for_table(now):
            self._route_early(now)  # no table came: route with none (unknown names refused)
        for name in list(self._retrying):
            box = self.boxes.get(name)
            if box is None or not box.retry:
                self._retrying.discard(name)
            elif box.retry[0][0] <= now:
                self._retry_due(box, now)
        for name in list(self._stalled_peers):
            peer = self.peers.get(name)
            if peer is None or not peer.stalled_until:
                self._stalled_peers.discard(name)
            elif peer.stalled_until <= now:
                peer.stalled_until = 0.0
                self._stalled_peers.discard(name)
                self._dirty.add(name)
        for name in [n for n, q in self.held.items() if q]:
            if name in self.peers or self.live.get(name):  # a peer, or a pool with a member
                self._flush_held(name, now)
        if not self.journal_ok and now >= self._probe_at:
            self._probe_at = now + PROBE
            # As large as the largest signal: a disk with a few bytes left that takes
            # a small record must not end the episode only to fail the next signal.
            self._records.append(("z", bytes(self.max_frame)))

    def timeout(self) -> float:
        """Seconds the broker may sleep before the next `tick` matters."""
        return self.tick_interval

    # === restoring from the journal ====================================================

    def restore(self, entries: Iterable[Stored]) -> None:
        """What the journal kept. Placed in mailboxes once the daemon's table says where."""
        for s in entries:
            try:
                sig = self.dec.decode(s.frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            self._loaded.append(
                Kept(
                    s.box,
                    s.id,
                    s.frame,
                    sig.type,
                    sig.source,
                    None if sig.reply else sig.correlation_id,
                    s.deliveries,
                    s.error,
                    recovered=True,
                    dead_at=s.dead_at,
                )
            )

    def snapshot(self) -> Iterator[Stored]:
        """Every kept signal, for the journal's compaction."""
        for box in self.boxes.values():
            for k in self._all_kept(box):
                yield Stored(k.box, k.id, k.frame, k.deliveries, k.error, k.dead_at)
        for k in self._loaded:
            yield Stored(k.box, k.id, k.frame, k.deliveries, k.error, k.dead_at)

    def _all_kept(self, box: Mailbox) -> Iterator[Kept]:
        yield from box.pending.values()
        for _, _, k in box.retry:
            yield k
        yield from box.dead.values()
        for holder in self._holders_of(box.name):
            for k in self.boxes[holder].in_flight.values():
                if k.box == box.name:
                    yield k

    def _holders_of(self, box: str) -> list[str]:
        members = self.pools.get(box)
        names = [box] if members is None else members
        return [n for n in names if n in self.boxes]

    # === input =========================================================================

    def handle(self, ident: bytes, payload: bytes, now: float) -> None:
        """One ZeroMQ message from a peer (its routing id, its one frame)."""
        self.counters["received"] += 1
        oversized = len(payload) > self.max_frame
        if oversized:
            self.counters["oversized"] += 1
        try:
            frame = self.dec.decode(payload)  # cheap even when large: data stays raw
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if oversized:
                return self._control_id(ident, Error(f"frame too large ({len(payload)} bytes)"))
            return self.malformed(ident, str(exc), now)
        try:
            sender = ident.decode()
        except UnicodeDecodeError:
            return self.malformed(ident, "routing id is not UTF-8", now)
        if oversized:
            why = f"frame too large ({len(payload)} > {self.max_frame} bytes)"
            if type(frame) is RawSignal:
                return self._refuse(sender, frame, why)
            return self._control(sender, Error(why))
        kind = type(frame)
        if ident == DAEMON_ID:
            return self._from_daemon(frame, now)
        peer = self.peers.get(sender)
        if peer is not None:
            peer.last_seen = now
            if peer.hung_reported:
                # Heard from again (a paused agent resumed: its hung report was ignored):
                # a later silence is news again.
                peer.hung_reported = False
                self._check_later(peer, now)
        elif kind in (RawSignal, RawBatch, Heartbeat, Ready, Ack, Nack):
            # A peer from before a broker restart (or a client that skipped HELLO):
            # known from now on, and asked to announce itself again — whatever its
            # first frame was. An agent whose first frame to a new broker is a reply
            # would otherwise never say READY again, and a pool would never use it.
            self.peers[sender] = Peer(sender, last_seen=now)
            self._check_later(self.peers[sender], now)
            self._control(sender, Reconnect())
        if kind is RawSignal:
            self._route(sender, frame, payload, now)
        elif kind is RawBatch:
            self._batch(sender, frame, now)
        elif kind is Ack:
            self._ack(sender, frame.ids, now)
        elif kind is Heartbeat:
            pass
        elif kind is Nack:
            self._nack(sender, frame, now)
        elif kind is Hello:
            if sender in RESERVED or frame.name != sender:
                why = f"hello as {frame.name!r} from {sender!r}: names must match, and "
                return self._control(sender, Error(why + f"{sorted(RESERVED)} are reserved"))
            self._hello(sender, frame, now)
        elif kind is Ready:
            self._ready(sender)
        elif kind is Subscribe:
            self._subscribe(sender, frame.patterns)
        elif kind is Bye:
            self._gone(sender, "disconnected", now)
        elif kind is Stats:
            self._control(sender, self._stats_answer(frame))
        elif kind is Dlq:
            self._dlq(sender, frame, now)
        elif kind is Trace:
            self._control(sender, self.traces.answer(frame.id))
        elif kind is Spawn or kind is Terminate:
            self._to_daemon(sender, frame, now)
        else:
            self.malformed(ident, f"unexpected frame kind {kind.__name__.lower()}", now)

    def _from_daemon(self, frame: Any, now: float) -> None:
        kind = type(frame)
        if kind is Table:
            return self._table(frame, now)
        if kind is TablePatch:
            return self._patch(frame, now)
        if self.table_version == -1:
            self._control("agentd", Reconnect())  # a new broker: the daemon must send its table
        if kind is Down:
            p = self.peers.get(frame.name)
            if p is not None and p.incarnation <= frame.incarnation:
                self._gone(frame.name, None, now)
        elif kind is Stats:
            self._control("agentd", self._stats_answer(frame))
        elif kind is SpawnReply:
            self.traces.control_answered(frame)
            if frame.to:  # the caller may have gone: ROUTER drops it then, as for any peer
                self._control(frame.to, msgspec.structs.replace(frame, to=None))
        elif kind is not Heartbeat:
            self.malformed(DAEMON_ID, f"unexpected frame kind {kind.__name__.lower()}", now)

    def _to_daemon(self, sender: str, frame: Any, now: float) -> None:
        """Spawn/Terminate are the daemon's to answer: forwarded, naming who asked."""
        kind = "agentd.spawn" if type(frame) is Spawn else "agentd.terminate"
        self.traces.add_control(frame, kind, sender, now)
        if not self.daemon_connected:
            why = "no agentd connected to this broker (spawn and terminate are its job)"
            self.traces.mark(frame.id, ERROR, error=why)
            return self._control(sender, SpawnReply(frame.id, False, why))
        self._control("agentd", msgspec.structs.replace(frame, caller=sender))

    def malformed(self, ident: bytes, why: str, now: float) -> None:
        """Counted, logged (at most once a second) and answered; never raised."""
        self.counters["malformed"] += 1
        if now - self._last_malformed_log > 1.0:  # a flood must not flood the log too
            self._last_malformed_log = now
            self.log(
                "bus.malformed",
                peer=ident[:64].decode("utf-8", "replace"),
                reason=why,
                total=self.counters["malformed"],
            )
        if ident:
            self._control_id(ident, Error(f"malformed frame: {why}"))

    def stats(self) -> dict[str, int]:
        in_flight = sum(len(b.in_flight) for b in self.boxes.values())
        pending = sum(b.kept for b in self.boxes.values()) - in_flight
        return {
            **self.counters,
            "peers": len(self.peers),
            "held_now": sum(len(q) for q in self.held.values()),
            "pending_now": pending,
            "in_flight_now": in_flight,
            "dead_letters_now": sum(len(b.dead) for b in self.boxes.values()),
            "subscriptions": sum(len(p) for p in self.trie.by_subscriber.values()),
        }

    def agent_stats(self) -> dict[str, AgentStats]:
        """Per agent or pool: held, pending, in flight and dead now; only the non-zero ones.

        A pool's own entry is what waits for any member (signals to the pool's name);
        what a member holds in flight is the member's, whichever mailbox it came from.
        """
        figures: dict[str, dict[str, int]] = {}
        for name, queue in self.held.items():
            if queue:
                figures[name] = {"held": len(queue)}
        for name, box in self.boxes.items():
            pending = len(box.pending) + len(box.retry)
            if pending or box.in_flight or box.dead:
                figures.setdefault(name, {}).update(
                    pending=pending, in_flight=len(box.in_flight), dead_letters=len(box.dead)
                )
        return {name: AgentStats(**f) for name, f in figures.items()}

    def _stats_answer(self, ask: Stats) -> Stats:
        agents = self.agent_stats() if ask.per_agent else {}
        return Stats(counters=self.stats(), agents=agents)

    # === output helpers ================================================================

    def _control(self, to: str, obj: Any) -> None:
        self._sends.append(Send(to, self.enc.encode(obj)))

    def _control_id(self, ident: bytes, obj: Any) -> None:
        self._sends.append(Send(ident.decode("utf-8", "replace"), self.enc.encode(obj)))

    def _event(self, event: str, name: str, incarnation: int) -> None:
        if self.daemon_connected:
            self._control("agentd", AgentEvent(event, name, incarnation))

    def _notice(self, event: str, agent: str, **info: Any) -> None:
        if self.daemon_connected:
            self._control("agentd", Notice(event, agent, info))

    def _forward(self, to: str, payload: Any, sender: str, sig_id: str) -> None:
        items = self._forwards.get(to)
        if items is None:
            self._forwards[to] = [(sender, sig_id, payload)]
        else:
            items.append((sender, sig_id, payload))
            if len(items) >= FORWARD_BATCH:  # a bounded frame: memory, and the peer's latency
                self._sends.append(self._forward_send(to, self._forwards.pop(to)))

    def _flush_forwards(self) -> list[Send]:
        """What goes to the same peer in one turn leaves as one batch: one send, not many."""
        for to, items in self._forwards.items():
            self._sends.append(self._forward_send(to, items))
        self._forwards.clear()
        sends, self._sends = self._sends, []
        return sends

    def _forward_send(self, to: str, items: list[tuple[str, str, Any]]) -> Send:
        if len(items) == 1:
            frame = items[0][2]
        else:
            frame = self.enc.encode(RawBatch([_raw(p) for _, _, p in items]))
        return Send(to, frame, FORWARD, tuple(items))

    # === peers =========================================================================

    def _hello(self, name: str, hello: Hello, now: float) -> None:
        old = self.peers.get(name)
        newer = hello.incarnation > self.incarnations.get(name, -1)
        if old is not None and newer and old.hello_at is not None:
            self._gone(name, None, now)  # the old incarnation is gone: what it held is free
            old = None
        peer = Peer(name, hello.incarnation, hello.pid, last_seen=now, hello_at=now)
        self.peers[name] = peer
        self._check_later(peer, now)
        self.incarnations[name] = max(hello.incarnation, self.incarnations.get(name, -1))
        self._update_live(name)
        dynamic = [p for p in hello.subscribe if valid(p)]
        configured = set(self.table[name].subscribe) if name in self.table else set()
        if old is not None:
            for pattern in old.patterns - configured:
                self.trie.remove(pattern, name)
        elif name not in self.table:
            self.trie.remove_subscriber(name)
        for pattern in dynamic:
            self.trie.add(pattern, name)
        peer.patterns = set(dynamic)
        self._event("connected", name, hello.incarnation)
        if name in self.boxes:
            self._dirty.add(name)
        self._flush_held(name, now)

    def _ready(self, name: str) -> None:
        peer = self.peers.get(name)
        if peer is None:
            return
        peer.ready = True
        self._update_live(name)
        self._event("ready", name, peer.incarnation)
        entry = self.table.get(name)
        if entry is not None and entry.pool:
            self._dirty.add(name)
            self._flush_held(entry.pool, 0.0)  # signals to the pool waited for a ready member

    def _gone(self, name: str, event: str | None, now: float) -> None:
        peer = self.peers.pop(name, None)
        if peer is None:
            return
        self._update_live(name)
        if name not in self.table:
            # A configured agent keeps its HELLO patterns until its next HELLO: what
            # they match is held (or kept) for it while it is away.
            self.trie.remove_subscriber(name)
        if event:
            self._event(event, name, peer.incarnation)
        box = self.boxes.get(name)
        if box is not None and box.in_flight:
            self._release(box, now)

    def _release(self, holder: Mailbox, now: float) -> None:
        """The holder is gone: each signal it held counts as a failed delivery.

        Signals of its own mailbox wait for its next incarnation; signals of
        its pool's mailbox go to another member at once — the sender asked for
        "any member", and a member that keeps crashing would otherwise keep
        the work forever.
        """
        held = list(holder.in_flight.values())
        holder.in_flight.clear()
        holder.replies.clear()
        for k in reversed(held):  # back to the front, in their original order
            k.holder = None
            k.error = k.error or "the agent went away holding it"
            self._failed(k, k.error, now, backoff=False)

    def _stalled(self, name: str, ids: tuple[str, ...], now: float) -> None:
        """Its pipe was full: the signals go back, uncounted, and it gets a moment."""
        holder = self.boxes.get(name)
        peer = self.peers.get(name)
        if peer is not None:
            peer.stalled_until = now + STALL
            self._stalled_peers.add(name)
        if holder is None:
            return
        for sig_id in reversed(ids):
            k = holder.release(sig_id)
            if k is not None:
                k.deliveries -= 1
                self.boxes[k.box].push_front(k)

    def _subscribe(self, name: str, patterns: list[str]) -> None:
        peer = self.peers.get(name)
        for pattern in patterns:
            if valid(pattern):
                self.trie.add(pattern, name)
                if peer is not None:
                    peer.patterns.add(pattern)

    def _check_heartbeats(self, now: float) -> None:
        """The peers whose check is due: hung if silent (or unready) past `heartbeat`."""
        checks = self._checks
        while checks and checks[0][0] < now:
            at, name = heapq.heappop(checks)
            peer = self.peers.get(name)
            if peer is None or peer.check_at != at or peer.hung_reported:
                continue  # gone, or an entry since replaced by a later one
            due = self._due(peer)
            if due is None:
                continue
            if due >= now:
                peer.check_at = due
                heapq.heappush(checks, (due, name))
                continue
            peer.hung_reported = True  # no entry until it speaks again (_check_later)
            self.log(
                "bus.hung",
                agent=peer.name,
                incarnation=peer.incarnation,
                silent=round(now - peer.last_seen, 3),
                ready=peer.ready,
            )
            self._event("hung", peer.name, peer.incarnation)

    def _due(self, peer: Peer) -> float | None:
        """When it counts as hung if nothing changes: silent, or HELLO and no READY, for
        longer than its `heartbeat`; None for a peer the table does not name."""
        entry = self.table.get(peer.name)
        if entry is None:
            return None
        due = peer.last_seen + entry.heartbeat
        if not peer.ready and peer.hello_at is not None:
            due = min(due, peer.hello_at + entry.heartbeat)
        return due

    def _check_later(self, peer: Peer, now: float) -> None:
        """(Re)enter the peer in the heartbeat checks: its first check, in a tick or so."""
        peer.check_at = now
        heapq.heappush(self._checks, (now, peer.name))

    def _update_live(self, name: str) -> None:
        """Put `name` in or out of its pool's ready members (on HELLO, READY, goodbye).

        One member at a time, in the pool's order: recomputing the whole pool on every
        READY cost a pool of N members N² steps to start.
        """
        entry = self.table.get(name)
        if entry is None or entry.pool is None or name not in self._member_index:
            return
        live = self.live.setdefault(entry.pool, [])
        peer = self.peers.get(name)
        index = self._member_index
        at = bisect.bisect_left(live, index[name], key=index.__getitem__)
        present = at < len(live) and live[at] == name
        if peer is not None and peer.ready:
            if not present:
                live.insert(at, name)
        elif present:
            del live[at]
        if live and entry.pool in self.boxes:
            self._dirty.add(entry.pool)

    # === the daemon's table ============================================================

    def _table(self, table: Table, now: float) -> None:
        """The whole table, or one part of it (`more`: parts of the same version follow)."""
        if table.more or self._parts is not None:
            held = self._parts[1] if self._parts and self._parts[0] == table.version else []
            held.extend(table.agents)
            if table.more:
                self._parts = (table.version, held)
                return
            self._parts = None
            table = Table(table.version, held)
        self._confirm(table.version)
        if table.version == self.table_version:
            return
        old = self.table
        self.table = {a.name: a for a in table.agents}
        changed = [e for e in table.agents if old.get(e.name) != e]
        removed = [entry for name, entry in old.items() if name not in self.table]
        self._take_table(table.version, old, changed, removed, now, boxes=None)

    def _patch(self, patch: TablePatch, now: float) -> None:
        """What changed since the table the daemon knows we have; if we have another
        (we restarted, or a frame was lost), ask for the whole table instead."""
        if patch.version == self.table_version:
            return self._confirm(patch.version)  # a patch sent again
        if patch.base != self.table_version:
            return self._control("agentd", Reconnect())
        self._confirm(patch.version)
        table = self.table
        old = {e.name: table[e.name] for e in patch.agents if e.name in table}
        old.update((n, table[n]) for n in patch.removed if n in table)
        changed = [e for e in patch.agents if old.get(e.name) != e]
        removed = [table.pop(n) for n in patch.removed if n in table]
        table.update((e.name, e) for e in changed)
        touched = (*changed, *removed)
        boxes = {e.name for e in touched} | {e.pool for e in touched if e.pool}
        self._take_table(patch.version, old, changed, removed, now, boxes=boxes)

    def _confirm(self, version: int) -> None:
        """The daemon is here and its table (or patch) came: say so, and show it what
        happened while no daemon was connected."""
        self.daemon_connected = True
        self._control("agentd", TableOk(version))
        for event, info in self.pending_notices:
            self._notice(event, "bus", **info)
        self.pending_notices.clear()

    def _take_table(
        self,
        version: int,
        old: dict[str, AgentEntry],
        changed: list[AgentEntry],
        removed: list[AgentEntry],
        now: float,
        boxes: set[str] | None,
    ) -> None:
        """Work on what the new table (already `self.table`) changed, and only on that.

        A spawn changes one entry: redoing every entry's pool, subscriptions, checks
        and mailbox made spawning N children N². `old` has the previous entry of each
        changed or removed name that had one; `boxes`: the mailboxes to reconsider
        (None: every one, as a whole table, the first above all, must).
        """
        self.table_version = version
        self._set_tick(old, changed, removed)
        if any(e.pool for e in changed) or any(e.pool for e in removed):
            self._place_pools(self.table.values())
        for entry in changed:
            peer = self.peers.get(entry.name)
            if peer is not None and not peer.hung_reported:
                self._check_later(peer, now)  # its heartbeat may have changed
        for entry in removed:  # gone for good: drop what we kept for it
            name = entry.name
            self.held.pop(name, None)
            if name not in self.peers:
                self.trie.remove_subscriber(name)
            for pattern in entry.subscribe:
                self.trie.remove(pattern, name)
        if removed:
            for pool in {e.pool for e in removed if e.pool} | {e.name for e in removed}:
                if pool not in self.table and pool not in self.pools and pool not in self.peers:
                    self.held.pop(pool, None)
        for entry in changed:
            before = old.get(entry.name)
            if before is not None:
                for pattern in set(before.subscribe) - set(entry.subscribe):
                    self.trie.remove(pattern, entry.name)
            for pattern in entry.subscribe:
                if valid(pattern):
                    self.trie.add(pattern, entry.name)
        self._place_boxes(now, boxes)
        self._route_early(now)

    def _set_tick(
        self, old: dict[str, AgentEntry], changed: list[AgentEntry], removed: list[AgentEntry]
    ) -> None:
        """A tick often enough for the shortest heartbeat; the whole table is read only
        when the entry that set it changed or went."""
        lowest = self._lowest_beat
        if lowest is None or any(e.heartbeat <= lowest for e in old.values()):
            beats = [a.heartbeat for a in self.table.values()]
            lowest = min(beats) if beats else None
        elif changed:
            lowest = min(lowest, *(e.heartbeat for e in changed))
        self._lowest_beat = lowest
        self.tick_interval = max(0.02, min(1.0, lowest / 4)) if lowest is not None else 1.0

    def _place_pools(self, agents: Iterable[AgentEntry]) -> None:
        """Pools, their members' order and their ready members, from the table."""
        pools: dict[str, list[str]] = {}
        for entry in agents:
            if entry.pool:
                pools.setdefault(entry.pool, []).append(entry.name)
        self.pools = pools
        self._member_index = {m: i for members in pools.values() for i, m in enumerate(members)}
        peers = self.peers
        self.live = {
            pool: [m for m in members if m in peers and peers[m].ready]
            for pool, members in pools.items()
        }
        for pool, live in self.live.items():
            if live and pool in self.boxes:
                self._dirty.add(pool)

    def _settings(self, box: str) -> AgentEntry | None:
        """The ack settings of a mailbox: its agent's, or for a pool its first member's."""
        entry = self.table.get(box)
        if entry is None and box in self.pools:
            entry = self.table[self.pools[box][0]]
        return entry if entry is not None and entry.ack else None

    def _place_boxes(self, now: float, names: set[str] | None = None) -> None:
        """Make a mailbox for every ack agent and pool; drop those no longer configured.

        With `names`, only those are reconsidered (what a patch changed).
        """
        if names is None:
            names = {*self.table, *self.pools, *self.boxes}
        wanted = {n for n in names if self._settings(n)}
        for name in wanted - self.boxes.keys():
            self.boxes[name] = Mailbox(name)
            self._dirty.add(name)
        loaded, self._loaded = self._loaded, []
        for k in loaded:
            box = self.boxes.get(k.box)
            if box is None:
                self._loaded.append(k)  # dropped below, with its box
                continue
            box.known.add(k.id)
            if k.dead_at is not None:
                box.dead[k.id] = k
            else:
                box.pending[k.id] = k
                box.kept += 1
        if loaded:
            kept = len(loaded) - len(self._loaded)
            self.log("bus.journal_loaded", kept=kept, boxes=len(wanted))
        gone = [n for n in names if n in self.boxes and n not in wanted]
        dropped: dict[str, int] = {}
        for k in self._loaded:
            dropped[k.box] = dropped.get(k.box, 0) + 1
        self._loaded.clear()
        for name in gone:
            box = self.boxes.pop(name)
            for k in box.in_flight.values():  # a removed pool member held its pool's signals
                keeper = self.boxes.get(k.box)
                if k.box != name and keeper is not None:
                    k.holder = None
                    keeper.push_front(k)
                    self._dirty.add(k.box)
            dropped[name] = dropped.get(name, 0) + box.kept + len(box.dead)
        for name, count in dropped.items():
            self._records.append(("D", name))
            self.log("bus.dropped", agent=name, count=count)
            self._notice("bus.dropped", name, count=count)

    # === routing =======================================================================

    def _batch(self, sender: str, batch: RawBatch, now: float) -> None:
        for raw in batch.signals:
            try:
                sig = self.dec.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.malformed(sender.encode(), f"in batch: {exc}", now)
                continue
            if type(sig) is not RawSignal:
                self.malformed(sender.encode(), "batch items must be signals", now)
                continue
            self._route(sender, sig, raw, now)

    def _route(self, sender: str, sig: RawSignal, payload: Any, now: float) -> None:
        if self.table_version == -1 and self._waiting_for_table(now):
            return self._early(sender, sig, payload)
        self.counters["routed"] += 1
        rec = self.traces.add(sig)
        if sig.source != sender:
            return self._refuse(sender, sig, f"source {sig.source!r} is not your name {sender!r}")
        if sig.reply and sig.correlation_id is not None:
            self.traces.replied(sig)
            self._reply_settles(sender, sig.correlation_id, now)
        fresh = len(self._fresh)
        if sig.to is not None:
            ok, why = self._direct(sender, sig, payload, now)
            count = 1
            if ok and rec.outcome == ROUTED:  # forwarded: held, kept or a pool's say so
                rec.outcome = DELIVERED
        else:
            ok, why, count = True, None, 0
            for name in self.trie.match(sig.type):
                if name != sender and self._to_agent(name, sender, sig, payload, now)[0]:
                    count += 1
        if not ok:
            return self._refuse(sender, sig, why or "refused")
        if sig.receipt:
            receipt = Send(sender, self.enc.encode(Receipt(sig.id, True, delivered=count)))
            if len(self._fresh) > fresh:
                self._receipts.append(receipt)  # after the commit: "accepted" = journaled
            else:
                self._sends.append(receipt)

    def _waiting_for_table(self, now: float) -> bool:
        if self._table_deadline is None:
            self._table_deadline = now + self.table_wait
        return now < self._table_deadline

    def _route_early(self, now: float) -> None:
        early, self._before_table = self._before_table, []
        for sender, sig, payload in early:
            self._route(sender, sig, payload, now)

    def _early(self, sender: str, sig: RawSignal, payload: Any) -> None:
        """Before the daemon's table: a new broker cannot tell a configured agent from an
        unknown name, nor an ack agent from another. Signals wait (bounded) for the table.
        """
        if len(self._before_table) >= self.queue_limit:
            return self._refuse(sender, sig, "the broker is starting: try again")
        self._before_table.append((sender, sig, bytes(payload)))

    def _refuse(self, sender: str, sig: RawSignal, why: str) -> None:
        self.counters["errors"] += 1
        self.traces.mark(sig.id, ERROR, error=why)
        if sig.receipt:
            frame: Any = Receipt(sig.id, False, error=why)
        else:
            frame = Error(why, id=sig.id, to=sig.to)
        self._control(sender, frame)

    def _direct(
        self, sender: str, sig: RawSignal, payload: Any, now: float
    ) -> tuple[bool, str | None]:
        to = sig.to
        assert to is not None
        if to in self.pools:
            if to in self.boxes and not sig.reply:
                return self._keep(self.boxes[to], sig, payload)
            return self._to_pool(to, sender, sig, payload)
        if to in self.peers or to in self.table:
            return self._to_agent(to, sender, sig, payload, now)
        return False, f"unknown recipient {to!r}"

    def _to_pool(self, pool: str, sender: str, sig: RawSignal, payload: Any) -> tuple[bool, Any]:
        """At most once to a pool: the next ready member, round robin, or its hold queue."""
        live = self.live.get(pool)
        if not live or self.held.get(pool):
            return self._hold(pool, payload, sig.id)
        start = self.rr.get(pool, 0)
        self.rr[pool] = (start + 1) % len(live)
        member = live[start % len(live)]
        self._forward(member, payload, sender, sig.id)
        self.counters["delivered"] += 1
        self.traces.mark(sig.id, DELIVERED, member)
        return True, None

    def _to_agent(
        self, name: str, sender: str, sig: RawSignal, payload: Any, now: float
    ) -> tuple[bool, str | None]:
        """To one agent: kept in its mailbox (ack), forwarded now, or held while it is away.

        Replies are never kept: they resolve a request in the recipient and are
        never acknowledged.
        """
        box = self.boxes.get(name)
        if box is not None and not sig.reply:
            return self._keep(box, sig, payload)
        if name in self.peers and not self.held.get(name):
            self._forward(name, payload, sender, sig.id)
            self.counters["delivered"] += 1
            if sig.to is None:  # a publication: one outcome per subscriber (else: _route)
                self.traces.mark(sig.id, DELIVERED, name)
            return True, None
        if name not in self.table:
            return False, f"{name} is not connected"
        return self._hold(name, payload, sig.id)

    def _hold(self, name: str, payload: Any, sig_id: str) -> tuple[bool, str | None]:
        queue = self.held.setdefault(name, deque())
        if len(queue) >= self.queue_limit:
            self.counters["dropped"] += 1
            return False, f"hold queue for {name} is full ({self.queue_limit})"
        queue.append((sig_id, bytes(payload)))  # a batch item: not the whole batch kept alive
        self.counters["held"] += 1
        self.traces.mark(sig_id, HELD, name)
        return True, None

    def _flush_held(self, name: str, now: float) -> None:
        """The at-most-once backlog of `name` (an agent or a pool), in order, now it can go."""
        queue = self.held.get(name)
        if not queue:
            return
        if name in self.pools:
            live = self.live.get(name)
            if not live:
                return
            while queue:
                start = self.rr.get(name, 0)
                self.rr[name] = (start + 1) % len(live)
                sig_id, frame = queue.popleft()
                member = live[start % len(live)]
                self._forward(member, frame, "", sig_id)
                self.counters["delivered"] += 1
                self.traces.mark(sig_id, DELIVERED, member)
            return
        if name not in self.peers:
            return
        while queue:
            sig_id, frame = queue.popleft()
            self._forward(name, frame, "", sig_id)
            self.counters["delivered"] += 1
            self.traces.mark(sig_id, DELIVERED, name)

    # === mailboxes (ack = true) ========================================================

    def _keep(self, box: Mailbox, sig: RawSignal, payload: Any) -> tuple[bool, str | None]:
        """Accept a signal for an ack = true agent or pool: journaled, then handed out."""
        settings = self._settings(box.name)
        assert settings is not None
        if not self.journal_ok:
            self.counters["dropped"] += 1
            return False, "journal unavailable"
        if sig.id in box.known:
            return True, None  # the same signal again (a resend): kept once
        if box.kept >= settings.max_pending:
            self.counters["dropped"] += 1
            why = f"{box.name} is full: {settings.max_pending} signals pending (max_pending)"
            return False, why
        if (box.name, sig.id) in self._done_keys:  # kept again after its ack: done goes first
            self._records[:0] = self._done
            self._done, self._done_keys = [], set()
        frame = bytes(payload)
        k = Kept(
            box.name,
            sig.id,
            frame,
            sig.type,
            sig.source,
            None if sig.reply else sig.correlation_id,
        )
        box.pending[k.id] = k
        box.kept += 1
        box.known.add(k.id)
        self._fresh.append(k)
        self._records.append(("p", box.name, k.id, frame, 0, "", None))
        self._dirty.add(box.name)
        self.counters["kept"] += 1
        self.traces.mark(k.id, KEPT_OUTCOME, box.name)
        return True, None

    def _undo_fresh(self, taken: list[tuple[Any, ...]]) -> None:
        """The commit failed: the signals accepted this turn were never kept; tell senders.

        The turn's other records (acks, counts) are written with the next turn
        that succeeds: losing them would only mean a flagged redelivery.
        """
        fresh = {(k.box, k.id) for k in self._fresh}
        for k in self._fresh:
            box = self.boxes.get(k.box)
            if box is not None and box.pending.pop(k.id, None) is not None:
                box.kept -= 1
                box.known.discard(k.id)
            self.traces.mark(k.id, ERROR, k.box, "journal unavailable")
        self._fresh.clear()
        again = [r for r in taken if r[0] != "z" and not (r[0] == "p" and (r[1], r[2]) in fresh)]
        self._records[:0] = again
        for receipt in self._receipts:
            rec = self.dec.decode(receipt.frame)
            self._control(receipt.to, Receipt(rec.id, False, error="journal unavailable"))
        self._receipts.clear()

    def _pump(self, name: str, now: float) -> None:
        """Hand `name` what is due, up to its `max_in_flight`: its own mailbox, then its pool's."""
        peer = self.peers.get(name)
        holder = self.boxes.get(name)
        entry = self.table.get(name)
        if peer is None or holder is None or entry is None or peer.stalled_until > now:
            return
        pool = self.boxes.get(entry.pool) if entry.pool else None
        if not holder.pending and (pool is None or not pool.pending):
            return  # the common case after an ack: nothing waits
        room = entry.max_in_flight - len(holder.in_flight)
        if room <= 0:
            return
        out: list[Kept] = []
        self._take(holder, holder, room, out, now)
        if pool is not None and peer.ready and len(out) < room:
            self._take(pool, holder, room - len(out), out, now)
        self._deliver(name, out)

    def _pump_pool(self, pool: str, now: float) -> None:
        """Spread the pool's pending signals over its ready members with room, round robin."""
        box = self.boxes.get(pool)
        live = self.live.get(pool)
        if box is None or not box.pending or not live:
            return
        outs: dict[str, list[Kept]] = {}
        while box.pending:
            progressed = False
            for _ in range(len(live)):
                start = self.rr.get(pool, 0)
                member = live[start % len(live)]
                self.rr[pool] = (start + 1) % len(live)
                holder = self.boxes.get(member)
                peer = self.peers.get(member)
                entry = self.table[member]
                if holder is None or peer is None or peer.stalled_until > now:
                    continue
                if len(holder.in_flight) >= entry.max_in_flight:
                    continue
                out = outs.setdefault(member, [])
                if self._take(box, holder, 1, out, now):
                    progressed = True
                if not box.pending:
                    break
            if not progressed:
                break
        for member, out in outs.items():
            self._deliver(member, out)

    def _take(self, box: Mailbox, holder: Mailbox, room: int, out: list[Kept], now: float) -> int:
        """Move up to `room` pending signals of `box` into `holder`'s hands."""
        taken = 0
        pending = box.pending
        while taken < room and pending:
            _, k = pending.popitem(last=False)
            if k.id in holder.in_flight:  # the same id from two mailboxes: one at a time
                box.push_front(k)
                break
            k.holder = holder.name
            k.deliveries += 1
            holder.in_flight[k.id] = k
            if k.corr is not None:
                holder.replies[k.corr] = k.id
            out.append(k)
            taken += 1
        return taken

    def _deliver(self, name: str, out: list[Kept]) -> None:
        if not out:
            return
        frames: list[Any] = []
        mark = self.traces.mark
        for k in out:
            mark(k.id, DELIVERED, name, deliveries=k.deliveries)
            if k.deliveries > 1 or k.recovered:
                sig = self.dec.decode(k.frame)
                again = msgspec.structs.replace(sig, redelivered=True, deliveries=k.deliveries)
                frames.append(msgspec.Raw(self.enc.encode(again)))
                self.counters["redelivered"] += 1
            else:
                frames.append(msgspec.Raw(k.frame))
        self.counters["delivered"] += len(out)
        frame = frames[0] if len(frames) == 1 else self.enc.encode(RawBatch(frames))
        self._sends.append(Send(name, frame, KEPT, tuple(k.id for k in out)))

    def _ack(self, name: str, ids: list[str], now: float) -> None:
        holder = self.boxes.get(name)
        if holder is None:
            return
        for sig_id in ids:
            k = holder.in_flight.get(sig_id)
            if k is None or k.corr is not None:  # a request waits for its reply instead
                continue
            self._finish(holder, k)
        self._dirty.add(name)

    def _finish(self, holder: Mailbox, k: Kept) -> None:
        holder.release(k.id)
        box = self.boxes.get(k.box)
        if box is not None:
            box.kept -= 1
            if k.box != holder.name:
                self._dirty.add(k.box)
            box.known.discard(k.id)
        self._done.append(("d", k.box, k.id))
        self._done_keys.add((k.box, k.id))
        self.counters["acked"] += 1
        self.traces.mark(k.id, ACKED if k.corr is None else REPLIED, holder.name)

    def _reply_settles(self, name: str, corr: str, now: float) -> None:
        """`name` answered a request it was given: done with it, acked or not."""
        holder = self.boxes.get(name)
        if holder is None:
            return
        sig_id = holder.replies.get(corr)
        if sig_id is not None and sig_id in holder.in_flight:
            self._finish(holder, holder.in_flight[sig_id])
            self._dirty.add(name)

    def _nack(self, name: str, nack: Nack, now: float) -> None:
        holder = self.boxes.get(name)
        if holder is None:
            return
        for sig_id in nack.ids:
            k = holder.release(sig_id)
            if k is not None:
                self.counters["nacked"] += 1
                self._failed(k, nack.error or "failed", now, backoff=True)
        self._dirty.add(name)

    def _failed(self, k: Kept, error: str, now: float, backoff: bool) -> None:
        """A delivery failed: dead-letter it, or retry it (after a backoff for a nack)."""
        box = self.boxes.get(k.box)
        settings = self._settings(k.box)
        if box is None or settings is None:
            return
        k.error = error
        if k.deliveries >= settings.max_deliveries:
            return self._dead_letter(box, k, now)
        self._records.append(("n", k.box, k.id, k.deliveries, error))
        self.traces.mark(k.id, NACKED if backoff else RETRYING, k.box, error, k.deliveries)
        if backoff:
            delay = min(BACKOFF_MAX, settings.retry_backoff * 2 ** max(0, k.deliveries - 1))
            heapq.heappush(box.retry, (now + delay, next(self._seq), k))
            self._retrying.add(k.box)
        else:
            box.push_front(k)
            self._dirty.add(k.box)

    def _retry_due(self, box: Mailbox, now: float) -> None:
        while box.retry and box.retry[0][0] <= now:
            _, _, k = heapq.heappop(box.retry)
            box.pending[k.id] = k
        self._dirty.add(box.name)

    def _dead_letter(self, box: Mailbox, k: Kept, now: float) -> None:
        k.dead_at = now + self.wall_offset
        box.kept -= 1
        settings = self._settings(box.name)
        if settings is not None and len(box.dead) >= settings.max_pending:
            # The queue is bounded like the mailbox: the oldest letter makes room.
            _, oldest = box.dead.popitem(last=False)
            box.known.discard(oldest.id)
            self._records.append(("d", oldest.box, oldest.id))
            self.log("bus.dead_letter_dropped", agent=box.name, id=oldest.id)
        box.dead[k.id] = k
        self._records.append(("x", k.box, k.id, k.deliveries, k.error, k.dead_at))
        self.traces.mark(k.id, DEAD, k.box, k.error, k.deliveries)
        self.counters["dead_lettered"] += 1
        self.log("bus.dead_lettered", agent=k.box, id=k.id, type=k.type, error=k.error)
        self._notice(
            "bus.dead_lettered",
            k.box,
            id=k.id,
            type=k.type,
            deliveries=k.deliveries,
            error=k.error,
        )

    # === the dead-letter queue =========================================================

    def _dlq(self, sender: str, query: Dlq, now: float) -> None:
        if query.op not in ("list", "redrive", "purge"):
            return self._control(sender, DlqReply(error=f"unknown dlq op {query.op!r}"))
        if query.agent is not None and query.agent not in self.boxes:
            if query.agent in self.table or query.agent in self.pools:
                why = f"{query.agent} is not an ack = true agent: it has no dead letters"
            else:
                why = f"unknown agent {query.agent!r}"
            return self._control(sender, DlqReply(error=why))
        boxes = [self.boxes[query.agent]] if query.agent else list(self.boxes.values())
        chosen = [
            (box, k)
            for box in boxes
            for k in list(box.dead.values())
            if query.id is None or k.id == query.id
        ]
        if query.id is not None and not chosen:
            return self._control(sender, DlqReply(error=f"no dead letter with id {query.id}"))
        letters = [
            DeadLetter(k.id, k.box, k.type, k.source, k.deliveries, k.error, k.dead_at or 0.0)
            for _, k in chosen
        ]
        for box, k in chosen:
            if query.op == "list":
                continue
            del box.dead[k.id]
            if query.op == "purge":
                box.known.discard(k.id)
                self._records.append(("d", k.box, k.id))
                self.traces.mark(k.id, PURGED, k.box)
                continue
            k.deliveries, k.dead_at, k.recovered = 0, None, True  # flagged: it was delivered
            box.pending[k.id] = k
            box.kept += 1
            self._records.append(("r", k.box, k.id))
            self.traces.mark(k.id, REDRIVEN, k.box)
            self._dirty.add(box.name)
        self._control(sender, DlqReply(dead_letters=letters))


def _raw(payload: Any) -> msgspec.Raw:
    """A signal's bytes as a batch item, not as a MessagePack bin."""
    return payload if type(payload) is msgspec.Raw else msgspec.Raw(payload)
