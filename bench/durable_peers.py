"""The producer and consumer processes of bench/bus.py's durable rows (see bench/durable.py).

    python bench/durable_peers.py ROLE ARGS...

Roles: `agentd_consumer ENDPOINT`, `agentd_producer ENDPOINT`, `nats_consumer URL ACK_WAIT`,
`nats_producer URL`, `redis_consumer PORT`, `redis_producer PORT`. The agentd roles run
under the project's interpreter (pyzmq, msgspec, agentd); the NATS and Redis roles under
bench/.venv-bench's (nats-py, redis). So nothing is imported at the top but the stdlib.

Every role prints `up` once connected, then obeys lines on stdin and answers on stdout:

- a consumer records every delivery (its key, and whether the server flagged it as a
  redelivery) and acknowledges it; `target K` makes it print `reached T` once it has
  acknowledged K distinct messages (T: time.monotonic(), one clock for every process on
  Linux); `want PATH` the same once it has every key listed in PATH; `report` prints
  `report {json}`: distinct keys, deliveries, duplicates flagged and not flagged, and
  how many keys of the last `want` it never got;
- a producer runs `sync BASE N`, `pipe BASE N` or `kill BASE N OUT` and prints
  `done {json}` with t0/t1 (monotonic, first send to last confirmation) and the
  counts of accepted, refused and unknown sends. `kill` is pipelined too, prints
  `half` after N/2 sends (the driver then kills the server with SIGKILL and restarts
  it), survives the outage, and writes the keys whose confirmation said accepted
  to OUT, one a line.

Keys: agentd signals have their own `id`; NATS and Redis messages carry theirs in
the payload, whose first 12 bytes are BASE + i in decimal, padded to 100 bytes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

SIZE = 100
WINDOW = 256
SUBJECT = "bench.durable"  # NATS subject; also the agentd signal type
STREAM = "bench"  # the Redis stream and NATS stream name (upper-cased for NATS)
GROUP = "bench"


def payload(i: int) -> bytes:
    return b"%012d" % i + b"x" * (SIZE - 12)


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def done(
    t0: float, t1: float, accepted: int, refused: int = 0, unknown: int = 0, **kw: Any
) -> None:
    say(
        "done",
        json.dumps(
            {"t0": t0, "t1": t1, "accepted": accepted, "refused": refused, "unknown": unknown, **kw}
        ),
    )


def commands() -> deque[str]:
    """Lines from stdin, appended by a thread: the role's loop looks at them when it can."""
    lines: deque[str] = deque()

    def read() -> None:
        for line in sys.stdin:
            lines.append(line.strip())
        lines.append("quit")

    threading.Thread(target=read, daemon=True).start()
    return lines


def next_command(lines: deque[str]) -> list[str]:
    """Block until the driver says something (a producer has nothing else to do)."""
    while not lines:
        time.sleep(0.001)
    return lines.popleft().split()


# --- consumers ---------------------------------------------------------------------


class Tracker:
    """What a consumer got: every delivery, by key, and the driver's questions about it."""

    def __init__(self) -> None:
        self.seen: dict[Any, int] = {}
        self.deliveries = 0
        self.flagged_dups = 0
        self.unflagged_dups = 0
        self.flagged_first = 0  # flagged, but the first time we saw it (its first copy was lost)
        self.stored: dict[Any, Any] = {}  # key -> the server's id of its first copy
        self.stored_twice = 0  # deliveries of a key under a second server id (a re-publish)
        self.target: int | None = None
        self.want: set[Any] | None = None
        self.want_pending = False
        self.cmds = commands()
        self.quit = False

    def record(self, key: Any, redelivered: bool, server_id: Any = None) -> None:
        """One delivery; `server_id` (stream sequence, entry id) tells a re-publish apart."""
        self.deliveries += 1
        n = self.seen.get(key, 0)
        if server_id is not None:
            first = self.stored.setdefault(key, server_id)
            if first != server_id:
                self.stored_twice += 1
        if n:
            if redelivered:
                self.flagged_dups += 1
            else:
                self.unflagged_dups += 1
        elif redelivered:
            self.flagged_first += 1
        self.seen[key] = n + 1
        if self.want is not None:
            self.want.discard(key)

    def check(self, parse: Callable[[str], Any] = str) -> None:
        """After a batch is acknowledged: answer commands, say whether a target was reached."""
        while self.cmds:
            cmd, *args = self.cmds.popleft().split()
            if cmd == "target":
                self.target = int(args[0])
            elif cmd == "want":
                with open(args[0]) as f:
                    self.want = {parse(line.strip()) for line in f if line.strip()}
                self.want.difference_update(self.seen)
                self.want_pending = True
            elif cmd == "report":
                say("report", json.dumps(self.report()))
            elif cmd == "quit":
                self.quit = True
        if self.target is not None and len(self.seen) >= self.target:
            self.target = None
            say("reached", time.monotonic())
        if self.want_pending and not self.want:
            self.want_pending = False
            say("reached", time.monotonic())

    def report(self) -> dict[str, int]:
        return {
            "distinct": len(self.seen),
            "deliveries": self.deliveries,
            "flagged_dups": self.flagged_dups,
            "unflagged_dups": self.unflagged_dups,
            "flagged_first": self.flagged_first,
            "stored_twice": self.stored_twice,
            "missing": len(self.want) if self.want is not None else 0,
        }


