"""The broker as a real process: routing, hold queues, acks, pools, hung agents.

Agents are real SDK processes (tests/bus_agents.py); the agent table comes in
through the daemon's own `BrokerLink`. No daemon: these tests are the bus alone.
"""

from __future__ import annotations

import time

import pytest

from agentd.bus import BusError, BusTimeout
from agentd.bus.link import AgentEntry
from tests.conftest_bus import Bus, wait_for


def entry(name: str, **kw) -> AgentEntry:
    kw.setdefault("pool", None)
    kw.setdefault("subscribe", [])
    kw.setdefault("ack", False)
    kw.setdefault("heartbeat", 10.0)
    return AgentEntry(name=name, **kw)


def test_direct_send(bus) -> None:
    bus.table(entry("a"))
    bus.agent("a")
    tx = bus.client("tx")
    tx.send("a", "note.one", {"n": 1})
    wait_for(lambda: bus.got("a"), 5, "the signal")
    [rec] = bus.got("a")
    assert rec["type"] == "note.one" and rec["data"] == {"n": 1} and rec["source"] == "tx"
    # Client to client works too (no table entry needed for a connected peer).
    rx = bus.client("rx")
    rx.stats()  # its HELLO is in (two sockets: no order between them otherwise)
    tx.send("rx", "hi", [1, 2])
    got = rx.receive(timeout=5)
    assert got is not None and (got.type, got.data, got.source) == ("hi", [1, 2], "tx")


def test_pubsub_patterns_select_exactly(bus) -> None:
    patterns = {
        "one": "doc.*",
        "many": "doc.**",
        "exact": "doc.created",
        "mid": "*.created",
        "all": "**",
        "deep": "doc.**.done",
        "none": "img.*",
    }
    subs = {}
    for name, pattern in patterns.items():
        subs[name] = bus.client(f"sub-{name}")
        subs[name].subscribe(pattern)
    tx = bus.client("tx")
    types = ["doc.created", "doc.a.b", "doc", "img.new", "x.created", "doc.done", "doc.x.y.done"]
    counts = [tx.publish(t, t) for t in types]
    expected = {
        "one": {"doc.created", "doc.done"},
        "many": {"doc.created", "doc.a.b", "doc", "doc.done", "doc.x.y.done"},
        "exact": {"doc.created"},
        "mid": {"doc.created", "x.created"},
        "all": set(types),
        "deep": {"doc.done", "doc.x.y.done"},
        "none": {"img.new"},
    }
    assert counts == [sum(t in e for e in expected.values()) for t in types]
    for name, c in subs.items():
        seen = set()
        for _ in range(len(expected[name])):
            s = c.receive(timeout=5)
            assert s is not None, f"{name} missed a signal"
            seen.add(s.type)
        assert seen == expected[name], name
        assert c.receive(timeout=0.05) is None, f"{name} got more than it subscribed to"


def test_sdk_routes_are_subscriptions(bus) -> None:
    bus.table(entry("a"))
    bus.agent("a")  # Recorder: @on("**")
    tx = bus.client("tx")
    assert tx.publish("anything.at.all", 5) == 1
    wait_for(lambda: bus.got("a"), 5, "the published signal")
    assert bus.got("a")[0]["type"] == "anything.at.all"


def test_request_reply_and_timeout(bus) -> None:
    bus.table(entry("a"))
    bus.agent("a")
    c = bus.client("asker")
    assert c.request("a", "ask.it", {"q": 2}) == {"got": {"q": 2}, "by": "a"}
    t0 = time.monotonic()
    with pytest.raises(BusTimeout):
        c.request("a", "work.slow", 1, timeout=0.5)  # the handler sleeps 60 s
    assert 0.45 <= time.monotonic() - t0 < 2
    with pytest.raises(TimeoutError):  # BusTimeout is also a TimeoutError
        c.request("a", "work.slow", 2, timeout=0.2)
    assert c.request("a", "again", 3)["got"] == 3  # late replies do not confuse the next one


def test_unknown_recipient_is_an_error_to_the_sender(bus) -> None:
    c = bus.client("tx")
    with pytest.raises(BusError, match="unknown recipient 'nobody'"):
        c.send("nobody", "x", 1)
    with pytest.raises(BusError, match="unknown recipient"):
        c.request("nobody", "x", 1, timeout=2)
    assert c.stats()["errors"] == 2


def test_held_while_down_then_delivered_in_order(bus) -> None:
    bus.table(entry("rx"))
    proc = bus.agent("rx")
    tx = bus.client("tx")
    assert tx.request("rx", "warm", 0)["by"] == "rx"
    bus.kill(proc, "rx", 0)
    for i in range(50):
        tx.send("rx", "held", i)  # each with the broker's receipt: accepted, held
    assert tx.stats()["held_now"] == 50
    bus.agent("rx", incarnation=1)
    wait_for(lambda: len([r for r in bus.got("rx") if r["type"] == "held"]) == 50, 10, "all 50")
    held = [r for r in bus.got("rx") if r["type"] == "held"]
    assert [r["data"] for r in held] == list(range(50))
    assert all(r["incarnation"] == 1 for r in held)


