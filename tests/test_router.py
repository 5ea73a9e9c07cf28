"""The router core without sockets: plain frames in, frames and records out, a fake clock.

Each test plays the broker's loop by hand (`Net.turn`): hand frames to the
router, "commit" its records to a journal in memory (or fail to), take the
sends, and report the ones that fail as the socket would (`gone`, `full`).
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec

from agentd.bus.envelope import (
    Ack,
    AgentEntry,
    AgentEvent,
    Batch,
    Bye,
    Dlq,
    DlqReply,
    Down,
    Error,
    Heartbeat,
    Hello,
    Nack,
    Notice,
    Ready,
    Receipt,
    Reconnect,
    Signal,
    Stats,
    Table,
    TableOk,
    TablePatch,
    encoder,
    peer_decoder,
)
from agentd.bus.envelope import signal as make_signal
from agentd.bus.journal import encode, replay
from agentd.bus.router import FULL, GONE, KEPT, Router

ENC = encoder()
DEC = peer_decoder()


class Net:
    """A router and the world around it: who got what, what the journal holds."""

    def __init__(self, *entries: AgentEntry, **kw: Any) -> None:
        self.router = Router(**kw)
        self.now = 0.0
        self.inbox: dict[str, list[Any]] = {}
        self.journal: list[tuple[Any, ...]] = []
        self.gone: set[str] = set()  # sends to these fail as "gone"
        self.full: set[str] = set()  # ... and to these as "full"
        self.commit_fails = False
        if entries:
            self.table(*entries)

    def table(self, *entries: AgentEntry, version: int = 1) -> None:
        self.send("agentd", Table(version, list(entries)))
        assert self._pick("agentd", lambda f: isinstance(f, TableOk))

    def send(self, sender: str, frame: Any) -> None:
        self.router.handle(sender.encode(), ENC.encode(frame), self.now)
        self.turn()

    def raw(self, sender: str, payload: bytes) -> None:
        self.router.handle(sender.encode(), payload, self.now)
        self.turn()

    def turn(self) -> None:
        r = self.router
        for _ in range(16):
            records = r.take_records()
            if records:
                if self.commit_fails:
                    r.committed(False, self.now, error="disk full")
                else:
                    self.journal.extend(records)
                    r.committed(True, self.now)
            sends = r.take_sends(self.now)
            if not sends:
                return
            for s in sends:
                if s.to in self.gone:
                    r.send_failed(s, GONE, self.now)
                elif s.to in self.full:
                    r.send_failed(s, FULL, self.now)
                else:
                    frame = DEC.decode(bytes(s.frame))
                    items = frame.signals if isinstance(frame, Batch) else [frame]
                    self.inbox.setdefault(s.to, []).extend(items)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.router.tick(self.now)
        self.turn()

    def take(self, name: str) -> list[Any]:
        return self.inbox.pop(name, [])

    def signals(self, name: str) -> list[Signal]:
        return [f for f in self.take(name) if isinstance(f, Signal)]

    def agent(self, name: str, incarnation: int = 0, ready: bool = True) -> None:
        self.send(name, Hello(name, incarnation, 1000 + incarnation))
        if ready:
            self.send(name, Ready())

    def post(self, sender: str, to: str | None, type: str = "t", data: Any = None, **kw: Any):
        sig = make_signal(type, data, sender, to=to, receipt=True, **kw)
        self.send(sender, sig)
        return sig

    def receipt(self, sender: str, sig: Signal) -> Receipt:
        found = self._pick(sender, lambda f: isinstance(f, Receipt) and f.id == sig.id)
        assert len(found) == 1, found
        return found[0]

    def _pick(self, name: str, match: Any) -> list[Any]:
        """Take the frames of `name` that match; leave the others in its inbox."""
        frames = self.inbox.get(name, [])
        found = [f for f in frames if match(f)]
        self.inbox[name] = [f for f in frames if not match(f)]
        return found

    def stored(self) -> dict[tuple[str, str], Any]:
        """What a broker restarted now would load (its done records written first)."""
        self.router.sync_all()
        self.turn()
        state, _, bad = replay(bytes(encode(self.journal, ENC)))
        assert not bad
        return state


def acked(name: str, **kw: Any) -> AgentEntry:
    return AgentEntry(name=name, ack=True, **kw)


# --- at most once (no ack) -----------------------------------------------------------


def test_direct_signal_goes_to_a_connected_agent_with_a_receipt() -> None:
    net = Net(AgentEntry(name="w"))
    net.agent("w")
    sig = net.post("c", "w", data=1)
    assert net.receipt("c", sig).ok
    [got] = net.signals("w")
    assert got.id == sig.id and got.data == 1 and not got.redelivered
    assert net.journal == []  # nothing kept: no records


def test_unknown_recipient_is_refused() -> None:
    net = Net(AgentEntry(name="w"))
    r = net.receipt("c", net.post("c", "nobody"))
    assert not r.ok and "unknown recipient" in (r.error or "")


def test_before_the_table_signals_wait_for_it() -> None:
    """A new broker does not know yet which names are configured, or which are ack."""
    net = Net(table_wait=5.0)
    sig = net.post("c", "w", data=1)
    assert net.take("c") == [Reconnect()]  # no receipt yet; asked to say hello
    net.table(acked("w"))
    assert net.receipt("c", sig).ok
    assert ("w", sig.id) in net.stored()


def test_without_a_table_in_time_signals_are_routed_with_none() -> None:
    net = Net(table_wait=1.0)
    sig = net.post("c", "w")
    net.advance(0.5)
    assert not [f for f in net.take("c") if isinstance(f, Receipt)]
    net.advance(0.6)
    r = net.receipt("c", sig)
    assert not r.ok and "unknown recipient" in (r.error or "")


def test_a_peer_whose_first_frame_is_a_signal_is_asked_to_say_hello() -> None:
    net = Net(acked("p@0", pool="p"))
    reply = msgspec.structs.replace(
        make_signal("q.reply", 2, "p@0", to="c", correlation_id="x"), reply=True
    )
    net.send("c", Hello("c"))
    net.send("p@0", reply)  # e.g. an answer to a request from before a broker restart
    assert Reconnect() in net.take("p@0")


def test_configured_agent_that_is_down_gets_its_backlog_in_order_on_hello() -> None:
    net = Net(AgentEntry(name="w"))
    sigs = [net.post("c", "w", data=i) for i in range(3)]
    assert all(net.receipt("c", s).ok for s in sigs)
    assert net.router.stats()["held_now"] == 3
    net.agent("w")
    assert [s.data for s in net.signals("w")] == [0, 1, 2]


def test_hold_queue_is_bounded() -> None:
    net = Net(AgentEntry(name="w"), queue_limit=2)
    results = [net.receipt("c", net.post("c", "w")) for _ in range(3)]
    assert [r.ok for r in results] == [True, True, False]
    assert "full" in (results[2].error or "")


def test_a_full_pipe_tells_the_sender_not_a_silent_drop() -> None:
    net = Net(AgentEntry(name="w"))
    net.agent("w")
    net.full.add("w")
    sig = net.post("c", "w")
    frames = net.take("c")
    errors = [f for f in frames if isinstance(f, Error) and f.id == sig.id]
    assert errors and "not keeping up" in errors[0].reason
    assert net.router.counters["dropped"] == 1


def test_a_gone_peer_is_held_for_if_configured_else_refused() -> None:
    net = Net(AgentEntry(name="w"))
    net.agent("w")
    net.send("x", Hello("x"))
    net.gone.update({"w", "x"})
    sw, sx = net.post("c", "w"), net.post("c", "x")
    frames = net.take("c")
    assert not [f for f in frames if isinstance(f, Error) and f.id == sw.id]  # held
    assert [f for f in frames if isinstance(f, Error) and f.id == sx.id]  # refused
    net.gone.clear()
    net.agent("w", incarnation=1)
    assert [s.id for s in net.signals("w")] == [sw.id]


def test_a_batch_to_one_peer_leaves_as_one_batch() -> None:
    net = Net(AgentEntry(name="w"))
    net.agent("w")
    batch = Batch([make_signal("t", i, "c", to="w") for i in range(5)])
    net.send("c", batch)
    sends_seen = net.signals("w")
    assert [s.data for s in sends_seen] == list(range(5))


def test_publish_reaches_every_matching_subscriber_but_the_sender() -> None:
    net = Net(AgentEntry(name="a", subscribe=["doc.*"]), AgentEntry(name="b"))
    net.agent("a")
    net.send("b", Hello("b", 0, 1, ["doc.created"]))
    net.send("b", Ready())
    sig = net.post("b", None, "doc.created")
    assert net.receipt("b", sig).delivered == 1
    assert [s.id for s in net.signals("a")] == [sig.id]
    assert net.signals("b") == []


def test_source_must_be_the_sender() -> None:
    net = Net(AgentEntry(name="w"))
    sig = make_signal("t", None, "someone-else", to="w", receipt=True)
    net.send("c", sig)
    assert not net.receipt("c", sig).ok


def test_malformed_and_oversized_frames_are_counted_and_answered() -> None:
    net = Net(max_frame=100)
    net.raw("c", b"\xc1garbage")
    big = make_signal("t", "x" * 500, "c", to="c", receipt=True)
    net.send("c", big)
    frames = net.take("c")
    assert any(isinstance(f, Error) and "malformed" in f.reason for f in frames)
    assert any(isinstance(f, Receipt) and not f.ok and "too large" in f.error for f in frames)
    assert net.router.counters["malformed"] == 1 and net.router.counters["oversized"] == 1


def test_an_unknown_peer_is_asked_to_say_hello_again() -> None:
    net = Net(AgentEntry(name="w"))
    net.send("w", Heartbeat())
    assert any(isinstance(f, Reconnect) for f in net.take("w"))


def test_reserved_names_cannot_say_hello() -> None:
    net = Net()
    net.send("bus", Hello("bus"))
    assert any(isinstance(f, Error) for f in net.take("bus"))


def test_pool_round_robin_at_most_once() -> None:
    net = Net(AgentEntry(name="p@0", pool="p"), AgentEntry(name="p@1", pool="p"))
    net.agent("p@0")
    net.agent("p@1")
    for i in range(4):
        net.post("c", "p", data=i)
    assert [s.data for s in net.signals("p@0")] == [0, 2]
    assert [s.data for s in net.signals("p@1")] == [1, 3]


def test_heartbeat_silence_is_reported_once() -> None:
    net = Net(AgentEntry(name="w", heartbeat=1.0))
    net.agent("w")
    net.take("agentd")
    net.advance(0.5)
    assert not [f for f in net.take("agentd") if isinstance(f, AgentEvent) and f.event == "hung"]
    net.advance(0.6)
    hung = [f for f in net.take("agentd") if isinstance(f, AgentEvent) and f.event == "hung"]
    assert [(h.name, h.incarnation) for h in hung] == [("w", 0)]
    net.advance(2.0)
    assert not [f for f in net.take("agentd") if isinstance(f, AgentEvent) and f.event == "hung"]
    # Heard from again (it was paused: agentd let it be), then silent again: news again.
    net.send("w", Heartbeat())
    net.advance(0.5)
    assert not [f for f in net.take("agentd") if isinstance(f, AgentEvent) and f.event == "hung"]
    net.advance(0.6)
    hung = [f for f in net.take("agentd") if isinstance(f, AgentEvent) and f.event == "hung"]
    assert [(h.name, h.incarnation) for h in hung] == [("w", 0)]


# --- kept (ack = true) ---------------------------------------------------------------


def test_receipt_for_an_ack_agent_follows_the_commit() -> None:
    net = Net(acked("w"))
    net.agent("w")
    sig = net.post("c", "w", data=1)
    assert net.receipt("c", sig).ok
    assert net.stored()[("w", sig.id)].frame  # journaled before the receipt left
    [got] = net.signals("w")
    assert got.id == sig.id and got.deliveries == 0 and not got.redelivered
    net.send("w", Ack([sig.id]))
    assert net.journal[-1][0] == "p"  # the ack's record waits for the next write ...
    net.advance(0.1)
    assert net.journal[-1] == ("d", "w", sig.id)  # ... or the next tick
    assert net.stored() == {}


def test_a_failed_commit_is_an_error_receipt_never_a_false_accepted() -> None:
    net = Net(acked("w"), AgentEntry(name="free"))
    net.agent("w")
    net.agent("free")
    net.commit_fails = True
    sig = net.post("c", "w")
    r = net.receipt("c", sig)
    assert not r.ok and r.error == "journal unavailable"
    assert net.signals("w") == []  # never delivered: it was never kept
    notices = [f for f in net.take("agentd") if isinstance(f, Notice)]
    assert [n.event for n in notices] == ["bus.journal_unavailable"]
    # Agents without ack keep working; the episode is reported once.
    assert net.receipt("c", net.post("c", "free")).ok
    assert not net.receipt("c", net.post("c", "w")).ok
    assert not [f for f in net.take("agentd") if isinstance(f, Notice)]
    net.commit_fails = False
    net.advance(1.5)  # the probe succeeds
    assert [f.event for f in net.take("agentd") if isinstance(f, Notice)] == [
        "bus.journal_recovered"
    ]
    assert net.receipt("c", net.post("c", "w")).ok


def test_in_flight_is_bounded_and_acks_release_the_next() -> None:
    net = Net(acked("w", max_in_flight=2))
    net.agent("w")
    sigs = [net.post("c", "w", data=i) for i in range(5)]
    got = net.signals("w")
    assert [s.data for s in got] == [0, 1]
    net.send("w", Ack([sigs[0].id]))
    assert [s.data for s in net.signals("w")] == [2]
    net.send("w", Ack([sigs[1].id, sigs[2].id]))
    assert [s.data for s in net.signals("w")] == [3, 4]
    assert net.router.stats()["in_flight_now"] == 2


def test_more_than_queue_limit_behind_strands_nothing() -> None:
    """The old broker's hold queue was flushed only on HELLO; a mailbox drains on acks."""
    net = Net(acked("w", max_in_flight=3), queue_limit=2)
    net.agent("w")
    sigs = [net.post("c", "w", data=i) for i in range(20)]
    assert all(net.receipt("c", s).ok for s in sigs)
    seen: list[int] = []
    while True:
        got = net.signals("w")
        if not got:
            break
        seen += [s.data for s in got]
        net.send("w", Ack([s.id for s in got]))
    assert seen == list(range(20))
    assert net.router.stats()["pending_now"] == 0 and net.stored() == {}


