"""Bus benchmark: the broker against a raw pyzmq forwarder, on one host.

    python bench/bus.py [--n 200000] [--rtt 5000]

(a) one-way throughput, 100-byte payloads, one sender (Client) and one
    receiver (Client), through the broker;
(a') the same with the sender coalescing bursts of 100 into BATCH frames;
(b) the ceiling: a raw DEALER -> ROUTER -> DEALER forwarder, no envelope;
(c) request/reply round trip p50/p99, broker (Client.request to an envelope
    echo peer) vs raw forwarder (raw echo);
(d) pub/sub fan-out to 10 subscribers;
(e) durable delivery to an ack = true consumer (bench/durable.py): sync receipted
    sends, pipelined receipted sends (window 256), end-to-end, and what a kill -9
    of the server loses, for the journaling broker in both journal_sync modes, the
    broker in memory, NATS JetStream and Redis Streams (installed when missing).
Every role runs in its own process (no GIL sharing); each figure is the median
of --repeat runs. Everything started is killed by pid at the end.

    python bench/bus.py --part durable [--durable-n 20000] [--kill-runs 3] [--no-anchors]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

PAYLOAD = b"x" * 100


# --- roles (run as subprocesses of this script) ---------------------------------------


def role_forwarder(endpoint: str) -> None:
    """The ceiling: ROUTER that forwards [to, body] from `from` as [to, from, body]."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.bind(endpoint)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    recv, send = sock.recv_multipart, sock.send_multipart
    while True:
        src, dst, body = recv()
        send([dst, src, body])


def role_raw_receiver(endpoint: str, n: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"rx")
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(endpoint)
    sock.send_multipart([b"tx", b"hi"])  # announce
    recv = sock.recv_multipart
    for _ in range(n):
        recv()
    print(time.monotonic(), flush=True)


def role_raw_echo(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"echo")
    sock.connect(endpoint)
    print("up", flush=True)
    while True:
        src, body = sock.recv_multipart()
        sock.send_multipart([src, body])


def role_client_receiver(endpoint: str, n: int, name: str, pattern: str) -> None:
    sys.path.insert(0, os.getcwd())
    from agentd.bus import Client

    with Client(endpoint, name=name) as c:
        if pattern:
            c.subscribe(pattern)
        else:
            c.stats()
        print("up", flush=True)
        receive = c.receive
        for _ in range(n):
            receive(timeout=30)
        print(time.monotonic(), flush=True)


def role_client_echo(endpoint: str) -> None:
    """Answers requests: decode the signal, reply with its data (the SDK's work, minus asyncio)."""
    import msgspec

    from agentd.bus.envelope import Hello, Ready, Signal, encoder, new_id, peer_decoder

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"echo")
    sock.connect(endpoint)
    enc, dec = encoder(), peer_decoder()
    sock.send(enc.encode(Hello("echo")))
    sock.send(enc.encode(Ready()))
    print("up", flush=True)
    while True:
        sig = dec.decode(sock.recv())
        if type(sig) is Signal and sig.correlation_id:
            reply = msgspec.structs.replace(
                sig,
                id=new_id(),
                source="echo",
                to=sig.source,
                reply=True,
                time=time.time(),
                correlation_id=sig.correlation_id,
            )
            sock.send(enc.encode(reply))


# --- driver --------------------------------------------------------------------------


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str, wait_line: bool = False) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--role", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        if wait_line:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "up"
        return proc

    def broker(self, endpoint: str) -> subprocess.Popen[str]:
        from agentd.bus.endpoint import parse_endpoint

        path = parse_endpoint(endpoint).path
        assert path is not None, "the bench's broker is on ipc"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentd.bus.broker",
                "--endpoint",
                endpoint,
                "--log-format",
                "json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline and proc.poll() is None, "broker did not bind"
            time.sleep(0.01)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs.clear()


