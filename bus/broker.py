"""The broker: one ROUTER socket routing signals between agents, clients and the daemon.

Run as `python -m agentd.bus.broker --endpoint ipc://...`. It is a single
thread over synchronous pyzmq — a busy loop of recv → decode envelope →
route → send, with the payload left as raw bytes — because that is the
fastest shape Python has for this job.

What it keeps per configured agent (the daemon's table): a bounded hold
queue for signals that arrive while the agent is not connected, the
configured subscriptions (held for, too), and, with `ack = true`, every
delivered signal until it is acknowledged — redelivered, flagged, to the
next incarnation; or, if it was addressed to a pool's name, to another live
member of the pool as soon as the member that took it goes down (held for
the pool while no member is live). A *request* kept this way is settled by
its reply passing through, not by the ack: an agent that acks first and dies
before its reply left would otherwise leave the requester waiting for an
answer that never comes. Anything it cannot handle is answered with an error
frame and counted; nothing a peer sends can make it raise.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from .envelope import (
    DAEMON_ID,
    Ack,
    AgentEntry,
    AgentEvent,
    Bye,
    Down,
    Error,
    Heartbeat,
    Hello,
    RawBatch,
    RawSignal,
    Ready,
    Receipt,
    Reconnect,
    Stats,
    Subscribe,
    Table,
    TableOk,
    broker_decoder,
    encoder,
)
from .patterns import Trie, valid

RESERVED = frozenset({"agentd", "bus", "ctl"})  # the daemon, the broker, the ctl command


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
    patterns: set[str] = field(default_factory=set)


class Broker:
    """Routing state and logic; `serve()` runs the socket loop."""

    def __init__(self, sock: zmq.Socket[Any], max_frame: int, queue_limit: int, log: Any) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.queue_limit = queue_limit
        self.log = log
        self.enc = encoder()
        self.dec = broker_decoder()
        self.table: dict[str, AgentEntry] = {}
        self.table_version = -1
        self.pools: dict[str, list[str]] = {}
        self.rr: dict[str, int] = {}
        self.peers: dict[str, Peer] = {}
        self.held: dict[str, deque[bytes]] = {}  # name or pool -> frames waiting
        self.unacked: dict[str, OrderedDict[str, bytes]] = {}
        # Requests among the unacked, per agent: correlation id -> signal id (their
        # reply settles them), and the signal ids themselves (their ack does not).
        self.replies_due: dict[str, dict[str, str]] = {}
        self.requests_due: dict[str, set[str]] = {}
        self.trie = Trie()
        self.daemon_connected = False
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
            ),
            0,
        )
        self._last_malformed_log = 0.0
        self.last_send_error = 0
        self.tick_ms = 1000
        self._sink: dict[str, list[Any]] | None = None  # set while routing a batch
        self.incarnations: dict[str, int] = {}  # highest incarnation that said HELLO
        self.live: dict[str, list[str]] = {}  # pool -> its connected, ready members

    # --- sending -------------------------------------------------------------------

    def _send(self, to: str, frame: bytes) -> bool:
        """To a connected peer; False if it is gone (ROUTER_MANDATORY) or its pipe is full."""
        try:
            self.sock.send_multipart([to.encode(), frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.last_send_error = exc.errno
            return False
        return True

    def _reply(self, ident: bytes, obj: Any) -> None:
        try:
            self.sock.send_multipart([ident, self.enc.encode(obj)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _event(self, event: str, name: str, incarnation: int) -> None:
        if self.daemon_connected:
            self._reply(DAEMON_ID, AgentEvent(event, name, incarnation))

    # --- the loop ------------------------------------------------------------------

    def serve(self, wakeup: socket.socket) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(wakeup, zmq.POLLIN)
        recv = self.sock.recv_multipart
        next_check = 0.0
        while True:
            timeout = self._tick_ms()
            events = dict(poller.poll(timeout))
            if wakeup.fileno() in events or wakeup in events:
                return
            if self.sock in events:
                for _ in range(10_000):
                    try:
                        frames = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.handle(frames)
                    except Exception as exc:  # a bug must not take the bus down with it
                        self.counters["internal_errors"] += 1
                        self.log("bus.internal_error", error=repr(exc), exc_info=True)
            now = time.monotonic()
            if now >= next_check:
                self.check_heartbeats(now)
                next_check = now + 0.05

    def _tick_ms(self) -> int | None:
        """Poll timeout: a quarter of the shortest heartbeat (cached: set with the table)."""
        return self.tick_ms

    # --- input --------------------------------------------------------------------------

    def handle(self, frames: list[bytes]) -> None:
        self.counters["received"] += 1
        if len(frames) != 2:
            return self._malformed(frames[0] if frames else b"", "expected one frame")
        ident, payload = frames
        oversized = len(payload) > self.max_frame
        if oversized:
            self.counters["oversized"] += 1
        try:
            frame = self.dec.decode(payload)  # cheap even when large: data stays raw
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if oversized:
                return self._reply(ident, Error(f"frame too large ({len(payload)} bytes)"))
            return self._malformed(ident, str(exc))
        if oversized:
            why = f"frame too large ({len(payload)} > {self.max_frame} bytes)"
            if type(frame) is RawSignal:
                return self._refuse(ident.decode("utf-8", "replace"), frame, why)
            return self._reply(ident, Error(why))
        try:
            sender = ident.decode()
        except UnicodeDecodeError:
            return self._malformed(ident, "routing id is not UTF-8")
        peer = self.peers.get(sender)
        kind = type(frame)
        if ident == DAEMON_ID and self.table_version == -1 and kind is not Table:
            self._reply(ident, Reconnect())  # a new broker: the daemon must send its table
        if peer is not None:
            peer.last_seen = time.monotonic()
        elif ident != DAEMON_ID and kind in (RawSignal, RawBatch, Heartbeat, Ready, Ack):
            # A peer from before a broker restart (or a client that skipped HELLO):
            # known from now on, and an agent is asked to announce itself again.
            self.peers[sender] = Peer(sender, last_seen=time.monotonic())
            if kind is not RawSignal and kind is not RawBatch:
                self._reply(ident, Reconnect())
        if kind is RawSignal:
            self._route(sender, frame, payload)
        elif kind is RawBatch:
            self._batch(sender, ident, frame)
        elif kind is Heartbeat:
            pass
        elif kind is Hello:
            if sender in RESERVED or frame.name != sender:
                why = f"hello as {frame.name!r} from {sender!r}: names must match, and "
                return self._reply(ident, Error(why + f"{sorted(RESERVED)} are reserved"))
            self._hello(sender, frame)
        elif kind is Ready:
            self._ready(sender)
        elif kind is Ack:
            self._ack(sender, frame)
        elif kind is Subscribe:
            self._subscribe(sender, frame.patterns)
        elif kind is Bye:
            self._gone(sender, "disconnected")
        elif kind is Stats:
            self._reply(ident, Stats(counters=self._stats()))
        elif kind is Table and ident == DAEMON_ID:
            self._table(frame)
        elif kind is Down and ident == DAEMON_ID:
            p = self.peers.get(frame.name)
            if p is not None and p.incarnation <= frame.incarnation:
                self._gone(frame.name, None)
        else:
            self._malformed(ident, f"unexpected frame kind {kind.__name__.lower()}")

    def _malformed(self, ident: bytes, why: str) -> None:
        self.counters["malformed"] += 1
        now = time.monotonic()
        if now - self._last_malformed_log > 1.0:  # a flood must not flood the log too
            self._last_malformed_log = now
            self.log(
                "bus.malformed",
                peer=ident[:64].decode("utf-8", "replace"),
                reason=why,
                total=self.counters["malformed"],
            )
        if ident:
            self._reply(ident, Error(f"malformed frame: {why}"))

    def _stats(self) -> dict[str, int]:
        return {
            **self.counters,
            "peers": len(self.peers),
            "held_now": sum(len(q) for q in self.held.values()),
            "subscriptions": sum(len(p) for p in self.trie.by_subscriber.values()),
        }

    # --- peers ----------------------------------------------------------------------------

    def _hello(self, name: str, hello: Hello) -> None:
        old = self.peers.get(name)
        now = time.monotonic()
        peer = Peer(name, hello.incarnation, hello.pid, last_seen=now, hello_at=now)
        self.peers[name] = peer
        newer = hello.incarnation > self.incarnations.get(name, -1)
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
        # Redeliver what the last incarnation took but never acknowledged, then the backlog.
        pending = self.unacked.get(name)
        if pending and newer:  # not to the same incarnation saying HELLO again
            for frame in list(pending.values()):
                sig = self.dec.decode(frame)
                again = self.enc.encode(msgspec.structs.replace(sig, redelivered=True))
                pending[sig.id] = again
                if self._send(name, again):
                    self.counters["redelivered"] += 1
        self._flush_held(name)

    def _ready(self, name: str) -> None:
        peer = self.peers.get(name)
        if peer is None:
            return
        peer.ready = True
        self._update_live(name)
        self._event("ready", name, peer.incarnation)
        entry = self.table.get(name)
        if entry is not None and entry.pool:
            self._flush_held(entry.pool)  # signals to the pool waited for a ready member

    def _gone(self, name: str, event: str | None) -> None:
        peer = self.peers.pop(name, None)
        if peer is None:
            return
        self._update_live(name)
        if name not in self.table:
            self.trie.remove_subscriber(name)
        if event:
            self._event(event, name, peer.incarnation)
        self._reroute_unacked(name)

    def _reroute_unacked(self, name: str) -> None:
        """A pool member went down: what it took for the pool goes to another member now.

        Only signals addressed to the pool's name move: the sender asked for
        "any member", so waiting for this member's next incarnation would only
        delay the work (and a member that keeps crashing would keep it
        forever). Signals addressed to the member by its own name stay for its
        next incarnation, as for any ack = true agent.
        """
        entry = self.table.get(name)
        pending = self.unacked.get(name)
        if entry is None or entry.pool is None or not pending:
            return
        for sig_id, frame in list(pending.items()):
            sig = self.dec.decode(frame)
            if sig.to != entry.pool:
                continue
            del pending[sig_id]
            self._settled(name, sig_id, sig.correlation_id)
            again = self.enc.encode(msgspec.structs.replace(sig, redelivered=True))
            self.counters["redelivered"] += 1
            ok, why, _ = self._direct(entry.pool, again, sig_id, corr=sig.correlation_id)
            if not ok:  # the pool's hold queue is full: nowhere left to keep it
                self.log("bus.redelivery_dropped", pool=entry.pool, id=sig_id, reason=why)

    def _subscribe(self, name: str, patterns: list[str]) -> None:
        peer = self.peers.get(name)
        for pattern in patterns:
            if valid(pattern):
                self.trie.add(pattern, name)
                if peer is not None:
                    peer.patterns.add(pattern)

    def check_heartbeats(self, now: float) -> None:
        for peer in self.peers.values():
            entry = self.table.get(peer.name)
            if entry is None or peer.hung_reported:
                continue
            silent = now - peer.last_seen > entry.heartbeat
            # HELLO but no READY within `heartbeat` is hung too (a setup that never ends).
            since_hello = now - peer.hello_at if peer.hello_at is not None else 0.0
            unready = not peer.ready and since_hello > entry.heartbeat
            if silent or unready:
                peer.hung_reported = True
                self.log(
                    "bus.hung",
                    agent=peer.name,
                    incarnation=peer.incarnation,
                    silent=round(now - peer.last_seen, 3),
                    ready=peer.ready,
                )
                self._event("hung", peer.name, peer.incarnation)

    # --- the daemon's table ------------------------------------------------------------------

    def _table(self, table: Table) -> None:
        self.daemon_connected = True
        self._reply(DAEMON_ID, TableOk(table.version))
        if table.version == self.table_version:
            return
        self.table_version = table.version
        beats = [a.heartbeat for a in table.agents]
        self.tick_ms = max(20, min(1000, int(min(beats) * 250))) if beats else 1000
        old = self.table
        self.table = {a.name: a for a in table.agents}
        pools: dict[str, list[str]] = {}
        for entry in table.agents:
            if entry.pool:
                pools.setdefault(entry.pool, []).append(entry.name)
        self.pools = pools
        self.live = {}
        for members in pools.values():
            self._update_live(members[0])
        for name, entry in old.items():
            if name not in self.table:  # gone for good: drop what we kept for it
                self.held.pop(name, None)
                self.unacked.pop(name, None)
                self.replies_due.pop(name, None)
                self.requests_due.pop(name, None)
                if name not in self.peers:
                    self.trie.remove_subscriber(name)
                for pattern in entry.subscribe:
                    self.trie.remove(pattern, name)
        for pool in list(self.held):
            if pool not in self.table and pool not in self.pools and pool not in self.peers:
                del self.held[pool]
        for entry in table.agents:
            before = old.get(entry.name)
            if before is not None:
                for pattern in set(before.subscribe) - set(entry.subscribe):
                    self.trie.remove(pattern, entry.name)
            for pattern in entry.subscribe:
                if valid(pattern):
                    self.trie.add(pattern, entry.name)

    # --- routing ------------------------------------------------------------------------

    def _batch(self, sender: str, ident: bytes, batch: RawBatch) -> None:
        """Route each signal; what goes to the same connected peer leaves as one batch.

        Coalescing is what lets a burst beat one-message-per-frame forwarding:
        one ZeroMQ send per recipient per batch, not per signal.
        """
        out: dict[str, list[Any]] = {}
        self._sink = out
        try:
            for raw in batch.signals:
                try:
                    sig = self.dec.decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self._malformed(ident, f"in batch: {exc}")
                    continue
                if type(sig) is not RawSignal:
                    self._malformed(ident, "batch items must be signals")
                    continue
                self._route(sender, sig, raw)
        finally:
            self._sink = None
        for name, items in out.items():
            frame = items[0] if len(items) == 1 else self.enc.encode(RawBatch(items))
            if self._send(name, frame):
                self.counters["delivered"] += len(items)
                continue
            if self.last_send_error == zmq.EAGAIN:
                self.counters["dropped"] += len(items)
                why = f"{name} is not keeping up (its queue is full): {len(items)} signals"
                self._reply(ident, Error(why, to=name))
                continue
            self._gone(name, "disconnected")
            for raw in items:  # held if configured, else refused to the sender
                ok, why, _ = self._deliver(name, raw, "")
                if not ok:
                    self._reply(ident, Error(why or "refused", to=name))

    def _route(self, sender: str, sig: RawSignal, payload: bytes) -> None:
        self.counters["routed"] += 1
        if sig.source != sender:
            return self._refuse(sender, sig, f"source {sig.source!r} is not your name {sender!r}")
        if sig.reply and sig.correlation_id is not None and sender in self.replies_due:
            self._reply_settles(sender, sig.correlation_id)
        if sig.to is not None:
            corr = None if sig.reply else sig.correlation_id
            ok, why, count = self._direct(sig.to, payload, sig.id, track=not sig.reply, corr=corr)
        else:
            ok, why, count = True, None, 0
            for name in self.trie.match(sig.type):
                if name != sender and self._deliver(name, payload, sig.id)[0]:
                    count += 1
        if not ok:
            return self._refuse(sender, sig, why or "refused")
        if sig.receipt:
            self._send(sender, self.enc.encode(Receipt(sig.id, True, delivered=count)))

    def _refuse(self, sender: str, sig: RawSignal, why: str) -> None:
        self.counters["errors"] += 1
        if sig.receipt:
            frame = Receipt(sig.id, False, error=why)
        else:
            frame = Error(why, id=sig.id, to=sig.to)
        self._send(sender, self.enc.encode(frame))

    def _direct(
        self, to: str, payload: bytes, sig_id: str, track: bool = True, corr: str | None = None
    ) -> tuple[bool, str | None, int]:
        live = self.live.get(to)
        if live is not None:
            start = self.rr.get(to, 0)
            for k in range(len(live)):
                member = live[(start + k) % len(live)]
                self.rr[to] = (start + k + 1) % len(live)
                # hold=False: a member that turns out to be gone must not keep a
                # signal meant for any member; the next one (or the pool) takes it.
                if self._deliver(member, payload, sig_id, track, corr, hold=False)[0]:
                    return True, None, 1
            return self._hold(to, payload)
        if to in self.peers or to in self.table:
            return self._deliver(to, payload, sig_id, track, corr)
        return False, f"unknown recipient {to!r}", 0

    def _deliver(
        self,
        name: str,
        payload: bytes,
        sig_id: str,
        track: bool = True,
        corr: str | None = None,
        hold: bool = True,
    ) -> tuple[bool, str | None, int]:
        """Send now if connected, else hold it for a configured agent.

        `track=False` is for replies: they resolve a request in the recipient
        and are never acknowledged, so an ack = true agent must not keep them
        (they would pile up until its unacked queue is full). `corr` is set for
        a request: kept for an ack = true agent, its reply settles it.
        """
        entry = self.table.get(name)
        acked = entry is not None and entry.ack and track
        if name in self.peers and not self.held.get(name):
            sink = self._sink
            if sink is not None and not acked:
                items = sink.get(name)
                if items is None:
                    sink[name] = [payload]
                else:
                    items.append(payload)
                return True, None, 1
            payload = bytes(payload)
            if acked:
                pending = self.unacked.setdefault(name, OrderedDict())
                if len(pending) >= self.queue_limit:
                    return self._hold(name, payload) if hold else (False, "full", 0)
                pending[sig_id] = payload
                if corr is not None:
                    self._expect_reply(name, sig_id, corr)
            if self._send(name, payload):
                self.counters["delivered"] += 1
                return True, None, 1
            if acked:
                self.unacked[name].pop(sig_id, None)
                self._settled(name, sig_id, corr)
            if self.last_send_error == zmq.EAGAIN:  # alive but not reading: its pipe is full
                self.counters["dropped"] += 1
                return False, f"{name} is not keeping up (its queue is full)", 0
            self._gone(name, "disconnected")
        if entry is None:
            return False, f"{name} is not connected", 0
        if not hold:
            return False, f"{name} is not connected", 0
        return self._hold(name, payload)

    def _hold(self, name: str, payload: bytes) -> tuple[bool, str | None, int]:
        queue = self.held.setdefault(name, deque())
        if len(queue) >= self.queue_limit:
            self.counters["dropped"] += 1
            return False, f"hold queue for {name} is full ({self.queue_limit})", 0
        payload = bytes(payload)  # a batch item: do not keep the whole batch alive
        queue.append(payload)
        self.counters["held"] += 1
        return True, None, 1

    def _flush_held(self, name: str) -> None:
        """Deliver the backlog in order; stops (keeping the rest) if the peer stalls."""
        queue = self.held.get(name)
        if not queue:
            return
        self.held[name] = deque()
        target = name
        while queue:
            payload = queue[0]
            if name in self.pools:
                sig = self.dec.decode(payload)
                ok, _, _ = self._direct(name, payload, sig.id, corr=sig.correlation_id)
                if not ok:
                    break
            else:
                sig = self.dec.decode(payload)
                entry = self.table.get(target)
                if entry is not None and entry.ack and not sig.reply:
                    self.unacked.setdefault(target, OrderedDict())[sig.id] = payload
                    if sig.correlation_id is not None:
                        self._expect_reply(target, sig.id, sig.correlation_id)
                if not self._send(target, payload):
                    break
                self.counters["delivered"] += 1
            queue.popleft()
        if queue:
            self.held[name].extendleft(reversed(queue))

    def _update_live(self, name: str) -> None:
        """Recompute the ready members of `name`'s pool (on HELLO, READY, goodbye, table).

        Kept up to date on those events so that routing to a pool is one lookup.
        """
        entry = self.table.get(name)
        if entry is None or entry.pool is None:
            return
        peers = self.peers
        members = self.pools.get(entry.pool, [])
        self.live[entry.pool] = [m for m in members if m in peers and peers[m].ready]

    def _ack(self, name: str, ack: Ack) -> None:
        pending = self.unacked.get(name)
        if pending:
            requests = self.requests_due.get(name, ())
            for sig_id in ack.ids:
                if sig_id not in requests:  # a request waits for its reply instead
                    pending.pop(sig_id, None)

    def _expect_reply(self, name: str, sig_id: str, corr: str) -> None:
        self.replies_due.setdefault(name, {})[corr] = sig_id
        self.requests_due.setdefault(name, set()).add(sig_id)

    def _settled(self, name: str, sig_id: str, corr: str | None) -> None:
        """Forget the request bookkeeping of an unacked signal that left `name`'s list."""
        if corr is not None and name in self.replies_due:
            self.replies_due[name].pop(corr, None)
            self.requests_due[name].discard(sig_id)

    def _reply_settles(self, name: str, corr: str) -> None:
        """`name` answered a request it was given: done with it, acked or not."""
        sig_id = self.replies_due[name].pop(corr, None)
        if sig_id is not None:
            self.requests_due[name].discard(sig_id)
            pending = self.unacked.get(name)
            if pending is not None:
                pending.pop(sig_id, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentd.bus.broker", description="agentd's bus broker")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--max-frame", type=int, default=1024 * 1024)
    parser.add_argument("--queue-limit", type=int, default=10_000)
    parser.add_argument("--hwm", type=int, default=100_000)
    parser.add_argument("--log-format", choices=["json", "console", "auto"], default="auto")
    parser.add_argument("--keys-dir", default=None)
    args = parser.parse_args(argv)

    from agentd.daemon.log import configure, get_logger

    configure(args.log_format)
    logger = get_logger("agentd.bus")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, args.hwm)
    sock.setsockopt(zmq.RCVHWM, args.hwm)
    # Past max_frame a frame is refused with an error frame; far past it (a hard cap
    # against memory exhaustion) ZeroMQ drops the connection before we see it.
    sock.setsockopt(zmq.MAXMSGSIZE, max(64 * 1024 * 1024, 16 * args.max_frame))
    sock.setsockopt(zmq.LINGER, 0)
    auth = None
    if args.endpoint.startswith("tcp://"):
        from pathlib import Path

        from agentd.daemon.keys import server_auth

        if not args.keys_dir:
            print("a tcp bus endpoint needs --keys-dir (CurveZMQ)", file=sys.stderr)
            return 2
        auth = server_auth(ctx, sock, Path(args.keys_dir))
    path = args.endpoint[len("ipc://") :] if args.endpoint.startswith("ipc://") else None
    if path and os.path.exists(path):
        os.unlink(path)  # a stale socket from a broker that died; the daemon owns this path
    sock.bind(args.endpoint)
    if path:
        os.chmod(path, 0o660)

    # SIGTERM/SIGINT wake the poll loop through a socketpair: no polling for shutdown.
    rfd, wfd = socket.socketpair()
    rfd.setblocking(False)
    wfd.setblocking(False)
    signal.set_wakeup_fd(wfd.fileno())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)

    def log(event: str, **kw: Any) -> None:
        logger.warning(event, **kw)

    broker = Broker(sock, args.max_frame, args.queue_limit, log)
    logger.info("bus.listening", endpoint=args.endpoint, pid=os.getpid())
    try:
        broker.serve(rfd)
    finally:
        logger.info("bus.stopping", **broker._stats())
        sock.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