def role_agentd_consumer(endpoint: str) -> None:
    """An ack = true agent in raw pyzmq (docs/PROTOCOL.md): hello, ready, record, ack.

    It acknowledges what one wake-up brought in one `ack` frame listing every id
    (each signal is acknowledged; the frame count is the protocol's business), and
    after a broker restart (`reconnect`) says hello again, as the SDK does.
    """
    import os

    import zmq

    from agentd.bus.envelope import (
        Ack,
        Batch,
        Error,
        Heartbeat,
        Hello,
        Ready,
        Reconnect,
        Signal,
        encoder,
        peer_decoder,
    )

    name = "consumer"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.RECONNECT_IVL, 10)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 100)
    sock.connect(endpoint)
    enc, dec = encoder(), peer_decoder()
    hello = enc.encode(Hello(name, 0, os.getpid()))
    ready = enc.encode(Ready())
    sock.send(hello)
    sock.send(ready)
    tracker = Tracker()
    record = tracker.record
    heartbeat = enc.encode(Heartbeat())
    last_sent = time.monotonic()
    say("up")
    while not tracker.quit:
        ids: list[str] = []
        if sock.poll(20):
            while True:
                try:
                    raw = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                frame = dec.decode(raw)
                kind = type(frame)
                if kind is Signal:
                    ids.append(frame.id)
                    record(frame.id, frame.redelivered)
                elif kind is Batch:
                    for s in frame.signals:
                        ids.append(s.id)
                        record(s.id, s.redelivered)
                elif kind is Reconnect:
                    sock.send(hello)
                    sock.send(ready)
                elif kind is Error:
                    print(f"consumer: bus error: {frame.reason}", file=sys.stderr, flush=True)
                if len(ids) >= 1000:
                    break
        now = time.monotonic()
        if ids:
            sock.send(enc.encode(Ack(ids)))
            last_sent = now
        elif now - last_sent > 0.5:
            sock.send(heartbeat)
            last_sent = now
        tracker.check()
    sock.close()
    ctx.term()


