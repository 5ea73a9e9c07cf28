"""Topology 3: a Node.js agent, written from docs/PROTOCOL.md without the SDK, in the hub.

The `text` worker pool of etc/examples/mixed.toml is agents/examples/node/
text_worker.js. These tests run it under a real daemon and broker, drive it
with the Python `Client`, kill it, stop it, and finally run the whole mixed
hub over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from agentd.bus import BusError, Client
from agentd.bus.envelope import encoder
from agentd.bus.envelope import signal as make_signal
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "agents" / "examples" / "node"
MIXED = ROOT / "etc" / "examples" / "mixed.toml"


# --- Node.js and the npm packages ----------------------------------------------------


# --- the text pool, as configured in mixed.toml ---------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings and lists of strings


def text_pool(**overrides: Any) -> str:
    """mixed.toml's [agents.text], run from the repo root, with `overrides`."""
    cfg = dict(tomllib.loads(MIXED.read_text())["agents"]["text"])
    cfg["cwd"] = str(ROOT)
    cfg.update(overrides)
    return "[agents.text]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.items())


def task(kind: str, payload: Any) -> dict[str, Any]:
    """A task as the orchestrator sends it."""
    return {"job": "j1", "key": "result", "pool": "text", "type": kind, "payload": payload}


def run(client: Client, kind: str, payload: Any) -> Any:
    """A task request to the pool `text`, the way the orchestrator makes it; the result."""
    return client.request("text", kind, task(kind, payload))


def ask(client: Client, kind: str, payload: Any, timeout: float = 5.0) -> Any:
    """A request to the pool `text`; the whole reply signal (to see who answered)."""
    correlation = uuid.uuid4().hex
    sig = make_signal(kind, task(kind, payload), client.name, to="text", correlation_id=correlation)
    client._sock.send(encoder().encode(sig))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = client.receive(timeout=max(0.0, deadline - time.monotonic()))
        if got is not None and got.reply and got.correlation_id == sig.correlation_id:
            return got
    raise AssertionError(f"no reply to {kind} within {timeout}s")


@pytest.fixture
def pool(daemon_factory, node_worker):
    """A daemon running the Node.js text pool (heartbeat 1 s), and a Client on its bus."""
    clients: list[Client] = []

    def make(**overrides: Any):
        d = daemon_factory(text_pool(heartbeat=1.0, **overrides))
        d.start()
        d.client = Client(f"ipc://{d.runtime_dir}/bus.sock", name="tester")
        clients.append(d.client)
        return d

    yield make
    for c in clients:
        c.close()


MEMBERS = ["text@0", "text@1"]


def test_node_pool_is_ready_and_answers_tasks(pool) -> None:
    t0 = time.monotonic()
    d = pool()
    # Ready by its READY on the bus: start_seconds (30 s) has not passed.
    for m in MEMBERS:
        d.wait_event("agent.ready", m)
    assert time.monotonic() - t0 < 20
    c = d.client
    assert run(c, "task.text.upper", {"text": "héllo, wörld"}) == {"text": "HÉLLO, WÖRLD"}
    assert run(c, "task.text.wordcount", {"text": "  the quick\tbrown\n fox "}) == {"words": 4}
    assert run(c, "task.text.wordcount", {"text": ""}) == {"words": 0}
    # Bad payloads and unknown task types: error replies, and the workers live on.
    with pytest.raises(BusError, match=r"text: JobError: payload.text must be a string"):
        run(c, "task.text.upper", {"text": 42})
    with pytest.raises(BusError, match=r"payload must be an object"):
        run(c, "task.text.upper", "just a string")
    with pytest.raises(BusError, match=r"unknown task type"):
        run(c, "task.text.reverse", {"text": "x"})
    # The pool spreads requests round robin over both members.
    by = [ask(c, "task.text.upper", {"text": f"n{i}"}) for i in range(6)]
    assert sorted({r.source for r in by}) == MEMBERS
    assert all(r.data["text"] == f"N{i}" and r.error is None for i, r in enumerate(by))
    assert all(r.type == "task.text.upper.reply" for r in by)
    # Heartbeats every heartbeat/3 keep them alive past 3x the heartbeat (1 s) of silence
    # from the tester: waiting out a span to show that something does *not* happen.
    time.sleep(max(0.0, 3.5 - (time.monotonic() - t0)))
    assert run(c, "task.text.upper", {"text": "still"}) == {"text": "STILL"}
    assert not d.events("agent.hung")
    assert not d.events("agent.exited")
    status = {a["name"]: a for a in d.ctl_json("status")["agents"]}
    assert all(status[m]["restarts"] == 0 for m in MEMBERS)


def test_node_worker_killed_is_restarted_and_answers_again(pool) -> None:
    d = pool()
    for m in MEMBERS:
        d.wait_event("agent.ready", m)
    # Both members handle (and acknowledge) tasks before the kill.
    before = {ask(d.client, "task.text.upper", {"text": "a"}).source for _ in range(4)}
    assert before == set(MEMBERS)
    victim = d.pid("text@0")
    os.kill(victim, signal.SIGKILL)
    exited = d.wait_event("agent.exited", "text@0")
    assert exited["reason"] == "signal" and exited["pid"] == victim
    again = d.wait_event("agent.ready", "text@0", count=2)
    assert again["incarnation"] == 1 and again["pid"] != victim
    # It acknowledged what it handled, so its new incarnation gets nothing again.
    assert d.client.stats()["redelivered"] == 0
    # The new incarnation takes its turn in the pool again.
    by = [ask(d.client, "task.text.wordcount", {"text": "a b c"}) for _ in range(6)]
    assert all(r.data == {"words": 3} for r in by)
    assert sorted({r.source for r in by}) == MEMBERS
    assert len(d.events("agent.ready", "text@1")) == 1  # one_for_one: text@1 untouched


