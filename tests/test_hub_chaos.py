"""200 jobs through the hub while a chaos loop kill -9s a random worker every 200 ms.

The hub is etc/agentd.toml's, agents and settings alike, with one change:
the `workers` supervisor's intensity is raised, because five kills a
second is far past what a production tree should tolerate before giving
up (which is exactly what the bundled 10-in-10 s would do). Every job
carries a small `delay` so that tasks are in the workers' hands when the
kills land. What must hold: every job completes with the right result, the
audit file has exactly one `job.completed` per job and no `job.failed`,
and the broker really did move tasks (redeliveries > 0) — the proof that
the chaos hit work in flight rather than idle workers.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agentd.bus import Client
from tests.conftest import alive, wait_for
from tests.test_hub import audit_lines, free_port, http, hub_config, start_hub

WORKERS = ["text@0", "text@1", "math@0", "math@1"]
JOBS = 200


def chaos_config(port: int) -> str:
    text, n = re.subn(
        r"(\[supervisors\.workers\][^\[]*?)max_restarts = 10\nmax_seconds = 10",
        r"\1max_restarts = 10000\nmax_seconds = 1",
        hub_config(port),
    )
    assert n == 1, "etc/agentd.toml: the workers supervisor's intensity moved"
    return text


def make_job(i: int, rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    """Job i (a mix of every type, each task 50-600 ms of work) and its expected result."""
    delay = rng.choice([0.05, 0.2, 0.4, 0.6])
    words = " ".join(f"w{k}" for k in range(i % 7 + 1))
    numbers = [i, i % 5, 0.5]
    kind = ["text.upper", "text.wordcount", "math.sum", "report"][i % 4]
    payload: dict[str, Any] = {"text": words, "numbers": numbers, "delay": delay}
    expected = {
        "text.upper": {"text": words.upper()},
        "text.wordcount": {"words": i % 7 + 1},
        "math.sum": {"sum": sum(numbers)},
        "report": {"words": i % 7 + 1, "sum": sum(numbers)},
    }[kind]
    return {"type": kind, "payload": payload}, expected


class Chaos(threading.Thread):
    """kill -9 a random live worker every `period` seconds until stopped."""

    def __init__(self, d: Any, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.d = d
        self.period = period
        self.stop = threading.Event()
        self.kills: list[tuple[str, int]] = []
        self.rng = random.Random(5)

    def run(self) -> None:
        while not self.stop.wait(self.period):
            name = self.rng.choice(WORKERS)
            ready = self.d.events("agent.ready", name)
            pid = ready[-1]["pid"] if ready else None
            if pid is not None and alive(pid):
                os.kill(pid, signal.SIGKILL)
                self.kills.append((name, pid))


def test_200_jobs_complete_exactly_once_under_chaos(daemon_factory) -> None:
    port = free_port()
    d = daemon_factory(chaos_config(port))
    base = start_hub(d, port)
    rng = random.Random(7)
    jobs = [make_job(i, rng) for i in range(JOBS)]
    chaos = Chaos(d)
    chaos.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            posted = list(
                pool.map(
                    lambda job: http("POST", f"{base}/jobs", json.dumps(job[0]).encode()), jobs
                )
            )
        assert all(status == 202 for status, _ in posted), posted
        ids = [answer["id"] for _, answer in posted]

        def pending() -> list[str]:
            return [i for i in ids if http("GET", f"{base}/jobs/{i}")[1]["status"] == "pending"]

        wait_for(lambda: not pending(), 90, "every job to finish")
    finally:
        chaos.stop.set()
        chaos.join(5)

    results = {i: http("GET", f"{base}/jobs/{i}")[1] for i in ids}
    for i, (_, expected) in zip(ids, jobs, strict=True):
        assert results[i]["status"] == "completed", results[i]
        assert results[i]["result"] == expected, (results[i], expected)
    assert len(chaos.kills) >= 3, chaos.kills

    # The audit trail, once the last job.* signal has reached it: each job exactly once.
    def outcomes() -> list[dict[str, Any]]:
        return [r for r in audit_lines(d) if r["type"] in ("job.completed", "job.failed")]

    wait_for(lambda: len(outcomes()) >= JOBS, 10, "the audit trail")
    completed = [r["data"]["id"] for r in outcomes() if r["type"] == "job.completed"]
    assert sorted(completed) == sorted(ids)  # none lost, none twice
    assert not [r for r in outcomes() if r["type"] == "job.failed"]
    with Client(f"ipc://{d.runtime_dir}/bus.sock", name="chaos-check") as c:
        assert c.stats()["redelivered"] > 0
    exits = [e for e in d.events("agent.exited") if e["agent"] in WORKERS]
    assert len(exits) >= len(chaos.kills) - 1  # (the last kill may not be reaped yet)
    assert not d.events("supervisor.gave_up")