def role_nats_consumer(url: str, ack_wait: str) -> None:
    """A durable JetStream pull consumer (file store, explicit acks): fetch 256, ack each."""
    import asyncio

    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    async def main() -> None:
        nc = await nats.connect(
            url, max_reconnect_attempts=-1, reconnect_time_wait=0.02, connect_timeout=5
        )
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(name=STREAM.upper(), subjects=[SUBJECT], storage=StorageType.FILE)
        )
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=float(ack_wait))
        psub = await js.pull_subscribe(SUBJECT, durable="consumer", config=config)
        tracker = Tracker()
        record = tracker.record
        say("up")
        while not tracker.quit:
            try:
                msgs = await psub.fetch(WINDOW, timeout=0.05)
            except nats.errors.TimeoutError:
                msgs = []
            except Exception as exc:  # the server is down: the client reconnects by itself
                print(f"consumer: {exc!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(0.02)
                msgs = []
            for m in msgs:
                md = m.metadata
                record(int(m.data[:12]), md.num_delivered > 1, md.sequence.stream)
                try:
                    await m.ack()
                except Exception as exc:
                    print(f"consumer: ack: {exc!r}", file=sys.stderr, flush=True)
            tracker.check(int)
        await nc.drain()

    asyncio.run(main())


def role_redis_consumer(port: str) -> None:
    """A consumer group reader: XREADGROUP 256, XACK them; its own pending list after a reconnect.

    Entries read back from the pending entries list (id 0, after a connection
    error) are the server's redeliveries: that is the flag.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    r = redis.Redis(host="127.0.0.1", port=int(port), retry=Retry(NoBackoff(), 0))
    try:
        r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    tracker = Tracker()
    record = tracker.record
    pel_from: str | None = None  # reading our pending list from this id (after a reconnect)
    say("up")
    while not tracker.quit:
        try:
            if pel_from is not None:
                resp = r.xreadgroup(GROUP, "c", {STREAM: pel_from}, count=WINDOW)
            else:
                resp = r.xreadgroup(GROUP, "c", {STREAM: ">"}, count=WINDOW, block=20)
            entries = resp[0][1] if resp else []
            if pel_from is not None and not entries:
                pel_from = None
            ids = []
            for eid, fields in entries:
                if not fields:  # a pending entry whose message is gone
                    continue
                ids.append(eid)
                record(int(fields[b"d"][:12]), pel_from is not None, eid)
            if ids:
                r.xack(STREAM, GROUP, *ids)
                if pel_from is not None:
                    pel_from = ids[-1].decode()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            print(f"consumer: {exc!r}", file=sys.stderr, flush=True)
            time.sleep(0.02)
            pel_from = "0"
        tracker.check(int)


# --- producers ---------------------------------------------------------------------


def role_agentd_producer(endpoint: str) -> None:
    """`Client.send(..., receipt=True)` one at a time; `Client.send_confirmed` (window 256)."""
    from agentd.bus import BusError, Client

    lines = commands()
    with Client(endpoint, name="producer") as c:
        c.stats()
        say("up")
        while True:
            cmd, *args = next_command(lines)
            if cmd == "quit":
                return
            n = int(args[1])  # the signal ids are the keys: no BASE needed
            if cmd == "sync":
                refused = 0
                t0 = time.monotonic()
                for _ in range(n):
                    try:
                        c.send("consumer", SUBJECT, payload(0), receipt=True)
                    except BusError:
                        refused += 1
                t1 = time.monotonic()
                done(t0, t1, n - refused, refused)
            elif cmd == "pipe":
                data = payload(0)
                t0 = time.monotonic()
                receipts = c.send_confirmed(
                    (("consumer", SUBJECT, data) for _ in range(n)), window=WINDOW
                )
                t1 = time.monotonic()
                bad = [r.error for r in receipts if not r.ok]
                done(t0, t1, n - len(bad), len(bad), errors=sorted(set(map(str, bad)))[:3])
            elif cmd == "kill":
                agentd_kill_run(endpoint, n, args[2])


def agentd_kill_run(endpoint: str, n: int, out: str) -> None:
    """Pipelined receipted sends (raw DEALER) that outlive a broker killed with SIGKILL.

    A signal counts as accepted only if its receipt says so; one whose receipt never
    came is `unknown` (the broker may or may not have journaled it) and is not resent:
    an at-least-once producer would resend, and its resends are not what this counts.
    """
    import zmq

    from agentd.bus.envelope import Error, Receipt, encoder, peer_decoder, signal

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"producer-k")
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 10)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 100)
    sock.connect(endpoint)
    enc, dec = encoder(), peer_decoder()
    waiting: set[str] = set()
    answered: dict[str, bool] = {}
    errors: dict[str, int] = {}
    data = payload(0)

    def take(timeout_ms: int) -> bool:
        if not sock.poll(timeout_ms):
            return False
        frame = dec.decode(sock.recv())
        if isinstance(frame, Receipt):
            answered[frame.id] = frame.ok
            waiting.discard(frame.id)
            if not frame.ok:
                errors[str(frame.error)] = errors.get(str(frame.error), 0) + 1
        elif isinstance(frame, Error) and frame.id:
            answered[frame.id] = False
            waiting.discard(frame.id)
            errors[frame.reason] = errors.get(frame.reason, 0) + 1
        return True

    t0 = time.monotonic()
    for i in range(n):
        sig = signal(SUBJECT, data, "producer-k", to="consumer", receipt=True)
        sock.send(enc.encode(sig))
        waiting.add(sig.id)
        if i == n // 2:
            say("half")
        while len(waiting) >= WINDOW:
            if not take(500):
                waiting.clear()  # the broker is gone: these may never be answered
    deadline = time.monotonic() + 10
    while waiting and time.monotonic() < deadline:
        if not take(500):
            break
    while take(200):  # late receipts of signals given up on still count
        pass
    t1 = time.monotonic()
    accepted = [k for k, ok in answered.items() if ok]
    with open(out, "w") as f:
        f.write("\n".join(accepted) + "\n")
    refused = sum(1 for ok in answered.values() if not ok)
    done(t0, t1, len(accepted), refused, n - len(answered), errors=errors)
    sock.close()
    ctx.term()


def role_nats_producer(url: str) -> None:
    """`await js.publish` one at a time; `js.publish_async` with 256 pending at most."""
    import asyncio

    import nats

    async def main() -> None:
        nc = await nats.connect(
            url, max_reconnect_attempts=-1, reconnect_time_wait=0.02, connect_timeout=5
        )
        js = nc.jetstream(publish_async_max_pending=WINDOW)
        lines = commands()
        say("up")
        while True:
            while not lines:
                await asyncio.sleep(0.001)
            cmd, *args = lines.popleft().split()
            if cmd == "quit":
                break
            base, n = int(args[0]), int(args[1])
            if cmd == "sync":
                t0 = time.monotonic()
                for i in range(base, base + n):
                    await js.publish(SUBJECT, payload(i))
                done(t0, time.monotonic(), n)
            elif cmd == "pipe":
                t0 = time.monotonic()
                publish = js.publish_async
                futures = [await publish(SUBJECT, payload(i)) for i in range(base, base + n)]
                results = await asyncio.gather(*futures, return_exceptions=True)
                t1 = time.monotonic()
                refused = sum(1 for r in results if isinstance(r, BaseException))
                done(t0, t1, n - refused, refused)
            elif cmd == "kill":
                await nats_kill_run(js, base, n, args[2])
        await nc.close()

    asyncio.run(main())


async def nats_kill_run(js: Any, base: int, n: int, out: str) -> None:
    """Pipelined publishes (256 in flight, each with a 5 s timeout) across a server SIGKILL.

    `publish_async` futures have no timeout, so a reply lost with the server would
    hold its slot forever: here each publish is a `js.publish` task instead.
    """
    import asyncio

    window = asyncio.Semaphore(WINDOW)
    accepted: list[int] = []
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        try:
            await js.publish(SUBJECT, payload(i), timeout=5)
            accepted.append(i)
        except Exception as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        finally:
            window.release()

    tasks = []
    t0 = time.monotonic()
    for k, i in enumerate(range(base, base + n)):
        await window.acquire()
        tasks.append(asyncio.ensure_future(one(i)))
        if k == n // 2:
            say("half")
    await asyncio.gather(*tasks)
    t1 = time.monotonic()
    with open(out, "w") as f:
        f.write("\n".join(map(str, accepted)) + "\n")
    done(t0, t1, len(accepted), 0, n - len(accepted), errors=errors)


def role_redis_producer(port: str) -> None:
    """XADD one at a time; pipelines of 256 XADDs (one round trip each), no retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries: a pipeline resent after a connection error would add its entries twice.
    r = redis.Redis(host="127.0.0.1", port=int(port), retry=Retry(NoBackoff(), 0))
    r.ping()
    lines = commands()
    say("up")
    while True:
        cmd, *args = next_command(lines)
        if cmd == "quit":
            return
        base, n = int(args[0]), int(args[1])
        if cmd == "sync":
            t0 = time.monotonic()
            for i in range(base, base + n):
                r.xadd(STREAM, {"d": payload(i)})
            done(t0, time.monotonic(), n)
        elif cmd == "pipe":
            t0 = time.monotonic()
            for start in range(base, base + n, WINDOW):
                pipe = r.pipeline(transaction=False)
                for i in range(start, min(start + WINDOW, base + n)):
                    pipe.xadd(STREAM, {"d": payload(i)})
                pipe.execute()
            done(t0, time.monotonic(), n)
        elif cmd == "kill":
            redis_kill_run(r, base, n, args[2])


def redis_kill_run(r: Any, base: int, n: int, out: str) -> None:
    """Pipelines of 256 across a server SIGKILL: a pipeline cut by the kill is `unknown`."""
    import redis

    accepted: list[int] = []
    unknown = 0
    half = base + n // 2
    t0 = time.monotonic()
    for start in range(base, base + n, WINDOW):
        batch = range(start, min(start + WINDOW, base + n))
        try:
            pipe = r.pipeline(transaction=False)
            for i in batch:
                pipe.xadd(STREAM, {"d": payload(i)})
            pipe.execute()
            accepted.extend(batch)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            unknown += len(batch)
            wait_redis(r)
        if start <= half < start + WINDOW:
            say("half")
    t1 = time.monotonic()
    with open(out, "w") as f:
        f.write("\n".join(map(str, accepted)) + "\n")
    done(t0, t1, len(accepted), 0, unknown)


def wait_redis(r: Any, timeout: float = 30.0) -> None:
    """Until the restarted server answers PING (it answers LOADING while it reads its AOF)."""
    import redis

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            time.sleep(0.01)
    raise RuntimeError("redis did not come back")


def main() -> None:
    role, *args = sys.argv[1:]
    globals()[f"role_{role}"](*args)


if __name__ == "__main__":
    main()
