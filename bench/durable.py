"""Durable delivery rows of bench/bus.py: agentd's journaling broker against JetStream and Redis.

Workload (issue 9): --durable-n messages (20,000) of 100 bytes, one producer, one
consumer that records and acknowledges each. Per system, in fresh temp dirs:

- sync: one receipted send at a time (agentd `Client.send(..., receipt=True)`,
  JetStream `await js.publish`, Redis `XADD`), first send to last confirmation;
- pipelined: 256 unconfirmed at most (`Client.send_confirmed(window=256)`,
  `js.publish_async` with `publish_async_max_pending=256`, pipelines of 256 XADDs);
- end-to-end pipelined: from the pipelined run's first send until the consumer has
  acknowledged its last message (the consumer stamps time.monotonic(), one clock for
  all processes);
- lost after kill -9: pipelined sends again, the server killed with SIGKILL after half
  of them and restarted on the same data; lost = messages whose confirmation said
  accepted that the consumer never got; unflagged dups = deliveries after a message's
  first that the server did not flag as redeliveries (agentd `redelivered`, JetStream
  `num_delivered > 1`, Redis: read back from the consumer's pending entries list).
  A send with no confirmation (cut by the kill) is not resent and counts for nothing.

Each figure is the median of --repeat runs (each run: a new server, consumer and
producer); the kill columns add up --kill-runs runs.

agentd: a real broker (`python -m agentd.bus.broker --endpoint ipc://... --journal
<tmp>/bus.journal --journal-sync batch|always`), no daemon. The bench plays the daemon's
part of the protocol itself: a DEALER with routing id `agentd` sends
`Table(version, [AgentEntry("consumer", ack=True, max_pending=...)])` until the broker
answers `TableOk`, at start and again after the restart, as the daemon does when it
restarts its broker (bus/link.py). max_pending is raised to hold a whole run (the
default 10,000 would answer "full" to a producer that is ahead of its consumer);
max_in_flight keeps its default (100). The consumer is a raw pyzmq DEALER
(bench/durable_peers.py) that speaks docs/PROTOCOL.md: hello, ready, and one `ack`
frame per wake-up listing every signal it got. A row "memory only" runs the broker
without --journal (ack = true kept in memory, as before the journal).

Anchors, installed from the bench when missing: Debian `nats-server` and
`redis-server`, PyPI `nats-py` and `redis` (into bench/.venv-bench). They bind
127.0.0.1 on free ports with data in temp dirs: nats-server -js (file store; a
durable pull consumer, explicit acks, fetch 256, `msg.ack()` each, ack_wait 2 s so
that redeliveries after the kill come within the run); redis-server with
`appendonly yes`, `appendfsync everysec` or `always`, no RDB snapshots (a consumer
group, XREADGROUP COUNT 256 BLOCK, XACK of what it read).

Everything started is registered with _common.Cleanup and stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    Cleanup,
    bench_python,
    ensure_debian,
    free_port,
    median,
)

PEERS = str(Path(__file__).resolve().parent / "durable_peers.py")
NATS_ACK_WAIT = 2.0


class Peer:
    """A role process of durable_peers.py: lines to its stdin, lines from its stdout."""

    def __init__(self, cleanup: Cleanup, python: str, role: str, *args: str, log: Path) -> None:
        self.role = role
        self.log = log
        self.err = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = cleanup.popen(
            [python, PEERS, role, *args],
            cwd=str(REPO),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str, timeout: float) -> str | None:
        """The rest of the next line starting with `word`; None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.role} exited ({self.proc.poll()}):\n{tail}")
            head, _, rest = line.partition(" ")
            if head == word:
                return rest

    def must(self, word: str, timeout: float) -> str:
        rest = self.expect(word, timeout)
        if rest is None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.role}: no {word!r} within {timeout}s\n{tail}")
        return rest

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send("quit")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(3)
        self.err.close()


# --- servers -------------------------------------------------------------------------


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