def test_max_pending_says_full() -> None:
    net = Net(acked("w", max_pending=3))
    results = [net.receipt("c", net.post("c", "w")) for _ in range(4)]
    assert [r.ok for r in results] == [True, True, True, False]
    assert "full" in (results[3].error or "")


def test_kept_while_down_then_delivered_on_hello() -> None:
    net = Net(acked("w"))
    sig = net.post("c", "w")
    assert net.receipt("c", sig).ok
    net.agent("w")
    assert [s.id for s in net.signals("w")] == [sig.id]


def test_a_resend_of_the_same_id_is_kept_once() -> None:
    net = Net(acked("w"))
    sig = make_signal("t", 1, "c", to="w", receipt=True)
    net.send("c", sig)
    net.send("c", sig)
    assert [r.ok for r in net.take("c") if isinstance(r, Receipt)] == [True, True]
    net.agent("w")
    assert len(net.signals("w")) == 1


def test_death_of_the_holder_redelivers_flagged_to_the_next_incarnation() -> None:
    net = Net(acked("w"))
    net.agent("w")
    sig = net.post("c", "w")
    net.signals("w")
    net.send("agentd", Down("w", 0))
    net.agent("w", incarnation=1)
    [again] = net.signals("w")
    assert again.id == sig.id and again.redelivered and again.deliveries == 2
    assert net.stored()[("w", sig.id)].deliveries == 1  # the failed one, counted


