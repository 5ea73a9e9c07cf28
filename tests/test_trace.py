"""Tracing: W3C trace context on every signal, the broker's trace ring, `agentd ctl trace`.

Pure parts first (trace context, the ring fed by a real router, the tree
rendering), then the real thing: SDK agents and the Node.js worker on a real
broker, and a job through the hub whose `ctl trace` tree has every hop —
also after a `kill -9` of the broker, from the journal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agentd.bus import tracecontext as tc
from agentd.bus.envelope import AgentEntry, Nack, Trace, TraceRecord, TraceReply, encoder
from agentd.bus.envelope import signal as make_signal
from agentd.bus.journal import Journal
from agentd.bus.traces import TraceRing
from agentd.bus.tracetree import as_json, build, render
from tests.conftest import wait_for
from tests.conftest_bus import Bus
from tests.test_hub import free_port, hub_config, start_hub
from tests.test_router import Net

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "agents" / "examples" / "node"
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TID = "4bf92f3577b34da6a3ce929d0e0e4736"


def tp(trace: str) -> str:
    """A valid traceparent of trace `trace` (one hex digit, repeated)."""
    return f"00-{trace * 32}-{'1' * 16}-01"


# --- trace context ----------------------------------------------------------------------


def test_traceparent_parsing_follows_the_w3c_rules() -> None:
    assert tc.parse(TP) == (TID, "00f067aa0ba902b7", 1)
    assert tc.parse(f" {TP}\t") is not None  # whitespace around a header value
    assert tc.parse("cc-" + TP[3:] + "-what-comes-next") is not None  # a later version
    for bad in (
        None,
        42,
        "",
        TP.upper(),  # lowercase only
        "ff" + TP[2:],  # version ff
        TP[:3] + "0" * 32 + TP[35:],  # all-zero trace id
        TP[:36] + "0" * 16 + TP[52:],  # all-zero parent id
        TP + "-extra",  # version 00 is exactly 55 characters
        "cc-" + TP[3:] + "x",  # a later version: what follows must be a new field
        TP[:-1],
        TP.replace("-", "_"),
    ):
        assert tc.parse(bad) is None, bad


def test_child_spans_keep_the_trace_and_garbage_starts_a_new_one() -> None:
    kid = tc.child(TP)
    assert tc.trace_id(kid) == TID and kid != TP and tc.valid(kid)
    assert tc.child(TP[:-2] + "00").endswith("-00")  # not sampled stays not sampled
    assert tc.child(TP[:-2] + "ff").endswith("-01")  # flags we do not know are zeroed
    fresh = {tc.trace_id(tc.child(bad)) for bad in (None, "garbage", TP.upper())}
    assert len(fresh) == 3 and TID not in fresh and None not in fresh
    assert tc.accept("cc-" + TP[3:] + "-more") == TP  # continued, as version 00
    assert tc.trace_id(tc.accept("nonsense")) not in (None, TID)
    assert all(tc.valid(tc.new_trace()) for _ in range(100))


# --- the ring, fed by a real router -----------------------------------------------------


def records_of(net: Net, wanted: str) -> dict[str, TraceRecord]:
    """Ask the router as a client would (a `trace` frame); the records by type."""
    net.send("asker", Trace(wanted))
    [reply] = [f for f in net.take("asker") if isinstance(f, TraceReply)]
    assert reply.error is None, reply.error
    return {r.type: r for r in reply.records}


def test_the_ring_follows_each_signal_to_its_outcome() -> None:
    net = Net(
        AgentEntry("free"),
        AgentEntry("keeper", ack=True, max_deliveries=2, retry_backoff=0.1),
        AgentEntry("sub", subscribe=["news.*"]),
    )
    net.agent("keeper")
    net.agent("sub")
    first = make_signal("job.held", 1, "client", to="free", traceparent=TP)
    net.send("client", first)  # free is configured but not connected: held
    assert records_of(net, first.id)["job.held"].outcome == "held"
    net.agent("free")  # ... and delivered when it says hello
    kid = tc.child(TP)
    asked = make_signal(
        "job.ask",
        2,
        "free",
        to="keeper",
        correlation_id="c1",
        traceparent=kid,
        causation_id=first.id,
    )
    net.send("free", asked)
    reply = make_signal("job.ask.reply", 3, "keeper", to="free", traceparent=tc.child(kid))
    reply.correlation_id, reply.reply, reply.causation_id = "c1", True, asked.id
    net.send("keeper", reply)
    failing = make_signal("job.fail", 4, "free", to="keeper", traceparent=tc.child(TP))
    net.send("free", failing)
    for _ in range(2):
        net.send("keeper", Nack([failing.id], "boom"))
        net.advance(1.0)
    news = make_signal("news.today", 5, "free", traceparent=tc.child(TP))
    net.send("free", news)
    refused = make_signal("job.lost", 6, "free", to="nobody", traceparent=tc.child(TP))
    net.send("free", refused)

    got = records_of(net, TID)  # by trace id: every one of them
    assert set(got) == {
        "job.held",
        "job.ask",
        "job.ask.reply",
        "job.fail",
        "news.today",
        "job.lost",
    }
    assert got["job.held"].outcome == "delivered"
    assert got["job.ask"].outcome == "replied" and got["job.ask"].causation_id == first.id
    assert got["job.ask.reply"].outcome == "delivered"
    assert (got["job.fail"].outcome, got["job.fail"].error) == ("dead-lettered", "boom")
    assert got["news.today"].to is None and got["news.today"].outcomes == {"sub": "delivered"}
    assert got["job.lost"].outcome == "error" and "unknown recipient" in got["job.lost"].error
    net.send("asker", Trace("no-such-id"))
    [answer] = net.take("asker")
    assert answer.records == [] and "no signal or trace" in answer.error

    # A restarted broker: the journal's records alone give the kept signals' outcomes.
    again = TraceRing()
    for record in net.journal:
        again.from_journal(list(record))
    assert again.get(asked.id).outcome == "replied"
    assert again.get(failing.id).outcome == "dead-lettered"
    assert again.get(first.id) is None  # at most once: memory only


def test_the_ring_is_bounded_and_a_real_journal_feeds_it(tmp_path: Path) -> None:
    ring = TraceRing(bound=3)
    sigs = [make_signal("t", i, "a", to="b") for i in range(7)]
    for s in sigs:
        ring.add(s)
    # The newest 3 at least, 6 at most: the oldest went first.
    assert [r.id for r in ring] == [s.id for s in sigs[3:]]

    journal = Journal(tmp_path / "bus.journal")
    journal.open()
    kept = make_signal("job.kept", None, "ingress", to="orchestrator", traceparent=TP)
    frame = encoder().encode(kept)
    journal.write(
        [("p", "orchestrator", kept.id, frame, 0, "", None), ("d", "orchestrator", kept.id)]
    )
    journal.close()
    ring = TraceRing()
    loaded = Journal(tmp_path / "bus.journal").open(observe=ring.from_journal)
    assert loaded.entries == []  # acked: the journal keeps nothing live ...
    rec = ring.get(kept.id)  # ... but the trace remembers
    assert (rec.outcome, rec.traceparent, rec.to) == ("acked", TP, "orchestrator")


# --- the tree ---------------------------------------------------------------------------


def rec(id: str, type: str, source: str, to: str | None, t: float, **kw: Any) -> TraceRecord:
    return TraceRecord(id, type, source, t, to, traceparent=TP, **kw)


def test_the_tree_follows_causes_and_puts_replies_under_requests() -> None:
    records = [
        rec("r1", "job.submit", "ingress", "orchestrator", 1.0, outcome="acked"),
        rec(
            "r2",
            "task.text",
            "orchestrator",
            "text",
            2.0,
            causation_id="r1",
            correlation_id="c",
            outcome="replied",
            member="text@1",
        ),
        # a reply from a peer that sets no causation_id: placed by its correlation_id
        rec(
            "r3",
            "task.text.reply",
            "text@1",
            "orchestrator",
            3.0,
            correlation_id="c",
            reply=True,
            outcome="delivered",
        ),
        rec(
            "r4",
            "job.completed",
            "orchestrator",
            None,
            4.0,
            causation_id="r1",
            outcomes={"ingress": "acked", "audit": "kept"},
        ),
        rec("r5", "lost.cause", "x", "y", 0.5, causation_id="gone"),  # its cause fell out
        rec("r6", "loop.a", "x", "y", 5.0, causation_id="r7"),  # a confused peer's cycle
        rec("r7", "loop.b", "y", "x", 6.0, causation_id="r6", outcome="error", error="no\nway"),
    ]
    roots = build(records)
    assert [n.record.id for n in roots] == ["r5", "r1", "r6"]
    assert [n.record.id for n in roots[1].children] == ["r2", "r4"]
    assert [n.record.id for n in roots[1].children[0].children] == ["r3"]

    lines = render(records, mark="r2")
    assert lines[0].startswith(f"trace {TID}: 7 signals, from ")
    body = [line[2:] for line in lines[1:]]  # after the mark column ("▶ " or "  ")
    assert body[0].startswith("lost.cause  x → y  ")
    assert body[1].startswith("job.submit  ingress → orchestrator  ") and body[1].endswith("acked")
    assert lines[3].startswith("▶ ├── task.text  orchestrator → text (text@1)  ")
    assert lines[3].endswith("  replied")
    assert body[2].startswith("├── task.text")
    assert body[3].startswith("│   └── task.text.reply  text@1 → orchestrator  ")
    assert body[4].startswith("└── job.completed  orchestrator → audit, ingress  ")
    assert body[4].endswith("audit kept, ingress acked")
    assert body[6].startswith("└── loop.b  y → x") and body[6].endswith("error: no way")
    assert sum(line.startswith("▶") for line in lines) == 1

    out = as_json(records, "r2")
    assert out["trace_id"] == TID and out["id"] == "r2"
    assert [r["id"] for r in out["records"]] == ["r5", "r1", "r2", "r3", "r4", "r6", "r7"]
    assert out["records"][0]["outcome"] == "routed"  # every field, defaults too
    assert [(n["id"], n["parent"], n["depth"]) for n in out["tree"]] == [
        ("r5", None, 0),
        ("r1", None, 0),
        ("r2", "r1", 1),
        ("r3", "r2", 2),
        ("r4", "r1", 1),
        ("r6", None, 0),
        ("r7", "r6", 1),
    ]
    json.dumps(out)  # JSON as it is


# --- the SDK and the Node.js worker on a real broker ------------------------------------


@pytest.fixture
def bus_(tmp_path: Path):
    b = Bus(tmp_path)
    try:
        yield b
    finally:
        b.close()


def by_type(records: list[TraceRecord]) -> dict[str, TraceRecord]:
    out = {r.type: r for r in records}
    assert len(out) == len(records), [r.type for r in records]
    return out


def test_sdk_handlers_propagate_the_trace(bus_: Bus) -> None:
    bus_.agent("sink", "Recorder")
    bus_.agent("tracer", "Tracer")
    c = bus_.client("tester")
    # Two handlers at once: the first waits while the second (a request) runs through.
    c.send("tracer", "trace.fan", {"to": "sink", "wait": 0.3}, traceparent=tp("a"))
    assert c.request("tracer", "trace.fan", {"to": "sink"}, traceparent=tp("b")) == {
        "got": {"to": "sink"},
        "by": "sink",
    }
    c.send("tracer", "trace.spawn", {"to": "sink"}, traceparent=tp("c"))
    wait_for(lambda: len(bus_.got("sink")) == 8, 10, "what the tracer sent")

    for trace, fan_reply in (("a", set()), ("b", {"trace.fan.reply"})):
        got = by_type(c.trace("a" * 32 if trace == "a" else "b" * 32))
        assert (
            set(got)
            == {"trace.fan", "trace.sent", "trace.emitted", "trace.asked", "trace.asked.reply"}
            | fan_reply
        )
        fan = got["trace.fan"]
        assert fan.causation_id is None and fan.source == "tester"
        for child in ("trace.sent", "trace.emitted", "trace.asked", *fan_reply):
            assert got[child].causation_id == fan.id, child
        assert got["trace.asked.reply"].causation_id == got["trace.asked"].id
        assert all(tc.trace_id(r.traceparent) == trace * 32 for r in got.values())
        spans = {tc.parse(r.traceparent)[1] for r in got.values()}
        assert len(spans) == len(got)  # a new span each
        [root] = build(list(got.values()))
        assert root.record is fan
    b_reply = by_type(c.trace("b" * 32))["trace.fan.reply"]
    assert (b_reply.to, b_reply.outcome) == ("tester", "delivered")

    got = by_type(c.trace("c" * 32))  # a def handler's task is part of its handling
    assert set(got) == {"trace.spawn", "trace.spawned"}
    assert got["trace.spawned"].causation_id == got["trace.spawn"].id
    [background] = [r for r in bus_.got("sink") if r["type"] == "trace.background"]
    assert background["causation_id"] is None  # the agent's own task: a new trace
    assert tc.trace_id(background["traceparent"]) not in (None, "c" * 32)
    # What the sink received carries the same fields the broker recorded.
    [sent] = [r for r in bus_.got("sink") if r["type"] == "trace.sent" and r["data"].get("wait")]
    assert sent["causation_id"] == by_type(c.trace("a" * 32))["trace.fan"].id


def test_the_node_worker_propagates_the_trace(bus_: Bus, node_worker: str) -> None:
    node = node_worker
    env = dict(os.environ, AGENTD_NAME="nodew", AGENTD_BUS=bus_.endpoint, AGENTD_HEARTBEAT="10")
    with open(bus_.dir / "nodew.log", "ab") as log:
        proc = subprocess.Popen(
            [node, str(NODE_DIR / "text_worker.js")], env=env, stdout=log, stderr=log
        )
    bus_.procs.append(proc)
    bus_.link.wait_event("ready", "nodew", timeout=15)
    c = bus_.client("tester")
    task = {
        "job": "j",
        "key": "k",
        "pool": "text",
        "type": "task.text.upper",
        "payload": {"text": "hi"},
    }
    assert c.request("nodew", "task.text.upper", task, traceparent=TP) == {"text": "HI"}
    got = by_type(c.trace(TID))
    request, reply = got["task.text.upper"], got["task.text.upper.reply"]
    assert reply.causation_id == request.id and reply.reply
    assert tc.trace_id(reply.traceparent) == TID
    assert tc.parse(reply.traceparent)[1] != tc.parse(request.traceparent)[1]
    # An invalid traceparent: the reply starts a new trace, valid, and still names its cause.
    garbage = make_signal("task.text.upper", task, "tester", to="nodew", correlation_id="x1")
    garbage.traceparent = "00-NOT-A-TRACE"
    c._sock.send(c._enc.encode(garbage))
    answer = wait_for(lambda: c.receive(timeout=0.5), 10, "the reply")
    assert answer.causation_id == garbage.id and tc.valid(answer.traceparent)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 0


# --- a job through the hub, and `ctl trace` ---------------------------------------------


def post_job(base: str, job: dict[str, Any], traceparent: str) -> tuple[str, str]:
    """POST /jobs with a traceparent header: (the job id, the answer's traceparent)."""
    req = urllib.request.Request(
        f"{base}/jobs", data=json.dumps(job).encode(), headers={"traceparent": traceparent}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202
        return json.loads(resp.read())["id"], resp.headers["traceparent"]


def job_done(base: str, job_id: str) -> bool:
    with urllib.request.urlopen(f"{base}/jobs/{job_id}", timeout=10) as resp:
        return json.loads(resp.read())["status"] == "completed"


def hub_trace(d: Any, wanted: str) -> dict[str, Any]:
    return d.ctl_json("trace", wanted)


def settled(d: Any, wanted: str) -> dict[str, Any] | None:
    """The trace once every kept signal in it is finished (acks are the last news)."""
    out = hub_trace(d, wanted)
    done = {"acked", "replied", "delivered"}
    for r in out["records"]:
        states = r["outcomes"].values() if r["outcomes"] else [r["outcome"]]
        if not set(states) <= done:
            return None
    return out


def test_a_hub_job_has_one_trace_from_ingress_to_workers(daemon_factory) -> None:
    port = free_port()
    d = daemon_factory(hub_config(port))
    base = start_hub(d, port)
    incoming = f"00-{TID}-{'2' * 16}-01"
    job_id, answered = post_job(base, {"type": "text.upper", "payload": {"text": "hi"}}, incoming)
    assert tc.trace_id(answered) == TID  # the caller can find the trace
    wait_for(lambda: job_done(base, job_id), 15, "the job")

    out = wait_for(lambda: settled(d, TID), 10, "the trace to settle")
    assert out["trace_id"] == TID and out["id"] is None
    got = {r["type"]: r for r in out["records"]}
    assert set(got) == {"job.submit", "task.text.upper", "task.text.upper.reply", "job.completed"}
    submit, task = got["job.submit"], got["task.text.upper"]
    reply, completed = got["task.text.upper.reply"], got["job.completed"]
    assert (submit["source"], submit["to"], submit["outcome"]) == (
        "ingress",
        "orchestrator",
        "acked",
    )
    assert (task["source"], task["to"], task["outcome"]) == ("orchestrator", "text", "replied")
    assert task["member"] in ("text@0", "text@1") and reply["source"] == task["member"]
    assert completed["outcomes"] == {"ingress": "acked", "audit": "acked"}
    parents = {n["id"]: n["parent"] for n in out["tree"]}
    assert parents[submit["id"]] is None
    assert parents[task["id"]] == submit["id"] and parents[completed["id"]] == submit["id"]
    assert parents[reply["id"]] == task["id"]

    shown = d.ctl("trace", task["id"])  # by a signal id: the whole trace, its line marked
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"trace {TID}: 4 signals")
    [marked] = [line for line in lines if line.startswith("▶")]
    assert f"task.text.upper  orchestrator → text ({task['member']})" in marked
    assert any(f"task.text.upper.reply  {task['member']} → orchestrator" in x for x in lines)
    assert any("job.completed  orchestrator → audit, ingress" in x for x in lines)
    unknown = d.ctl("trace", "f" * 28)
    assert unknown.returncode == 1 and "no signal or trace" in unknown.stderr

    # kill -9 of the broker: the new one answers from the journal (ack = true hops).
    [bus] = [a for a in d.ctl_json("status")["agents"] if a["name"] == "bus"]
    os.kill(bus["pid"], signal.SIGKILL)
    d.wait_event("agent.restarting", "bus", timeout=10)

    def from_journal() -> dict[str, Any] | None:
        result = d.ctl("trace", TID, "--json")
        return json.loads(result.stdout) if result.returncode == 0 else None

    after = wait_for(from_journal, 15, "the restarted broker's trace")
    got = {r["type"]: r for r in after["records"]}
    assert {"job.submit", "task.text.upper", "job.completed"} <= set(got)
    assert got["job.submit"]["outcome"] == "acked"
    assert got["task.text.upper"]["outcome"] == "replied"


def test_ctl_trace_without_a_daemon_exits_3(daemon_factory) -> None:
    d = daemon_factory('[agents.a]\ncommand = ["true"]\n')  # never started
    result = d.ctl("trace", "x")
    assert result.returncode == 3 and "no agentd bus" in result.stderr
