"""An agent written from docs/PROTOCOL.md alone: raw pyzmq and plain MessagePack maps.

The agent half (`RawAgent`) imports nothing from agentd — it is what a Node.js
or Go author would write. The test half drives it with the real broker, the
daemon's link and the Python `Client`, so both implementations must agree.
"""

from __future__ import annotations

import os
import threading
import time

import msgspec
import pytest
import zmq

from agentd.bus import BusError
from agentd.bus.link import AgentEntry
from tests.conftest_bus import Bus, wait_for

# --- the agent: no agentd import below this line until the tests -----------------------


class RawAgent:
    """HELLO, READY, heartbeats every heartbeat/3, replies to requests, acks."""

    def __init__(self, endpoint: str, name: str, incarnation: int, heartbeat: float) -> None:
        self.name = name
        self.incarnation = incarnation
        self.heartbeat = heartbeat
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.received: list[dict] = []
        self.stop = threading.Event()
        self.beats = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.seq = 0

    def send(self, frame: dict) -> None:
        self.sock.send(msgspec.msgpack.encode(frame))

    def new_id(self) -> str:
        self.seq += 1
        return f"{time.time_ns():016x}{os.getpid() & 0xFFFFFF:06x}{self.seq:06x}"

    def hello(self) -> None:
        self.send(
            {
                "kind": "hello",
                "name": self.name,
                "incarnation": self.incarnation,
                "pid": os.getpid(),
                "subscribe": ["raw.*"],
            }
        )
        self.send({"kind": "ready"})

    def run(self) -> None:
        self.hello()
        next_beat = time.monotonic() + self.heartbeat / 3
        while not self.stop.is_set():
            if self.sock.poll(20):
                frame = msgspec.msgpack.decode(self.sock.recv())
                if frame["kind"] == "signal":
                    self.handle(frame)
                elif frame["kind"] == "batch":
                    for sig in frame["signals"]:
                        self.handle(sig)
                elif frame["kind"] == "reconnect":
                    self.hello()
                else:
                    self.received.append(frame)
            if self.beats and time.monotonic() >= next_beat:
                self.send({"kind": "heartbeat"})
                next_beat = time.monotonic() + self.heartbeat / 3
        self.send({"kind": "bye"})
        self.sock.close(linger=500)
        self.ctx.term()

    def handle(self, sig: dict) -> None:
        self.received.append(sig)
        if sig.get("correlation_id"):
            failed = sig["type"] == "raw.fail"
            self.send(
                {
                    "kind": "signal",
                    "id": self.new_id(),
                    "type": sig["type"] + ".reply",
                    "source": self.name,
                    "time": time.time(),
                    "to": sig.get("reply_to") or sig["source"],
                    "correlation_id": sig["correlation_id"],
                    "reply": True,
                    "data": None if failed else {"sum": sum(sig["data"])},
                    "error": "no can do" if failed else None,
                }
            )


# --- the tests -----------------------------------------------------------------------


@pytest.fixture
def bus(tmp_path):
    b = Bus(tmp_path)
    agents: list[RawAgent] = []
    b.raw_agents = agents
    try:
        yield b
    finally:
        for a in agents:
            a.stop.set()
            a.thread.join(5)
        b.close()


def start(bus, name: str = "raw", heartbeat: float = 1.0) -> RawAgent:
    bus.table(AgentEntry(name=name, pool=None, subscribe=[], ack=False, heartbeat=heartbeat))
    agent = RawAgent(bus.endpoint, name, 0, heartbeat)
    bus.raw_agents.append(agent)
    agent.thread.start()
    bus.link.wait_event("connected", name, 0)
    bus.link.wait_event("ready", name, 0)
    return agent


def test_raw_agent_is_a_full_agent(bus) -> None:
    agent = start(bus)
    c = bus.client("py")
    assert c.request("raw", "raw.add", [1, 2, 3]) == {"sum": 6}
    with pytest.raises(BusError, match="no can do"):
        c.request("raw", "raw.fail", [1])
    c.send("raw", "raw.note", "direct")
    assert c.publish("raw.news", "published") == 1  # via its HELLO subscription
    assert c.publish("other.news", "not for it") == 0
    wait_for(lambda: len(agent.received) == 4, 5, "all four signals")
    assert [s["type"] for s in agent.received] == ["raw.add", "raw.fail", "raw.note", "raw.news"]
    assert all(s["source"] == "py" for s in agent.received)
    # Its heartbeats keep it alive well past the heartbeat limit.
    time.sleep(1.5)
    assert not [e for e in bus.link.events if e.kind == "hung"]
    agent.stop.set()
    agent.thread.join(5)
    bus.link.wait_event("disconnected", "raw", 0)


def test_raw_agent_that_stops_beating_is_hung(bus) -> None:
    agent = start(bus, heartbeat=0.5)
    agent.beats = False
    bus.link.wait_event("hung", "raw", 0, timeout=3)


def test_raw_frames_are_answered_with_receipts_and_errors(bus) -> None:
    agent = start(bus)
    me = bus.client("py")
    me.stats()
    sig = {
        "kind": "signal",
        "id": "x1",
        "type": "t",
        "source": "raw",
        "time": 1,  # an int where a float is expected is fine
        "to": "nobody",
        "receipt": True,
    }
    agent.send(sig)
    agent.send({**sig, "id": "x2", "receipt": False})
    agent.send({**sig, "id": "x3", "to": "py"})
    wait_for(lambda: len(agent.received) >= 3, 5, "the answers")
    receipt, error, ok = agent.received[:3]
    assert receipt == {
        "kind": "receipt",
        "id": "x1",
        "ok": False,
        "error": "unknown recipient 'nobody'",
    }
    assert error["kind"] == "error" and error["id"] == "x2" and "unknown" in error["reason"]
    assert ok == {"kind": "receipt", "id": "x3", "ok": True, "delivered": 1}
    got = me.receive(timeout=5)
    assert got is not None and got.id == "x3" and got.time == 1.0


def test_reserved_and_mismatched_names_are_refused(bus) -> None:
    for routing_id, name in (("bus", "bus"), ("ctl", "ctl"), ("me", "someone")):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, routing_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(bus.endpoint)
        try:
            sock.send(msgspec.msgpack.encode({"kind": "hello", "name": name}))
            assert sock.poll(5000)
            error = msgspec.msgpack.decode(sock.recv())
            assert error["kind"] == "error" and "reserved" in error["reason"]
        finally:
            sock.close(0)
            ctx.term()
    assert not [e for e in bus.link.events if e.kind == "connected"]