def test_a_new_incarnation_saying_hello_frees_what_the_old_one_held() -> None:
    net = Net(acked("w"))
    net.agent("w")
    sig = net.post("c", "w")
    net.signals("w")
    net.agent("w", incarnation=1)  # no Down seen (yet)
    [again] = net.signals("w")
    assert again.id == sig.id and again.redelivered


def test_nack_retries_after_a_doubling_backoff_then_dead_letters() -> None:
    net = Net(acked("w", max_deliveries=3, retry_backoff=0.5))
    net.agent("w")
    sig = net.post("c", "w")
    times = []
    for _ in range(3):
        got = []
        for _ in range(200):
            got = net.signals("w")
            if got:
                break
            net.advance(0.05)
        assert [s.id for s in got] == [sig.id]
        times.append(net.now)
        net.send("w", Nack([sig.id], "ValueError: nope"))
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    assert 0.5 <= gaps[0] < 0.6 and 1.0 <= gaps[1] < 1.1
    net.advance(5.0)
    assert net.signals("w") == []
    notices = [f for f in net.take("agentd") if isinstance(f, Notice)]
    assert [(n.event, n.info["deliveries"]) for n in notices] == [("bus.dead_lettered", 3)]
    net.send("ops", Dlq("list"))
    [reply] = [f for f in net.take("ops") if isinstance(f, DlqReply)]
    [dead] = reply.dead_letters
    assert (dead.id, dead.agent, dead.deliveries) == (sig.id, "w", 3)
    assert dead.error == "ValueError: nope"
    assert net.stored()[("w", sig.id)].dead_at is not None


