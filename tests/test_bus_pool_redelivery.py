"""Ack-based delivery in a pool: a member's death moves its pool work to another member.

A real broker, the daemon's link and real SDK agents (tests/bus_agents.py),
as in test_bus_broker.py. `Recorder` sleeps 60 s on `work.slow` and never
acks it, so a signal in that handler is exactly "a task in flight".
"""

from __future__ import annotations

import os
import threading
from typing import Any

import zmq

from agentd.bus.envelope import Ack, Hello, Ready, Signal, Stats, encoder, peer_decoder
from agentd.bus.link import AgentEntry
from tests.conftest_bus import Bus, wait_for

MEMBERS = ["w@0", "w@1"]


def pool(bus: Bus) -> dict[str, object]:
    """Table with an ack = true pool `w` of two members, both started and ready."""
    bus.table(*(AgentEntry(name=m, pool="w", ack=True) for m in MEMBERS))
    return {m: bus.agent(m, ack=True) for m in MEMBERS}


def holder(bus: Bus, data: str) -> str:
    """The member whose handler has the signal carrying `data`."""
    found = [m for m in MEMBERS if any(r["data"] == data for r in bus.got(m))]
    assert len(found) == 1, f"{data} went to {found}"
    return found[0]


def test_pool_signal_moves_to_another_member_when_its_member_dies(bus) -> None:
    procs = pool(bus)
    tx = bus.client("tx")
    tx.send("w", "work.slow", "task-1")
    wait_for(lambda: _anywhere(bus, "task-1"), 5, "the signal in a handler")
    first = holder(bus, "task-1")
    other = next(m for m in MEMBERS if m != first)
    bus.kill(procs[first], first, 0)
    wait_for(lambda: any(r["data"] == "task-1" for r in bus.got(other)), 5, "the redelivery")
    [again] = [r for r in bus.got(other) if r["data"] == "task-1"]
    assert again["redelivered"] and again["incarnation"] == 0  # the other member, not a restart
    assert tx.stats()["redelivered"] == 1


def test_member_addressed_signal_waits_for_that_member(bus) -> None:
    procs = pool(bus)
    tx = bus.client("tx")
    tx.send("w@1", "work.slow", "mine")
    wait_for(lambda: bus.got("w@1"), 5, "the signal in w@1's handler")
    bus.kill(procs["w@1"], "w@1", 0)
    bus.agent("w@1", incarnation=1, ack=True)
    wait_for(lambda: len(bus.got("w@1")) == 2, 5, "the redelivery to w@1's next incarnation")
    assert bus.got("w@1")[1]["redelivered"] and bus.got("w@1")[1]["incarnation"] == 1
    assert tx.request("w@0", "ping", 0)["by"] == "w@0"  # w@0 was live all along ...
    assert [r["data"] for r in bus.got("w@0")] == [0]  # ... and never got it


def test_pool_signal_is_held_for_the_pool_while_no_member_is_live(bus) -> None:
    procs = pool(bus)
    tx = bus.client("tx")
    tx.send("w", "work.slow", "a")
    tx.send("w", "work.slow", "b")  # round robin: one on each member
    wait_for(lambda: _anywhere(bus, "a") and _anywhere(bus, "b"), 5, "both in handlers")
    assert {holder(bus, "a"), holder(bus, "b")} == set(MEMBERS)
    for m in MEMBERS:
        bus.kill(procs[m], m, 0)
    # Neither was lost, neither waits for its dead member: both are held for the pool.
    wait_for(lambda: tx.stats()["pending_now"] == 2, 5, "both kept for the pool")
    bus.agent("w@0", incarnation=1, ack=True)  # the first member back takes both
    wait_for(lambda: _count(bus, "w@0", "a", "b") >= 2, 5, "both redelivered to w@0")
    late = [r for r in bus.got("w@0") if r["incarnation"] == 1]
    assert sorted(r["data"] for r in late) == ["a", "b"]
    assert all(r["redelivered"] for r in late)


def test_replies_to_an_ack_agent_are_not_kept_unacked(bus) -> None:
    """An ack = true agent that makes requests: the replies must not fill its unacked queue."""
    bus.table(AgentEntry(name="asker", ack=True), AgentEntry(name="echo"))
    bus.agent("echo", "Worker")
    proc = bus.agent("asker", "Relay", ack=True)
    tx = bus.client("tx")
    for i in range(3):
        assert tx.request("asker", "relay.request", {"to": "echo", "value": i}) == i
    bus.kill(proc, "asker", 0)
    bus.agent("asker", "Relay", incarnation=1, ack=True)
    assert tx.request("asker", "relay.request", {"to": "echo", "value": 9}) == 9
    # Nothing (no reply, no handled request) was redelivered to the new incarnation.
    assert tx.stats()["redelivered"] == 0


def test_a_request_acked_but_not_answered_goes_to_another_member(bus) -> None:
    """An agent that acks a request and dies before its reply left: the reply settles it.

    The first member is a raw DEALER, so the test controls exactly what it
    sends: the ack, then nothing. The request must not be lost with it.
    """
    bus.table(*(AgentEntry(name=m, pool="w", ack=True) for m in MEMBERS))
    enc, dec = encoder(), peer_decoder()
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.IDENTITY, b"w@0")
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(bus.endpoint)
    try:
        raw.send(enc.encode(Hello("w@0", 0, os.getpid())))
        raw.send(enc.encode(Ready()))
        bus.link.wait_event("ready", "w@0", 0)
        answer: dict[str, Any] = {}
        asker = threading.Thread(
            target=lambda: answer.update(r=bus.client("tx").request("w", "job", 7, timeout=15))
        )
        asker.start()
        assert raw.poll(5000), "the request never reached w@0"
        request = dec.decode(raw.recv())
        assert isinstance(request, Signal) and request.correlation_id is not None
        raw.send(enc.encode(Ack([request.id])))  # "done" ... and then it dies, no reply
        raw.send(enc.encode(Stats()))
        assert raw.poll(5000) and isinstance(dec.decode(raw.recv()), Stats)  # ack is in
    finally:
        raw.close()
        ctx.term()
    bus.link.agent_down("w@0", 0)
    bus.agent("w@1", ack=True)  # the pool's only live member now
    asker.join(20)
    assert answer["r"] == {"got": 7, "by": "w@1"}
    assert bus.got("w@1")[0]["redelivered"]


def _anywhere(bus: Bus, data: str) -> bool:
    return any(r["data"] == data for m in MEMBERS for r in bus.got(m))


def _count(bus: Bus, member: str, *data: str) -> int:
    return sum(1 for r in bus.got(member) if r["data"] in data and r["incarnation"] == 1)