def test_configured_subscriptions_are_held_too(bus) -> None:
    bus.table(entry("rx", subscribe=["doc.*"]))
    tx = bus.client("tx")
    assert tx.publish("doc.created", 1) == 1  # rx never ran yet: held for it
    assert tx.publish("img.created", 2) == 0
    bus.agent("rx")
    wait_for(lambda: bus.got("rx"), 5, "the held publication")
    assert [(r["type"], r["data"]) for r in bus.got("rx")] == [("doc.created", 1)]


def test_full_hold_queue_is_an_error(tmp_path) -> None:
    b = Bus(tmp_path, "--queue-limit", "3")
    try:
        b.table(entry("rx"))
        tx = b.client("tx")
        for i in range(3):
            tx.send("rx", "held", i)
        with pytest.raises(BusError, match="full"):
            tx.send("rx", "held", 3)
    finally:
        b.close()


def test_table_removal_drops_the_queue(bus) -> None:
    bus.table(entry("rx"))
    tx = bus.client("tx")
    tx.send("rx", "held", 1)
    bus.table()
    assert tx.stats()["held_now"] == 0
    with pytest.raises(BusError, match="unknown recipient"):
        tx.send("rx", "held", 2)


def test_ack_redelivers_to_next_incarnation(bus) -> None:
    bus.table(entry("w", ack=True))
    proc = bus.agent("w", ack=True)
    tx = bus.client("tx")
    tx.request("w", "quick", 0)  # handled and acked: never redelivered
    tx.send("w", "work.slow", "job-1")  # the handler sleeps 60 s: never acked
    wait_for(lambda: len(bus.got("w")) == 2, 5, "the signal to be in the handler")
    bus.kill(proc, "w", 0)
    bus.agent("w", incarnation=1, ack=True)
    wait_for(lambda: len(bus.got("w")) == 3, 10, "the redelivery")
    quick, first, again = bus.got("w")
    assert quick["data"] == 0
    assert first["data"] == again["data"] == "job-1"
    assert not first["redelivered"] and again["redelivered"]
    assert again["incarnation"] == 1
    assert tx.stats()["redelivered"] == 1


def test_hung_handler_is_reported_within_heartbeat(bus) -> None:
    bus.table(entry("stuck", heartbeat=1.0))
    bus.agent("stuck", "Blocker", heartbeat=1.0)
    tx = bus.client("tx")
    assert tx.request("stuck", "ping", None) == "pong"
    t0 = time.monotonic()
    tx.send("stuck", "block", None)
    bus.link.wait_event("hung", "stuck", 0, timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert [e.kind for e in bus.link.events if e.kind == "hung"] == ["hung"]  # once


def test_hello_without_ready_is_hung(bus) -> None:
    bus.table(entry("slow", heartbeat=0.5))
    bus.agent("slow", "SlowSetup", heartbeat=0.5, wait_ready=False)
    bus.link.wait_event("connected", "slow", 0)
    bus.link.wait_event("hung", "slow", 0, timeout=3)


def test_pool_round_robin(bus) -> None:
    members = [f"w@{i}" for i in range(3)]
    bus.table(*(entry(m, pool="w") for m in members))
    for m in members:
        bus.agent(m, wait_ready=False)
    for m in members:
        bus.link.wait_event("ready", m, 0, timeout=15)
    c = bus.client("tx")
    by = [c.request("w", "job", i)["by"] for i in range(9)]
    assert sorted(set(by)) == members
    assert all(by.count(m) == 3 for m in members)


def test_broker_restart_link_resends_table(bus) -> None:
    bus.table(entry("a"))
    bus.agent("a")
    bus.restart_broker()
    tx = bus.client("tx")

    def answers() -> bool:
        try:
            return tx.request("a", "hello", 1, timeout=0.3)["by"] == "a"
        except BusError:
            return False

    wait_for(answers, 10, "the agent through the new broker")
    bus.link.wait_event("ready", "a", 0)
    # The new broker has the table again: a configured agent's traffic is held.
    tx.send("a", "still", 2)


def test_a_table_larger_than_a_frame_goes_in_parts_and_a_change_as_a_patch(tmp_path) -> None:
    b = Bus(tmp_path, max_frame=4096)
    try:
        b.table(*(entry(f"w{i:03d}") for i in range(300)))  # about 10 KiB of table
        tx = b.client("tx")
        tx.send("w299", "held", 1)  # the last part's entries are known (held, accepted)
        b.link.update([entry("spawned")], ["w000"])
        tx.send("spawned", "held", 2)
        with pytest.raises(BusError, match="unknown recipient"):
            tx.send("w000", "held", 3)
        assert tx.stats()["held_now"] == 2
        # A new broker gets the whole (patched) table again, in parts.
        b.restart_broker()
        tx.send("spawned", "held", 4)
        tx.send("w299", "held", 5)
        with pytest.raises(BusError, match="unknown recipient"):
            tx.send("w000", "held", 6)
    finally:
        b.close()