def test_redrive_delivers_again_with_the_count_reset_and_purge_drops() -> None:
    net = Net(acked("w", max_deliveries=1))
    net.agent("w")
    a, b = net.post("c", "w", data="a"), net.post("c", "w", data="b")
    for s in net.signals("w"):
        net.send("w", Nack([s.id], "boom"))
    net.send("ops", Dlq("list", "w"))
    [reply] = [f for f in net.take("ops") if isinstance(f, DlqReply)]
    assert sorted(d.id for d in reply.dead_letters) == sorted([a.id, b.id])
    net.send("ops", Dlq("redrive", "w", a.id))
    [reply] = [f for f in net.take("ops") if isinstance(f, DlqReply)]
    assert [d.id for d in reply.dead_letters] == [a.id]
    [again] = net.signals("w")
    assert again.id == a.id and again.redelivered and again.deliveries == 1  # count reset
    net.send("w", Ack([a.id]))
    net.send("ops", Dlq("purge", "w"))
    [reply] = [f for f in net.take("ops") if isinstance(f, DlqReply)]
    assert [d.id for d in reply.dead_letters] == [b.id]
    assert net.stored() == {}
    net.send("ops", Dlq("list", "nobody"))
    [reply] = [f for f in net.take("ops") if isinstance(f, DlqReply)]
    assert reply.error and "unknown agent" in reply.error


