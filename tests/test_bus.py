"""The bus through a real daemon: broker process, SDK agents, Client, real kills."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from agentd.bus import BusError, BusTimeout, Client
from tests.conftest import alive, wait_for

ROOT = Path(__file__).resolve().parent.parent


def agent(name: str, cls: str = "Recorder", **extra: str) -> str:
    lines = [f"[agents.{name}]", f'module = "tests.bus_agents:{cls}"', f'cwd = "{ROOT}"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def records(d, name: str) -> list[dict]:
    path = d.dir / f"{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def got(d, name: str) -> list[dict]:
    return [r for r in records(d, name) if "type" in r]


@pytest.fixture
def hub(daemon_factory, monkeypatch):
    """Start a daemon with the given agents; REC_DIR tells agents where to record."""

    def make(config: str):
        d = daemon_factory(config)
        monkeypatch.setenv("REC_DIR", str(d.dir))
        d.start()
        d.client = Client(f"ipc://{d.runtime_dir}/bus.sock", name="tester")
        made.append(d.client)
        return d

    made: list[Client] = []
    yield make
    for client in made:
        client.close()


def test_direct_send_and_request_reply(hub) -> None:
    d = hub(agent("a"))
    d.client.send("a", "note.one", {"n": 1})
    assert d.client.request("a", "ask.it", {"q": 2}) == {"got": {"q": 2}, "by": "a"}
    assert [r["type"] for r in got(d, "a")] == ["note.one", "ask.it"]
    assert got(d, "a")[0]["source"] == "tester"


def test_unknown_recipient_is_an_error_to_the_sender(hub) -> None:
    d = hub(agent("a"))
    with pytest.raises(BusError, match="unknown recipient 'nobody'"):
        d.client.send("nobody", "x", 1)
    with pytest.raises(BusError, match="unknown recipient"):
        d.client.request("nobody", "x", 1, timeout=2)


def test_request_timeout_raises(hub) -> None:
    d = hub(agent("a"))
    t0 = time.monotonic()
    with pytest.raises(BusTimeout):
        d.client.request("a", "work.slow", 1, timeout=0.5)
    assert 0.45 <= time.monotonic() - t0 < 3


def test_patterns_through_the_broker(hub) -> None:
    d = hub(agent("a"))
    endpoint = f"ipc://{d.runtime_dir}/bus.sock"
    subs = {
        "one": "doc.*",
        "many": "doc.**",
        "exact": "doc.created",
        "mid": "*.created",
        "none": "img.*",
    }
    clients = {}
    try:
        from agentd.bus.envelope import Subscribe, encoder

        for name, pattern in subs.items():
            c = Client(endpoint, name=f"sub-{name}")
            c._sock.send(encoder().encode(Subscribe([pattern])))
            clients[name] = c
        wait_for(lambda: d.client.publish("doc.created", 0) >= 4, 5, "subscriptions")
        for c in clients.values():
            while c.receive(timeout=0.2):
                pass
        for type_ in ("doc.created", "doc.a.b", "doc", "img.new", "x.created"):
            d.client.publish(type_, type_)
        seen = {}
        for name, c in clients.items():
            seen[name] = set()
            while (s := c.receive(timeout=0.3)) is not None:
                seen[name].add(s.type)
        assert seen["one"] == {"doc.created"}
        assert seen["many"] == {"doc.created", "doc.a.b", "doc"}
        assert seen["exact"] == {"doc.created"}
        assert seen["mid"] == {"doc.created", "x.created"}
        assert seen["none"] == {"img.new"}
    finally:
        for c in clients.values():
            c.close()


@pytest.mark.parametrize("start", ["fork", "exec"])  # fork is the default
def test_held_while_down_then_delivered_in_order(hub, start: str) -> None:
    d = hub(agent("rx", restart_delay="1.0", start=f'"{start}"'))
    d.client.request("rx", "warm", 0)
    os.kill(d.pid("rx"), signal.SIGKILL)
    d.wait_event("agent.exited", "rx")
    for i in range(50):
        d.client.send("rx", "held", i)  # receipts: accepted (held) every time
    d.wait_event("agent.ready", "rx", count=2)
    wait_for(lambda: len([r for r in got(d, "rx") if r["type"] == "held"]) == 50, 10, "50")
    held = [r for r in got(d, "rx") if r["type"] == "held"]
    assert [r["data"] for r in held] == list(range(50))
    assert all(r["incarnation"] == 1 for r in held)


@pytest.mark.parametrize("start", ["fork", "exec"])  # fork is the default
def test_ack_redelivers_to_next_incarnation(hub, start: str) -> None:
    d = hub(agent("worker", ack="true", start=f'"{start}"'))
    d.client.send("worker", "work.slow", "job-1")  # the handler sleeps 60 s
    wait_for(lambda: got(d, "worker"), 5, "the signal to be in the handler")
    os.kill(d.pid("worker"), signal.SIGKILL)
    d.wait_event("agent.ready", "worker", count=2)
    wait_for(lambda: len(got(d, "worker")) == 2, 10, "redelivery")
    first, again = got(d, "worker")
    assert first["data"] == again["data"] == "job-1"
    assert not first["redelivered"] and again["redelivered"]
    assert again["incarnation"] == 1


def test_acked_signals_are_not_redelivered(hub) -> None:
    d = hub(agent("worker", ack="true"))
    d.client.request("worker", "quick", 1)
    os.kill(d.pid("worker"), signal.SIGKILL)
    d.wait_event("agent.ready", "worker", count=2)
    d.client.request("worker", "quick", 2)
    assert [r["data"] for r in got(d, "worker")] == [1, 2]


@pytest.mark.parametrize("start", ["fork", "exec"])  # fork is the default
def test_hung_agent_is_restarted_with_reason_hung(hub, start: str) -> None:
    d = hub(agent("stuck", "Blocker", heartbeat="1.0", start=f'"{start}"'))
    assert d.client.request("stuck", "ping", None) == "pong"
    d.client.send("stuck", "block", None)
    exited = d.wait_event("agent.exited", "stuck", timeout=10)
    assert exited["reason"] == "hung"
    assert d.events("agent.hung", "stuck")
    d.wait_event("agent.ready", "stuck", count=2)
    assert d.client.request("stuck", "ping", None) == "pong"
    status = {a["name"]: a for a in d.ctl_json("status")["agents"]}
    assert status["stuck"]["last_exit"]["reason"] == "hung"


@pytest.mark.parametrize("start", ["fork", "exec"])  # fork is the default
def test_pool_round_robin(hub, start: str) -> None:
    d = hub(agent("w", replicas="3", start=f'"{start}"'))
    by = [d.client.request("w", "job", i)["by"] for i in range(9)]
    assert sorted(set(by)) == ["w@0", "w@1", "w@2"]
    assert all(by.count(m) == 3 for m in set(by))


def test_sdk_ctx_request_and_emit(hub) -> None:
    d = hub(agent("relay", "Relay") + agent("echo"))
    answer = d.client.request("relay", "relay.request", {"to": "echo", "value": 7})
    assert answer == {"got": 7, "by": "echo"}
    wait_for(lambda: any(r["type"] == "relay.done" for r in got(d, "echo")), 5, "emit")


def test_killed_broker_comes_back_and_agents_reconnect(hub) -> None:
    d = hub(agent("a"))
    bus = d.events("agent.ready", "bus")[-1]["pid"]
    os.kill(bus, signal.SIGKILL)
    d.wait_event("agent.ready", "bus", count=2)
    assert not alive(bus)
    # The agent reconnects by itself (ZeroMQ) and is known again once it speaks.
    wait_for(lambda: _try_request(d), 15, "the agent to answer through the new broker")


def _try_request(d) -> bool:
    try:
        with Client(f"ipc://{d.runtime_dir}/bus.sock", name="again") as c:
            return c.request("a", "hello", 1, timeout=0.5)["by"] == "a"
    except BusError:
        return False


@pytest.mark.parametrize("start", ["fork", "exec"])  # fork is the default
def test_graceful_sigterm_finishes_handler(hub, start: str) -> None:
    d = hub(agent("a", start=f'"{start}"'))
    assert d.stop() == 0
    exited = d.events("agent.exited", "a")[0]
    assert exited["code"] == 0 and exited["reason"] == "stopped"


def test_error_reply_is_a_remote_error(hub) -> None:
    """A handler's error is told apart from the broker refusing: RemoteError vs BusError."""
    from agentd.bus import RemoteError

    d = hub(agent("w", "Worker"))
    with pytest.raises(RemoteError, match="w: ValueError: cannot do x"):
        d.client.request("w", "work.fail", "x")
    with pytest.raises(BusError) as refused:
        d.client.request("nobody", "work.fail", "x")
    assert not isinstance(refused.value, RemoteError)
