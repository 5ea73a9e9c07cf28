"""The broker: one ROUTER socket, the journal, and the loop between them.

Run as `python -m agentd.bus.broker --endpoint ipc://... [--journal PATH]`.
Every decision is the router's (`router.py`); this module only carries
them out. A turn of the loop is: take every frame that is waiting (up to a
bound), hand each to the router, write the journal records the turn made in
one write (group commit; `--journal-sync always` adds an fdatasync), then
send what the router asks for and tell it which sends failed. The receipts
of signals kept for `ack = true` agents are among those sends, so none
leaves before its signal is in the journal.

It is a single thread over synchronous pyzmq — recv → decode the envelope →
route → send, with the payload left as raw bytes — because that is the
fastest shape Python has for this job.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from typing import Any

import zmq

from .endpoint import parse_endpoint
from .journal import Journal, JournalError
from .router import FULL, GONE, Router

TURN = 1000  # frames taken per turn at most: the journal commit and sends come between
ROUNDS = 16  # commit/send rounds per turn at most (a failed send can cause another)


class BrokerLoop:
    """The socket loop around a `Router` (and a `Journal`, when there is one)."""

    def __init__(self, sock: zmq.Socket[Any], router: Router, journal: Journal | None) -> None:
        self.sock = sock
        self.router = router
        self.journal = journal

    def serve(self, wakeup: socket.socket) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(wakeup, zmq.POLLIN)
        router, sock = self.router, self.sock
        # Plain ints and the socket's own calls: pyzmq's enum flags and multipart helpers
        # cost several µs a frame, which is most of a hop's latency in a request.
        recv, option = sock.recv, sock.getsockopt
        noblock, rcvmore, events, pollin = (
            int(zmq.NOBLOCK),
            int(zmq.RCVMORE),
            int(zmq.EVENTS),
            int(zmq.POLLIN),
        )
        while True:
            ready = dict(poller.poll(int(router.timeout() * 1000)))
            if wakeup.fileno() in ready or wakeup in ready:
                return
            now = time.monotonic()
            if sock in ready:
                for _ in range(TURN):
                    if not option(events) & pollin:
                        break
                    parts = [recv(noblock)]
                    while option(rcvmore):
                        parts.append(recv(noblock))
                    self._take(parts, now)
            router.tick(now)
            self.carry_out(now)

    def _take(self, parts: list[bytes], now: float) -> None:
        """One message in: the router's, unless it is not the one frame it must be."""
        router = self.router
        if len(parts) != 2:
            router.counters["received"] += 1
            router.malformed(parts[0] if parts else b"", "expected one frame", now)
            return
        try:
            router.handle(parts[0], parts[1], now)
        except Exception as exc:  # a bug must not take the bus down with it
            router.counters["internal_errors"] += 1
            router.log("bus.internal_error", error=repr(exc), exc_info=True)

    def carry_out(self, now: float) -> None:
        """Commit the turn's records, then send; failed sends go back to the router."""
        router, sock = self.router, self.sock
        send_part = sock.send
        first, last = int(zmq.NOBLOCK | zmq.SNDMORE), int(zmq.NOBLOCK)
        for _ in range(ROUNDS):
            records = router.take_records()
            if records:
                self._commit(records, now)
            sends = router.take_sends(now)
            if not sends:
                break
            for send in sends:
                try:
                    # ROUTER_MANDATORY: the routing id part fails at once if the peer is
                    # gone; a full pipe fails it with EAGAIN. Either way nothing half-sent.
                    send_part(send.to.encode(), first)
                    send_part(send.frame, last)
                except zmq.ZMQError as exc:
                    result = FULL if exc.errno == zmq.EAGAIN else GONE
                    router.send_failed(send, result, now)
        journal = self.journal
        if journal is not None and journal.should_compact():
            try:
                journal.compact(router.snapshot())
            except OSError as exc:
                router.log("bus.compact_failed", error=str(exc))

    def _commit(self, records: list[Any], now: float) -> None:
        if self.journal is None:
            self.router.committed(True, now)
            return
        try:
            self.journal.write(records)
        except OSError as exc:
            self.router.committed(False, now, error=str(exc))
        else:
            self.router.committed(True, now)


def open_journal(path: str, sync: str, router: Router, logger: Any) -> Journal:
    """Open (and replay) the journal, report what it found, and hand it to the router."""
    journal = Journal(path, sync)  # type: ignore[arg-type]
    loaded = journal.open(observe=router.traces.from_journal)
    if loaded.corrupt_moved_to:
        logger.error("bus.journal_corrupt", path=path, moved_to=loaded.corrupt_moved_to)
        router.pending_notices.append(
            ("bus.journal_corrupt", {"path": path, "moved_to": loaded.corrupt_moved_to})
        )
    if loaded.torn_bytes:
        logger.warning("bus.journal_torn_tail", path=path, bytes=loaded.torn_bytes)
    router.restore(loaded.entries)
    logger.info("bus.journal_opened", path=path, sync=sync, entries=len(loaded.entries))
    return journal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentd.bus.broker", description="agentd's bus broker")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--max-frame", type=int, default=1024 * 1024)
    parser.add_argument("--queue-limit", type=int, default=10_000)
    parser.add_argument("--hwm", type=int, default=100_000)
    parser.add_argument("--log-format", choices=["json", "console", "auto"], default="auto")
    parser.add_argument("--keys-dir", default=None)
    parser.add_argument("--journal", default=None, help="the journal file (default: memory only)")
    parser.add_argument("--journal-sync", choices=["batch", "always"], default="batch")
    parser.add_argument(
        "--table-wait",
        type=float,
        default=0.0,
        help="seconds signals wait for the daemon's first table (default 0: route at once)",
    )
    args = parser.parse_args(argv)
    try:
        endpoint = parse_endpoint(args.endpoint)
    except ValueError as exc:
        parser.error(f"--endpoint: {exc}")

    from .log import configure, get_logger

    configure(args.log_format)
    logger = get_logger("agentd.bus")

    def log(event: str, **kw: Any) -> None:
        logger.warning(event, **kw)

    router = Router(
        max_frame=args.max_frame,
        queue_limit=args.queue_limit,
        log=log,
        wall_offset=time.time() - time.monotonic(),
        table_wait=args.table_wait,
    )
    journal = None
    if args.journal:
        try:
            journal = open_journal(args.journal, args.journal_sync, router, logger)
        except (OSError, JournalError) as exc:
            print(f"cannot open the journal {args.journal}: {exc}", file=sys.stderr)
            return 1
    # The journal before the socket: a broker that is still dying holds the lock, and
    # the path must not be taken from it before its last write is done.
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
    if endpoint.needs_keys:
        from pathlib import Path

        from .keys import server_auth

        if not args.keys_dir:
            print("a tcp bus endpoint needs --keys-dir (CurveZMQ)", file=sys.stderr)
            if journal is not None:
                journal.close()
            return 2
        auth = server_auth(ctx, sock, Path(args.keys_dir))
    path = endpoint.path
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

    broker_loop = BrokerLoop(sock, router, journal)
    logger.info("bus.listening", endpoint=args.endpoint, pid=os.getpid())
    try:
        broker_loop.serve(rfd)
    finally:
        router.sync_all()
        broker_loop.carry_out(time.monotonic())
        logger.info("bus.stopping", **router.stats())
        if journal is not None:
            journal.close()
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
