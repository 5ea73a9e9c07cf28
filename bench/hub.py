#!/usr/bin/env python3
"""Jobs per second and job latency through the orchestration hub, end to end.

    python bench/hub.py [--seconds 8] [--warmup 1.5] [--clients 32] [--replicas 1,2,4]

What runs: `agentd run` on etc/agentd.toml itself, with three edits only —
the ingress port (a free one), the runtime dir (a temp dir) and `replicas`
of both pools (1, 2 and 4 workers per pool). The `workers` supervisor's
intensity is raised for the chaos rows, which kill a worker every second.

What is measured: `--clients` concurrent HTTP clients (aiohttp, in this
process), each in a loop: POST /jobs (a mix of text.upper, text.wordcount,
math.sum and report, cycled; no `delay`), then GET /jobs/<id> every 2 ms
until the job is no longer pending. A job's latency is POST sent ->
the GET that saw it completed, so it includes the HTTP round trips and up to
2 ms of polling; every job posted in the measured window counts, however
late it completes. jobs/s = jobs posted and completed inside the window /
its length. Every job goes HTTP -> ingress -> bus -> orchestrator -> bus -> a
worker pool (request) -> reply -> orchestrator -> job.completed (published)
-> ingress (and audit) -> HTTP. The warm-up's jobs are not counted.

Chaos rows: a thread kill -9s a random worker (any pool member, its pid
from the daemon's latest agent.ready event) every second. The job must still
complete; "failed" counts jobs that ended `failed` and "lost" jobs still
pending 30 s after the window closed.

Everything started lives in its own session and is torn down in a `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Agentd, Cleanup, install_sigterm_as_interrupt, median, percentile

REPO = Path(__file__).resolve().parent.parent
HUB = REPO / "etc" / "agentd.toml"
JOBS = [
    {"type": "text.upper", "payload": {"text": "the quick brown fox"}},
    {"type": "text.wordcount", "payload": {"text": "jumps over the lazy dog"}},
    {"type": "math.sum", "payload": {"numbers": [1, 2, 3, 4.5]}},
    {"type": "report", "payload": {"text": "to be or not to be", "numbers": [1, 2, 3.5]}},
]


@dataclass
class Row:
    replicas: int
    chaos: bool
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # every job posted in the window
    in_window: int = 0  # jobs that also completed inside the window (jobs/s)
    failed: int = 0
    lost: int = 0
    kills: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_config(path: Path, runtime_dir: Path, port: int, replicas: int) -> Path:
    """etc/agentd.toml with the port, runtime dir, pool sizes and intensity edited."""
    text = HUB.read_text()
    edits = [
        (r'AGENTD_HTTP_PORT = "8080"', f'AGENTD_HTTP_PORT = "{port}"', 1),
        (r"replicas = 2\n", f"replicas = {replicas}\n", 2),
        (r"\[daemon\]\n", f'[daemon]\nruntime_dir = "{runtime_dir}"\n', 1),
        (r"max_restarts = 10\nmax_seconds = 10", "max_restarts = 10000\nmax_seconds = 1", 1),
    ]
    for pattern, replacement, count in edits:
        text, n = re.subn(pattern, replacement, text)
        if n != count:
            raise SystemExit(f"etc/agentd.toml changed shape: {pattern!r} matched {n}x")
    path.write_text(text)
    return path


def wait_ready(agentd: Agentd, timeout: float = 60) -> None:
    if agentd.wait_event("daemon.ready", timeout) is None:
        raise SystemExit(f"the hub did not start:\n{agentd.tail(20)}")


class Chaos(threading.Thread):
    """kill -9 a random worker every `period` seconds."""

    def __init__(self, agentd: Agentd, workers: list[str], period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.agentd, self.workers, self.period = agentd, workers, period
        self.stop = threading.Event()
        self.kills = 0
        self.rng = random.Random(1)

    def latest_pid(self, name: str) -> int | None:
        with self.agentd.cond:
            ready = [r for _, r in self.agentd.events if r.get("event") == "agent.ready"]
        pids = [r["pid"] for r in ready if r.get("agent") == name]
        return pids[-1] if pids else None

    def run(self) -> None:
        while not self.stop.wait(self.period):
            pid = self.latest_pid(self.rng.choice(self.workers))
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.kills += 1


async def client_loop(
    http: aiohttp.ClientSession, base: str, index: int, until: float, row: Row, start: float
) -> None:
    """One client: submit, poll to the outcome, record, repeat until `until`."""
    i = index
    while time.monotonic() < until:
        job = JOBS[i % len(JOBS)]
        i += 1
        t0 = time.monotonic()
        async with http.post(f"{base}/jobs", json=job) as resp:
            if resp.status != 202:
                row.failed += t0 >= start
                continue
            job_id = (await resp.json())["id"]
        status = await poll(http, f"{base}/jobs/{job_id}", t0 + 30)
        t1 = time.monotonic()
        if t0 < start:  # warm-up
            continue
        if status == "completed":
            row.latencies_ms.append((t1 - t0) * 1000)
            row.in_window += t1 <= until
        elif status == "failed":
            row.failed += 1
        else:
            row.lost += 1


async def poll(http: aiohttp.ClientSession, url: str, deadline: float) -> str:
    while True:
        async with http.get(url) as resp:
            status = (await resp.json())["status"]
        if status != "pending" or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.002)


async def load(base: str, clients: int, warmup: float, seconds: float, row: Row) -> None:
    start = time.monotonic() + warmup
    until = start + seconds
    connector = aiohttp.TCPConnector(limit=clients * 2)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(
            *(client_loop(http, base, k, until, row, start) for k in range(clients))
        )
    row.seconds = seconds


def run_one(cleanup: Cleanup, replicas: int, chaos: bool, args: argparse.Namespace) -> Row:
    tmp = cleanup.tmpdir("agentd-hub-")
    port = free_port()
    config = hub_config(tmp / "agentd.toml", tmp / "run", port, replicas)
    agentd = Agentd(cleanup, config)
    row = Row(replicas, chaos)
    try:
        wait_ready(agentd)
        workers = [f"{pool}@{i}" for pool in ("text", "math") for i in range(replicas)]
        killer = Chaos(agentd, workers) if chaos else None
        if killer is not None:
            killer.start()
        try:
            asyncio.run(
                load(f"http://127.0.0.1:{port}", args.clients, args.warmup, args.seconds, row)
            )
        finally:
            if killer is not None:
                killer.stop.set()
                killer.join(5)
                row.kills = killer.kills
    finally:
        cleanup.stop(agentd.proc)
    return row


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print()
    print("hub end to end: HTTP -> ingress -> orchestrator -> worker pools -> reply -> HTTP")
    print(f"{args.clients} concurrent clients, {args.seconds:g} s measured after {args.warmup:g} s")
    print(f"warm-up, job mix text.upper/text.wordcount/math.sum/report; {os.cpu_count()} cores")
    head = f"{'workers/pool':>12}  {'chaos':<12}{'jobs/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
    print(head + f"{'jobs':>7}{'failed':>8}{'lost':>6}{'kills':>7}{'max ms':>9}")
    for r in rows:
        n = len(r.latencies_ms)
        chaos = "kill 1/s" if r.chaos else "-"
        p50, p99 = median(r.latencies_ms), percentile(r.latencies_ms, 99)
        print(
            f"{r.replicas:>12}  {chaos:<12}{r.in_window / r.seconds:>8.1f}{p50:>9.1f}{p99:>9.1f}"
            f"{n:>7}{r.failed:>8}{r.lost:>6}{r.kills:>7}{max(r.latencies_ms, default=0):>9.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--replicas", default="1,2,4")
    args = parser.parse_args()
    install_sigterm_as_interrupt()
    cleanup = Cleanup()
    rows = []
    try:
        for chaos in (False, True):
            for replicas in (int(x) for x in args.replicas.split(",")):
                label = "with a worker killed every second" if chaos else "no kills"
                print(f"{replicas} per pool, {label} ...", file=sys.stderr, flush=True)
                rows.append(run_one(cleanup, replicas, chaos, args))
    finally:
        cleanup.close()
    report(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