class System:
    """One row's server: start, kill -9, restart on the same data, and its peer processes."""

    label = ""
    python = sys.executable
    settle = 0.5  # after the consumer has every accepted message: time for late duplicates

    def __init__(self, cleanup: Cleanup, tmp: Path) -> None:
        self.cleanup = cleanup
        self.tmp = tmp
        self.proc: subprocess.Popen[Any] | None = None
        self.server_log = tmp / "server.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def peer_args(self) -> list[str]:
        raise NotImplementedError

    def consumer_args(self) -> list[str]:
        return self.peer_args()

    def start(self) -> None:
        with open(self.server_log, "ab") as log:
            self.proc = self.cleanup.popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        wait_until(self._up, 30, f"{self.label} up")
        self.started()

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.server_log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.label}: server exited ({self.proc.returncode}):\n{tail}")
        return self.ready()

    def started(self) -> None:
        """Called after each start (a restart too), once the server answers."""

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            self.cleanup.stop(self.proc)

    def peer(self, role: str, args: list[str]) -> Peer:
        name = f"{type(self).__name__.lower()}_{role}"
        return Peer(self.cleanup, self.python, name, *args, log=self.tmp / f"{role}.log")


def tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Agentd(System):
    """The broker, with or without its journal; the bench sends it the daemon's table."""

    def __init__(self, cleanup: Cleanup, tmp: Path, sync: str | None, n: int) -> None:
        super().__init__(cleanup, tmp)
        self.sync = sync
        self.n = n
        self.label = f"agentd, journal_sync = {sync}" if sync else "agentd, memory only"
        self.socket_path = tmp / "bus.sock"
        self.endpoint = f"ipc://{self.socket_path}"
        self.version = 0
        self._link: Any = None

    def argv(self) -> list[str]:
        # As the daemon runs it: signals wait (up to 5 s) for the table we send.
        argv = [sys.executable, "-m", "agentd.bus.broker", "--endpoint", self.endpoint]
        argv += ["--table-wait", "5"]
        if self.sync:
            argv += ["--journal", str(self.tmp / "bus.journal"), "--journal-sync", self.sync]
        return [*argv, "--log-format", "json"]

    def ready(self) -> bool:
        return self.socket_path.exists()

    def started(self) -> None:
        """Send the table until the broker confirms it (what bus/link.py does)."""
        import zmq

        from agentd.bus.envelope import (
            DAEMON_ID,
            AgentEntry,
            Table,
            TableOk,
            encoder,
            peer_decoder,
        )

        if self._link is None:
            self._ctx = zmq.Context()
            self._link = self._ctx.socket(zmq.DEALER)
            self._link.setsockopt(zmq.ROUTING_ID, DAEMON_ID)
            self._link.setsockopt(zmq.LINGER, 0)
            self._link.setsockopt(zmq.RECONNECT_IVL, 10)
            self._link.connect(self.endpoint)
        self.version += 1
        entry = AgentEntry("consumer", ack=True, max_pending=4 * self.n + 10_000)
        frame = Table(self.version, [entry])
        enc_frame = encoder().encode(frame)
        dec = peer_decoder()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            self._link.send(enc_frame)
            resend = time.monotonic() + 0.25
            while time.monotonic() < resend:
                if not self._link.poll(10):
                    continue
                got = dec.decode(self._link.recv())
                if isinstance(got, TableOk) and got.version == self.version:
                    return
        raise RuntimeError("the broker did not confirm the table")

    def peer_args(self) -> list[str]:
        return [self.endpoint]

    def stop(self) -> None:
        super().stop()
        if self._link is not None:
            self._link.close(0)
            self._ctx.term()
            self._link = None