def finish_time(proc: subprocess.Popen[str]) -> float:
    assert proc.stdout is not None
    out = proc.stdout.readline().strip()
    if out == "up":
        out = proc.stdout.readline().strip()
    proc.wait(60)
    return float(out)


def run_raw(tmp: str, n: int) -> float:
    procs = Procs()
    try:
        endpoint = f"ipc://{tmp}/raw.sock"
        procs.start("forwarder", endpoint)
        time.sleep(0.2)
        rx = procs.start("raw_receiver", endpoint, str(n))
        ctx = zmq.Context()
        tx = ctx.socket(zmq.DEALER)
        tx.setsockopt(zmq.ROUTING_ID, b"tx")
        tx.setsockopt(zmq.SNDHWM, 100_000)
        tx.connect(endpoint)
        tx.recv_multipart()  # rx's hello: it is connected
        send = tx.send_multipart
        t0 = time.monotonic()
        for _ in range(n):
            send([b"rx", PAYLOAD])
        rate = n / (finish_time(rx) - t0)
        tx.close(0)
        ctx.term()
        return rate
    finally:
        procs.close()


def run_broker(tmp: str, n: int, batch: int, subscribers: int = 0) -> float:
    from agentd.bus import Client

    procs = Procs()
    try:
        endpoint = f"ipc://{tmp}/bus.sock"
        procs.broker(endpoint)
        if subscribers:
            rxs = [
                procs.start("client_receiver", endpoint, str(n), f"rx{i}", "bench.*")
                for i in range(subscribers)
            ]
        else:
            rxs = [procs.start("client_receiver", endpoint, str(n), "rx", "")]
        for rx in rxs:
            assert rx.stdout is not None and rx.stdout.readline().strip() == "up"
        with Client(endpoint, name="tx") as c:
            c.stats()
            to = None if subscribers else "rx"
            t0 = time.monotonic()
            if batch > 1:
                burst = [(to, "bench.one", PAYLOAD)] * batch
                for _ in range(n // batch):
                    c.send_batch(burst)
            elif to is None:
                for _ in range(n):
                    c.publish("bench.one", PAYLOAD, receipt=False)
            else:
                for _ in range(n):
                    c.send(to, "bench.one", PAYLOAD, receipt=False)
            end = max(finish_time(rx) for rx in rxs)
        return n * len(rxs) / (end - t0)
    finally:
        procs.close()


def rtt_raw(tmp: str, n: int) -> list[float]:
    procs = Procs()
    try:
        endpoint = f"ipc://{tmp}/raw.sock"
        procs.start("forwarder", endpoint)
        time.sleep(0.2)
        procs.start("raw_echo", endpoint, wait_line=True)
        ctx = zmq.Context()
        tx = ctx.socket(zmq.DEALER)
        tx.setsockopt(zmq.ROUTING_ID, b"tx")
        tx.connect(endpoint)
        time.sleep(0.2)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            tx.send_multipart([b"echo", PAYLOAD])
            tx.recv_multipart()
            out.append(time.perf_counter() - t0)
        tx.close(0)
        ctx.term()
        return out
    finally:
        procs.close()


def rtt_broker(tmp: str, n: int) -> list[float]:
    from agentd.bus import BusError, Client

    procs = Procs()
    try:
        endpoint = f"ipc://{tmp}/bus.sock"
        procs.broker(endpoint)
        procs.start("client_echo", endpoint, wait_line=True)
        out = []
        with Client(endpoint, name="tx") as c:
            c.stats()
            deadline = time.monotonic() + 10  # until the echo's HELLO has reached the broker
            while True:
                try:
                    c.request("echo", "bench.rtt", PAYLOAD)
                    break
                except BusError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            for _ in range(n):
                t0 = time.perf_counter()
                c.request("echo", "bench.rtt", PAYLOAD)
                out.append(time.perf_counter() - t0)
        return out
    finally:
        procs.close()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", nargs="+")
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--rtt", type=int, default=5_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part", choices=["all", "classic", "durable"], default="all")
    ap.add_argument("--durable-n", type=int, default=20_000)
    ap.add_argument("--kill-runs", type=int, default=3)
    ap.add_argument("--no-anchors", action="store_true", help="durable rows of agentd only")
    ap.add_argument("--only", default="", help="durable rows whose system contains this")
    ap.add_argument(
        "--agentd-rev",
        default=None,
        help="run agentd from this committed revision (git archive), not the working tree",
    )
    args = ap.parse_args()
    if args.role:
        role, *rest = args.role
        fn = globals()[f"role_{role}"]
        fn(*[int(x) if x.isdigit() else x for x in rest])
        return
    if args.agentd_rev:
        use_revision(args.agentd_rev)
    if args.part != "durable":
        classic(args)
    if args.part != "classic":
        durable(args)