def test_dead_letters_and_pending_survive_a_restart_from_the_journal() -> None:
    net = Net(acked("w", max_deliveries=1))
    net.agent("w")
    dead = net.post("c", "w", data="dead")
    [s] = net.signals("w")
    net.send("w", Nack([s.id], "boom"))
    live = net.post("c", "w", data="live")
    assert net.signals("w")  # delivered, never acked: the broker dies now
    state = net.stored()

    fresh = Net()
    fresh.router.restore(state.values())
    fresh.table(acked("w", max_deliveries=1))
    fresh.agent("w")
    [got] = fresh.signals("w")
    assert got.id == live.id and got.redelivered  # may have been delivered: flagged
    fresh.send("ops", Dlq("list"))
    [reply] = [f for f in fresh.take("ops") if isinstance(f, DlqReply)]
    assert [d.id for d in reply.dead_letters] == [dead.id]


def test_a_request_is_settled_by_its_reply_not_its_ack() -> None:
    net = Net(acked("w"))
    net.agent("w")
    req = make_signal("q", 1, "c", to="w", correlation_id="corr-1")
    net.send("c", req)
    [got] = net.signals("w")
    net.send("w", Ack([got.id]))
    assert ("w", req.id) in net.stored()  # acked, but not answered yet
    reply = msgspec.structs.replace(
        make_signal("q.reply", 2, "w", to="c", correlation_id="corr-1"), reply=True
    )
    net.send("w", reply)
    assert [s.data for s in net.signals("c")] == [2]
    assert net.stored() == {}


