"""At most ProcessRuntime.STARTING agents of a mode between start and READY at once."""

from __future__ import annotations

import signal
from datetime import datetime

from agentd.daemon.runtime import ProcessRuntime
from tests.conftest import rec


def pool(tmp_path, n: int, start_seconds: float) -> str:
    """A config: pool `w` of `n` exec agents, each ready `start_seconds` after its start."""
    return f"""
[agents.w]
command = {rec(tmp_path / "rec")}
start_seconds = {start_seconds}
replicas = {n}
"""


def _at(record: dict) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def test_a_large_exec_pool_starts_a_few_at_a_time_and_all_come_up(daemon_factory, tmp_path):
    limit = ProcessRuntime.STARTING["exec"]
    n = 3 * limit
    d = daemon_factory(pool(tmp_path, n, start_seconds=0.3)).start()
    names = [f"w@{i}" for i in range(n)]
    spans = []
    for name in names:
        began = _at(d.events("agent.starting", name)[0])
        ready = _at(d.events("agent.ready", name)[0])
        spans.append((began, ready))
    # The most spans open at one moment: each start, against the spans around it.
    most = max(sum(1 for b, r in spans if b <= began < r) for began, _ in spans)
    assert most <= limit
    assert most == limit  # and the room is used: not one at a time
    assert d.ctl("status").returncode == 0
    assert all(d.pid(name) for name in names)


def test_agents_waiting_in_line_at_a_shutdown_end_stopped_without_running(daemon_factory, tmp_path):
    limit = ProcessRuntime.STARTING["exec"]
    n = limit + 2
    d = daemon_factory(pool(tmp_path, n, start_seconds=30)).start(wait_ready=False)
    d.wait_event("agent.starting", f"w@{limit - 1}")  # the room is full for 30 s
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    for name in (f"w@{n - 1}", f"w@{n - 2}"):  # in line: stopped before they ever ran
        exited = d.events("agent.exited", name)
        assert [(e["reason"], e["pid"]) for e in exited] == [("stopped", 0)]
        assert not d.events("agent.starting", name)
