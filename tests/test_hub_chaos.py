"""The hub under chaos: every job whose POST was answered completes exactly once.

Three kinds of chaos, each on etc/agentd.toml's hub (its state_dir in the
test's temp dir):
- a worker kill -9'd every 200 ms while 200 jobs run: the `workers`
  supervisor's intensity is raised for it, because five kills a second is
  far past what a production tree should tolerate before giving up (which
  is exactly what the bundled 10-in-10 s would do). The broker must really
  have moved tasks (redeliveries > 0): the proof that the chaos hit work in
  flight rather than idle workers;
- the broker (the `bus` row of `ctl status --json`) kill -9'd three times
  under a stream of POSTs;
- the daemon kill -9'd (its agents and broker die with it) and a new daemon
  started on the same config and state_dir, under a stream of POSTs.
Every job carries a small `delay` so that tasks are in the workers' hands
when the kills land. What must hold: every job answered 202 completes with
the right result, the audit trail has exactly one `job.completed` for it and
no `job.failed`, and no job — answered or not (a POST cut off by a kill may
still have stored its job) — is in the trail twice.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Any

import pytest

from agentd.bus import Client
from tests.conftest import DaemonProc, alive, wait_for
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


# --- broker and daemon kills -------------------------------------------------------------


class Stream:
    """POSTs jobs from `threads` threads, until stopped or `limit` were answered 202.

    A POST that got no answer (the ingress was down or died with it) or a
    refusal is not a promise: it is counted and the thread goes on. The
    POST's timeout is long because a broker that is being restarted makes
    the ingress ask for its receipt again (5 s each).
    """

    def __init__(self, base: str, threads: int = 8, limit: int = 20_000) -> None:
        self.base = base
        self.limit = limit
        self.answered: dict[str, dict[str, Any]] = {}  # job id -> its expected result
        self.cut = 0  # POSTs without an answer
        self.refused: list[tuple[int, Any]] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self._post, args=(k, threads), daemon=True)
            for k in range(threads)
        ]

    def __enter__(self) -> Stream:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(40)

    def count(self) -> int:
        with self.lock:
            return len(self.answered)

    def wait_answered(self, n: int, timeout: float = 60) -> None:
        # Past `limit` the threads stop posting: such a wait could never end.
        assert n <= self.limit, f"waiting for {n} answers from a stream limited to {self.limit}"
        wait_for(lambda: self.count() >= n, timeout, f"{n} jobs answered 202")

    def _post(self, k: int, step: int) -> None:
        rng = random.Random(k)
        i = k
        while not self.stopped.is_set() and self.count() < self.limit:
            job, expected = make_job(i, rng)
            i += step
            body = json.dumps(job).encode()
            req = urllib.request.Request(f"{self.base}/jobs", data=body, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
                with self.lock:
                    self.answered[answer["id"]] = expected
                continue
            except urllib.error.HTTPError as exc:
                with self.lock:
                    self.refused.append((exc.code, exc.read()))
            except (OSError, HTTPException):
                with self.lock:
                    self.cut += 1
            self.stopped.wait(0.05)  # pace the retries while the ingress is away


def bus_pid(d: DaemonProc) -> int | None:
    """The broker's pid, from `ctl status --json`'s `bus` row (None if it is not running)."""
    for row in d.ctl_json("status")["agents"]:
        if row["name"] == "bus" and row["state"] == "running":
            return row["pid"]
    return None


def wait_all_done(base: str, ids: list[str], timeout: float = 120) -> dict[str, Any]:
    """Every job's final record, once none is pending."""
    results: dict[str, Any] = {}

    def done() -> bool:
        for i in ids:
            if i not in results:
                status, body = http("GET", f"{base}/jobs/{i}")
                assert status == 200, (i, body)
                if body["status"] == "pending":
                    return False
                results[i] = body
        return True

    wait_for(done, timeout, f"{len(ids)} answered jobs to finish")
    return results


def assert_exactly_once(d: DaemonProc, base: str, answered: dict[str, Any]) -> None:
    """Each answered job completed, right; the trail has it once; nothing is in it twice."""
    results = wait_all_done(base, list(answered))
    wrong = {i: r for i, r in results.items() if r != _completed(i, answered[i])}
    assert not wrong, wrong

    def outcomes() -> list[dict[str, Any]]:
        return [r for r in audit_lines(d) if r["type"] in ("job.completed", "job.failed")]

    def trail_has_all() -> bool:
        done = {r["data"]["id"] for r in outcomes() if r["type"] == "job.completed"}
        return set(answered) <= done

    wait_for(trail_has_all, 20, "every answered job in the audit trail")
    twice = [i for i, n in Counter(r["data"]["id"] for r in outcomes()).items() if n > 1]
    assert not twice, f"in the audit trail more than once: {twice}"
    assert not [r for r in outcomes() if r["type"] == "job.failed"]


def _completed(job_id: str, expected: dict[str, Any]) -> dict[str, Any]:
    return {"id": job_id, "status": "completed", "result": expected, "error": None}


@pytest.mark.slow
def test_answered_jobs_complete_exactly_once_across_broker_kills(daemon_factory) -> None:
    port = free_port()
    d = daemon_factory(hub_config(port))
    base = start_hub(d, port)
    kills = []
    with Stream(base) as stream:
        for _ in range(3):
            stream.wait_answered(stream.count() + 100)  # each kill lands in traffic
            pid = bus_pid(d)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)
            wait_for(lambda p=pid: bus_pid(d) not in (None, p), 15, "a new broker")
        stream.wait_answered(stream.count() + 100)
    assert_exactly_once(d, base, stream.answered)
    assert len(stream.answered) >= 400, (len(stream.answered), stream.cut, stream.refused)
    bus = next(r for r in d.ctl_json("status")["agents"] if r["name"] == "bus")
    assert bus["restarts"] >= len(kills)
    assert not d.events("supervisor.gave_up")


@pytest.mark.slow
def test_answered_jobs_complete_exactly_once_across_a_daemon_kill(daemon_factory) -> None:
    port = free_port()
    config = hub_config(port)
    first = daemon_factory(config)
    base = start_hub(first, port)
    with Stream(base) as stream:
        stream.wait_answered(150)
        tree = {*first.seen_pids, bus_pid(first)}
        assert first.popen is not None
        os.kill(first.popen.pid, signal.SIGKILL)
        first.popen.wait(10)
        wait_for(lambda: not any(alive(p) for p in tree if p), 15, "the tree to die with it")
        before = stream.count()
        second = daemon_factory(config)  # the same temp dir: same runtime_dir and state_dir
        second.start()
        stream.wait_answered(before + 150)
    assert_exactly_once(second, base, stream.answered)
    assert stream.cut > 0  # some POSTs really did hit the dead daemon
    assert not second.events("supervisor.gave_up")