def test_replies_to_an_ack_agent_are_never_kept() -> None:
    net = Net(acked("w"))
    net.agent("w")
    reply = msgspec.structs.replace(
        make_signal("q.reply", 2, "c", to="w", correlation_id="x"), reply=True
    )
    net.send("c", reply)
    assert [s.data for s in net.signals("w")] == [2]
    assert net.journal == []


def test_pool_signals_go_to_members_with_room_and_move_when_one_dies() -> None:
    net = Net(acked("p@0", pool="p", max_in_flight=1), acked("p@1", pool="p", max_in_flight=1))
    net.agent("p@0")
    net.agent("p@1")
    sigs = [net.post("c", "p", data=i) for i in range(3)]
    first, second = net.signals("p@0"), net.signals("p@1")
    assert len(first) == 1 and len(second) == 1
    net.send("agentd", Down("p@0", 0))  # p@0 dies holding one: p@1 gets it next
    net.send("p@1", Ack([second[0].id]))
    [moved] = net.signals("p@1")
    assert moved.id == first[0].id and moved.redelivered
    net.send("p@1", Ack([moved.id]))
    [last] = net.signals("p@1")
    assert last.id == sigs[2].id
    assert net.router.stats()["pending_now"] == 0


def test_pool_signals_wait_in_the_pool_while_no_member_is_ready() -> None:
    net = Net(acked("p@0", pool="p"))
    sig = net.post("c", "p")
    assert net.receipt("c", sig).ok
    net.agent("p@0", ready=False)
    assert net.signals("p@0") == []  # not before READY
    net.send("p@0", Ready())
    assert [s.id for s in net.signals("p@0")] == [sig.id]


def test_configured_subscriptions_of_an_ack_agent_are_kept_per_subscriber() -> None:
    net = Net(acked("a", subscribe=["job.*"]), acked("b", subscribe=["job.*"]))
    sig = net.post("c", None, "job.done")
    assert net.receipt("c", sig).delivered == 2
    assert {k[0] for k in net.stored()} == {"a", "b"}
    net.agent("a")
    assert [s.id for s in net.signals("a")] == [sig.id]


def test_full_pipe_to_an_ack_agent_puts_signals_back_uncounted() -> None:
    net = Net(acked("w"))
    net.agent("w")
    net.full.add("w")
    sig = net.post("c", "w")
    assert net.receipt("c", sig).ok
    assert net.router.stats()["in_flight_now"] == 0
    net.full.clear()
    net.advance(0.1)
    [got] = net.signals("w")
    assert got.id == sig.id and not got.redelivered


def test_gone_while_delivering_keeps_the_signal_for_the_next_hello() -> None:
    net = Net(acked("w"))
    net.agent("w")
    net.gone.add("w")
    sig = net.post("c", "w")
    assert net.receipt("c", sig).ok
    net.gone.clear()
    net.agent("w", incarnation=1)
    [got] = net.signals("w")
    assert got.id == sig.id


def test_a_reload_that_removes_an_ack_agent_drops_its_entries_and_says_how_many() -> None:
    net = Net(acked("w"), AgentEntry(name="x"))
    for _ in range(3):
        net.post("c", "w")
    net.table(AgentEntry(name="x"), version=2)
    notices = [f for f in net.take("agentd") if isinstance(f, Notice)]
    assert [(n.event, n.agent, n.info) for n in notices] == [("bus.dropped", "w", {"count": 3})]
    assert net.stored() == {}