def use_revision(rev: str) -> None:
    """Import agentd, here and in every process started from now on, from `git archive REV`.

    The working tree may hold someone's half-finished edit; a revision is what was
    committed. The export lives in a temp dir removed at exit.
    """
    import atexit
    import shutil

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pathlib import Path

    from _common import export_agentd

    dest = Path(tempfile.mkdtemp(prefix="agentd-rev-", dir="/tmp"))
    atexit.register(shutil.rmtree, dest, True)
    path = str(export_agentd(rev, dest))
    sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")]))
    print(f"agentd from {rev} ({path})", file=sys.stderr, flush=True)


def durable(args: argparse.Namespace) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import install_sigterm_as_interrupt
    from durable import format_table, run_durable

    install_sigterm_as_interrupt()
    n, repeat, kills = args.durable_n, args.repeat, args.kill_runs
    rows = run_durable(n, repeat, kills, anchors=not args.no_anchors, only=args.only)
    print()
    print(format_table(rows, n, repeat, kills), flush=True)


def classic(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        med = statistics.median
        r = args.repeat
        raw = med(run_raw(tmp, args.n) for _ in range(r))
        one = med(run_broker(tmp, args.n, 1) for _ in range(r))
        bat = med(run_broker(tmp, args.n, 100) for _ in range(r))
        fan = med(run_broker(tmp, args.n // 10, 1, subscribers=10) for _ in range(r))
        fanb = med(run_broker(tmp, args.n // 10, 100, subscribers=10) for _ in range(r))
        raw_rtt = rtt_raw(tmp, args.rtt)
        bus_rtt = rtt_broker(tmp, args.rtt)
    rows = [
        ("(b) raw forwarder, one-way", f"{raw:,.0f} msg/s", "100%"),
        ("(a) broker, Client -> Client", f"{one:,.0f} msg/s", f"{one / raw:.0%}"),
        ("(a') broker, BATCH of 100", f"{bat:,.0f} msg/s", f"{bat / raw:.0%}"),
        ("(d) pub/sub fan-out x10 (deliveries)", f"{fan:,.0f} msg/s", f"{fan / raw:.0%}"),
        ("(d') fan-out x10, BATCH of 100", f"{fanb:,.0f} msg/s", f"{fanb / raw:.0%}"),
        (
            "(c) raw round trip p50 / p99",
            f"{pct(raw_rtt, 0.5) * 1e6:.0f} / {pct(raw_rtt, 0.99) * 1e6:.0f} us",
            "1.00x",
        ),
        (
            "(c) broker request/reply p50 / p99",
            f"{pct(bus_rtt, 0.5) * 1e6:.0f} / {pct(bus_rtt, 0.99) * 1e6:.0f} us",
            f"{pct(bus_rtt, 0.5) / pct(raw_rtt, 0.5):.2f}x",
        ),
    ]
    print(f"n={args.n} one-way messages, {args.rtt} round trips, median of {args.repeat}")
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>22}  vs raw")
    for name, value, rel in rows:
        print(f"{name:<{w}}  {value:>22}  {rel}", flush=True)


if __name__ == "__main__":
    main()