class Nats(System):
    settle = NATS_ACK_WAIT + 1.0  # redeliveries come after ack_wait

    def __init__(self, cleanup: Cleanup, tmp: Path, binary: str, python: str) -> None:
        super().__init__(cleanup, tmp)
        self.binary = binary
        self.python = python
        self.label = f"NATS JetStream {_version([binary, '--version'])} (file store)"
        self.port, self.http = free_port(), free_port()
        conf = tmp / "nats.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{self.port}\nhttp: 127.0.0.1:{self.http}\n"
            f'jetstream {{ store_dir: "{tmp}/js" }}\n'
        )
        self.conf = conf

    def argv(self) -> list[str]:
        return [self.binary, "-c", str(self.conf)]

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def peer_args(self) -> list[str]:
        return [f"nats://127.0.0.1:{self.port}"]

    def consumer_args(self) -> list[str]:
        return [*self.peer_args(), str(NATS_ACK_WAIT)]


class Redis(System):
    def __init__(self, cleanup: Cleanup, tmp: Path, binary: str, python: str, fsync: str) -> None:
        super().__init__(cleanup, tmp)
        self.binary = binary
        self.python = python
        self.fsync = fsync
        version = _version([binary, "--version"], prefix="v=")
        self.label = f"Redis Streams {version}, AOF {fsync}"
        self.port = free_port()

    def argv(self) -> list[str]:
        return [
            self.binary,
            *("--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.tmp)),
            *("--appendonly", "yes", "--appendfsync", self.fsync, "--save", ""),
            *("--daemonize", "no", "--logfile", ""),
        ]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def peer_args(self) -> list[str]:
        return [str(self.port)]


def _version(argv: list[str], prefix: str = "v") -> str:
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith(prefix) and any(c.isdigit() for c in word):
            return word[len(prefix) :].lstrip("v")
    return "?"


# --- runs ----------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    sync: list[float] = field(default_factory=list)
    pipe: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    dups: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def throughput_run(system: System, n: int, row: Row) -> None:
    system.start()
    consumer = system.peer("consumer", system.consumer_args())
    producer = system.peer("producer", system.peer_args())
    try:
        consumer.must("up", 30)
        producer.must("up", 30)
        consumer.send(f"target {n}")
        producer.send(f"sync 0 {n}")
        sync = json.loads(producer.must("done", 300))
        consumer.must("reached", 60)
        consumer.send(f"target {2 * n}")
        producer.send(f"pipe {n} {n}")
        pipe = json.loads(producer.must("done", 300))
        reached = float(consumer.must("reached", 120))
        for what, d in (("sync", sync), ("pipelined", pipe)):
            if d["refused"]:
                row.notes.append(f"{what}: {d['refused']} refused {d.get('errors', '')}")
        row.sync.append(sync["accepted"] / (sync["t1"] - sync["t0"]))
        row.pipe.append(pipe["accepted"] / (pipe["t1"] - pipe["t0"]))
        row.e2e.append(n / (reached - pipe["t0"]))
    finally:
        producer.close()
        consumer.close()
        system.stop()


def kill_run(system: System, n: int, row: Row) -> None:
    system.start()
    consumer = system.peer("consumer", system.consumer_args())
    producer = system.peer("producer", system.peer_args())
    accepted_path = system.tmp / "accepted.txt"
    try:
        consumer.must("up", 30)
        producer.must("up", 30)
        producer.send(f"kill 0 {n} {accepted_path}")
        producer.must("half", 300)
        system.kill9()
        system.start()
        sent = json.loads(producer.must("done", 300))
        consumer.send(f"want {accepted_path}")
        got = wait_delivered(consumer, stall=5.0 + system.settle)
        if got["missing"]:
            quiet = 5.0 + system.settle
            row.notes.append(f"kill: {got['missing']} accepted never arrived ({quiet:.0f} s quiet)")
        else:
            time.sleep(system.settle)  # late duplicates (JetStream redelivers after ack_wait)
            got = report(consumer)
        row.lost.append(got["missing"])
        row.dups.append(got["unflagged_dups"])
        row.notes.append(
            f"kill: {sent['accepted']} accepted, {sent['refused']} refused, "
            f"{sent['unknown']} unconfirmed; consumer got {got['distinct']} "
            f"({got['flagged_dups']} flagged dups, {got['stored_twice']} stored twice)"
            + (f"; refusals {sent['errors']}" if sent.get("errors") else "")
        )
    finally:
        producer.close()
        consumer.close()
        system.stop()


def report(consumer: Peer) -> dict[str, int]:
    consumer.send("report")
    return json.loads(consumer.must("report", 30))


def wait_delivered(consumer: Peer, stall: float, timeout: float = 120.0) -> dict[str, int]:
    """Until the consumer has every accepted message, or has got nothing new for `stall` s."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        got = report(consumer)
        now = time.monotonic()
        if not got["missing"] or now > deadline:
            return got
        if got["deliveries"] != last:
            last, since = got["deliveries"], now
        elif now - since > stall:
            return got
        time.sleep(0.1)


def broker_has_journal() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "agentd.bus.broker", "--help"],
        capture_output=True,
        text=True,
        cwd=str(REPO),
    ).stdout
    return "--journal-sync" in out


def systems(cleanup: Cleanup, n: int, anchors: bool) -> list[Callable[[Path], System]]:
    """Constructors of every row's system, for a fresh temp dir each run."""
    out: list[Callable[[Path], System]] = []
    if broker_has_journal():
        for mode in ("batch", "always"):
            out.append(lambda tmp, mode=mode: Agentd(cleanup, tmp, mode, n))
    else:
        print("(the broker has no --journal yet: journal rows skipped)", file=sys.stderr)
    out.append(lambda tmp: Agentd(cleanup, tmp, None, n))
    if anchors:
        bins = ensure_debian({"nats-server": "nats-server", "redis-server": "redis-server"})
        py = str(bench_python({"nats-py": "nats", "redis": "redis"}))
        out.append(lambda tmp: Nats(cleanup, tmp, bins["nats-server"], py))
        for fsync in ("everysec", "always"):
            out.append(lambda tmp, f=fsync: Redis(cleanup, tmp, bins["redis-server"], py, f))
    return out


def run_durable(
    n: int, repeat: int, kill_runs: int, anchors: bool = True, only: str = ""
) -> list[Row]:
    """Every row; `only`: those whose label contains it (case-insensitive)."""
    cleanup = Cleanup()
    rows = []
    try:
        for make in systems(cleanup, n, anchors):
            row = Row(make(cleanup.tmpdir()).label)
            if only.lower() not in row.label.lower():
                continue
            print(f"durable: {row.label} ...", file=sys.stderr, flush=True)
            for _ in range(repeat):
                throughput_run(make(cleanup.tmpdir()), n, row)
            for _ in range(kill_runs):
                kill_run(make(cleanup.tmpdir()), n, row)
            rows.append(row)
    finally:
        cleanup.close()
    return rows


def format_table(rows: list[Row], n: int, repeat: int, kill_runs: int) -> str:
    def rate(xs: list[float]) -> str:
        return f"{median(xs):,.0f}" if xs else "-"

    def count(xs: list[int]) -> str:
        if not xs:
            return "-"
        lo, hi = min(xs), max(xs)
        return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"

    head = [
        "system",
        "sync msg/s",
        "pipelined msg/s",
        "end-to-end pipelined msg/s",
        "lost after kill -9",
        "unflagged dups",
    ]
    body = [
        [r.label, rate(r.sync), rate(r.pipe), rate(r.e2e), count(r.lost), count(r.dups)]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = [
        f"durable: {n:,} messages of 100 bytes, ack = true consumer, median of {repeat};"
        f" kill -9 columns: {kill_runs} run(s), each value or min-max",
        " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        "-|-".join("-" * w for w in widths),
    ]
    for line in body:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        lines.append(" | ".join(cells))
    notes = [f"  {r.label}: {note}" for r in rows for note in r.notes]
    if notes:
        lines += ["notes:", *notes]
    return "\n".join(lines)