def test_a_patch_changes_only_what_it_names_and_a_wrong_base_asks_for_the_table() -> None:
    net = Net(acked("w"), AgentEntry(name="x", subscribe=["a.*"]))
    for _ in range(2):
        net.post("c", "w")
    net.send("agentd", TablePatch(2, 1, [AgentEntry(name="y")], ["w"]))
    assert net._pick("agentd", lambda f: f == TableOk(2))
    notices = [f for f in net.take("agentd") if isinstance(f, Notice)]
    assert [(n.event, n.agent, n.info) for n in notices] == [("bus.dropped", "w", {"count": 2})]
    assert set(net.router.table) == {"x", "y"} and net.router.table_version == 2
    assert "unknown recipient" in (net.receipt("c", net.post("c", "w")).error or "")
    net.agent("y")
    assert net.receipt("c", net.post("c", "y")).ok  # the new entry routes
    net.agent("x")
    net.take("x")
    net.post("c", None, type="a.b")
    assert [s.type for s in net.signals("x")] == ["a.b"]  # x's subscription kept
    # A patch on a table this broker does not have (it restarted; a frame was lost).
    net.take("agentd")
    net.send("agentd", TablePatch(4, 3, [AgentEntry(name="z")], []))
    assert net.take("agentd") == [Reconnect()]
    assert "z" not in net.router.table and net.router.table_version == 2


def test_a_table_in_parts_is_taken_when_its_last_part_comes() -> None:
    net = Net(AgentEntry(name="old"))
    net.send("agentd", Table(2, [AgentEntry(name="a")], more=True))
    net.send("agentd", Table(2, [AgentEntry(name="b")], more=True))
    assert net.take("agentd") == [] and set(net.router.table) == {"old"}
    net.send("agentd", Table(2, [AgentEntry(name="c")]))
    assert net.take("agentd") == [TableOk(2)]
    assert set(net.router.table) == {"a", "b", "c"}
    # Parts of a version given up (the daemon sent a newer one) are not mixed in.
    net.send("agentd", Table(3, [AgentEntry(name="d")], more=True))
    net.send("agentd", Table(4, [AgentEntry(name="e")]))
    assert set(net.router.table) == {"e"}


def test_bye_releases_what_the_agent_held() -> None:
    net = Net(acked("w"))
    net.agent("w")
    sig = net.post("c", "w")
    net.signals("w")
    net.send("w", Bye())
    assert net.router.stats()["in_flight_now"] == 0
    net.agent("w", incarnation=1)
    assert [s.id for s in net.signals("w")] == [sig.id]


def test_stats_answer() -> None:
    net = Net()
    net.send("c", Stats())
    [stats] = [f for f in net.take("c") if isinstance(f, Stats)]
    assert {"received", "pending_now", "in_flight_now", "dead_letters_now"} <= set(stats.counters)


def test_deliveries_from_a_mailbox_are_kept_sends() -> None:
    """A failed KEPT send is undone from the mailbox; the kind is how the broker says so."""
    net = Net(acked("w"))
    net.agent("w")
    net.router.handle(b"c", ENC.encode(make_signal("t", 1, "c", to="w")), 0.0)
    assert net.router.take_records()  # the signal, kept
    net.router.committed(True, 0.0)
    assert [s.kind for s in net.router.take_sends(0.0) if s.to == "w"] == [KEPT]


def test_the_dead_letter_queue_is_bounded_by_max_pending() -> None:
    net = Net(acked("w", max_deliveries=1, max_pending=2))
    net.agent("w")
    for i in range(3):
        sig = net.post("c", "w", data=i)
        [got] = net.signals("w")
        net.send("w", Nack([got.id], "boom"))
        assert got.id == sig.id
    net.send("ops", Dlq("list"))
    [reply] = [f for f in net.take("ops") if isinstance(f, DlqReply)]
    assert len(reply.dead_letters) == 2  # the oldest made room
    assert len(net.stored()) == 2