def test_node_worker_stops_gracefully_with_exit_0(pool) -> None:
    d = pool()
    for m in MEMBERS:
        d.wait_event("agent.ready", m)
    assert d.ctl("stop", "text@1").returncode == 0
    stopped = d.wait_event("agent.exited", "text@1")
    assert stopped["code"] == 0 and stopped["signal"] is None and stopped["reason"] == "stopped"
    assert any("stopping" in line for line in stopped["stderr_tail"])
    # The pool carries on with the member that is left.
    by = [ask(d.client, "task.text.upper", {"text": "x"}) for _ in range(3)]
    assert {r.source for r in by} == {"text@0"}
    # Stopping the daemon stops text@0 the same way, and the daemon exits 0.
    assert d.stop() == 0
    last = d.wait_event("agent.exited", "text@0")
    assert last["code"] == 0 and last["reason"] == "stopped"


def test_node_workers_rejoin_a_restarted_broker(pool) -> None:
    d = pool()
    for m in MEMBERS:
        d.wait_event("agent.ready", m)
    broker = d.events("agent.ready", "bus")[-1]["pid"]
    os.kill(broker, signal.SIGKILL)
    d.wait_event("agent.ready", "bus", count=2)
    # The new broker does not know them: their next heartbeat gets RECONNECT, and
    # they say HELLO and READY again, so the pool has live members once more.
    wait_for(lambda: _pool_answers(d), 15, "both members to answer through the new broker")
    assert not d.events("agent.exited", "text@0") and not d.events("agent.exited", "text@1")


def _pool_answers(d) -> bool:
    with Client(f"ipc://{d.runtime_dir}/bus.sock", name="again") as c:
        try:
            by = {ask(c, "task.text.upper", {"text": "x"}, timeout=0.5).source for _ in range(4)}
        except (AssertionError, BusError):
            return False
    return by == set(MEMBERS)


# --- the whole mixed hub, over HTTP ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def mixed_copy(port: int) -> str:
    """mixed.toml, with agents run from the repo root and the ingress on `port`."""
    text = MIXED.read_text().replace('cwd = "../.."', f"cwd = {json.dumps(str(ROOT))}")
    text, n = re.subn(r'(AGENTD_HTTP_PORT\s*=\s*)"\d+"', rf'\g<1>"{port}"', text)
    assert n == 1, "mixed.toml: the ingress port setting moved"
    return text


def test_mixed_hub_completes_jobs_over_http(daemon_factory, node_worker) -> None:
    port = _free_port()
    d = daemon_factory(mixed_copy(port))
    d.start()
    for m in [*MEMBERS, "math@0", "math@1", "orchestrator", "ingress", "audit"]:
        d.wait_event("agent.ready", m, timeout=30)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _http("GET", f"{base}/healthz")[0] == 200, 10, "ingress /healthz")

    jobs = {
        "text.upper": ({"text": "mixed stacks"}, {"text": "MIXED STACKS"}),
        "report": ({"text": "one two three", "numbers": [1, 2, 3.5]}, {"words": 3, "sum": 6.5}),
    }
    ids = {}
    for kind, (payload, _) in jobs.items():
        status, body = _http("POST", f"{base}/jobs", {"type": kind, "payload": payload})
        assert status == 202, body
        ids[kind] = body["id"]

    def finished(job_id: str) -> Any:
        status, body = _http("GET", f"{base}/jobs/{job_id}")
        assert status == 200, body
        return body if body["status"] != "pending" else None

    for kind, (_, expected) in jobs.items():
        body = wait_for(lambda k=kind: finished(ids[k]), 20, f"job {kind}")
        assert body["status"] == "completed", body
        assert body["result"] == expected
    # The `text` pool the orchestrator sent those tasks to is Node.js, and nothing else.
    assert {psutil.Process(d.pid(m)).name() for m in MEMBERS} == {"node"}
    assert not d.events("agent.exited")
    # The audit agent (Python, pub/sub) recorded each job's completion once.
    audit = d.state_dir / "hub" / "audit.jsonl"  # durable, next to the hub's stores

    def completions() -> list[dict[str, Any]]:
        if not audit.exists():
            return []
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        return [r for r in lines if r["type"] == "job.completed"]

    wait_for(lambda: len(completions()) >= 2, 10, "job.completed in the audit file")
    for job_id in ids.values():
        assert sum(job_id in json.dumps(r["data"]) for r in completions()) == 1
    # A Node.js worker killed with kill -9 is restarted, and text jobs still complete.
    os.kill(d.pid("text@0"), signal.SIGKILL)
    status, body = _http(
        "POST", f"{base}/jobs", {"type": "text.wordcount", "payload": {"text": "a b"}}
    )
    assert status == 202, body
    done = wait_for(lambda: finished(body["id"]), 30, "the job after the kill")
    assert done["status"] == "completed" and done["result"] == {"words": 2}
    d.wait_event("agent.ready", "text@0", count=2)
