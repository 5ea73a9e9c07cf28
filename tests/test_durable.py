"""Durable delivery through real daemons: kill -9 the broker, the daemon; floods; backlogs.

A receipt that said "accepted" for an `ack = true` agent is a promise: the
signal is in the journal in state_dir, and it reaches the agent (the Ledger
in tests/bus_agents.py, which writes down every signal it handles) however
the broker or the daemon dies in between. A signal handled twice is only
ever a flagged redelivery.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from agentd.bus import BusError, Client
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def config(sync: str = "batch", **agent: Any) -> str:
    lines = [
        "[daemon]",
        f'journal_sync = "{sync}"',
        "[agents.sink]",
        'module = "tests.bus_agents:Ledger"',
        f'cwd = "{ROOT}"',
        "ack = true",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in agent.items()]
    return "\n".join(lines) + "\n"


def ledger(d) -> list[dict[str, Any]]:
    path = d.dir / "sink.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def bus_pid(d) -> int:
    [row] = [a for a in d.ctl_json("status")["agents"] if a["name"] == "bus"]
    return row["pid"]


class Sender(threading.Thread):
    """Receipted sends, one at a time; remembers which ids the broker accepted."""

    def __init__(self, endpoint: str, count: int) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.count = endpoint, count
        self.accepted: list[str] = []
        self.refused = 0
        self.done = threading.Event()

    def run(self) -> None:
        with Client(self.endpoint, name="loader", receipt_timeout=1.0) as c:
            for i in range(self.count):
                try:
                    [receipt] = c.send_confirmed([("sink", "load.item", i)], window=1)
                except BusError:  # no broker answering (it is being restarted)
                    self.refused += 1
                    time.sleep(0.05)
                    continue
                if receipt.ok:
                    self.accepted.append(receipt.id)
                else:
                    self.refused += 1
        self.done.set()


def half_a_stream(d, monkeypatch) -> Sender:
    """Start the daemon, and 3,000 receipted sends at a 2 ms handler; back at half way."""
    monkeypatch.setenv("REC_DIR", str(d.dir))
    monkeypatch.setenv("LEDGER_SLEEP", "0.002")
    d.start()
    sender = Sender(f"ipc://{d.runtime_dir}/bus.sock", 3000)
    sender.start()
    wait_for(lambda: len(sender.accepted) >= 1500, 30, "half the stream accepted")
    return sender


def check_promise(d, accepted: list[str]) -> dict[str, int]:
    """Every accepted id reaches the ledger; every repeat of an id is flagged."""
    wait_for(
        lambda: set(accepted) <= {r["id"] for r in ledger(d)},
        90,
        "every accepted signal in the ledger",
    )
    seen: dict[str, int] = {}
    unflagged = []
    for r in ledger(d):
        seen[r["id"]] = seen.get(r["id"], 0) + 1
        if seen[r["id"]] > 1 and not r["redelivered"]:
            unflagged.append(r)
    assert unflagged == [], f"duplicates not flagged: {unflagged[:3]}"
    return {"accepted": len(accepted), "dups": sum(n - 1 for n in seen.values())}


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["batch", "always"])
def test_kill_9_of_the_broker_loses_no_accepted_signal(daemon_factory, monkeypatch, sync) -> None:
    d = daemon_factory(config(sync))
    sender = half_a_stream(d, monkeypatch)
    os.kill(bus_pid(d), signal.SIGKILL)
    d.wait_event("agent.restarting", "bus", timeout=10)
    assert sender.done.wait(90), "the sender never finished"
    assert (d.state_dir / "bus.journal").exists()
    result = check_promise(d, sender.accepted)
    assert result["accepted"] >= 2900
    print(f"\n[{sync}] broker kill: {result}, refused {sender.refused}")


@pytest.mark.slow
def test_kill_9_of_the_daemon_then_a_new_daemon_loses_none(daemon_factory, monkeypatch) -> None:
    first = daemon_factory(config())
    sender = half_a_stream(first, monkeypatch)
    assert first.popen is not None
    os.kill(first.popen.pid, signal.SIGKILL)
    first.wait()
    second = daemon_factory(config())
    second.start(wait_ready=True)
    assert sender.done.wait(120), "the sender never finished"
    result = check_promise(second, sender.accepted)
    assert result["accepted"] >= 2000  # the rest were refused (or unanswered) while it was down
    print(f"\ndaemon kill: {result}, refused {sender.refused}")


@pytest.mark.slow
def test_a_flood_at_a_busy_agent_is_bounded_and_never_taken_for_hung(
    daemon_factory, monkeypatch
) -> None:
    """100,000 signals at a 10 ms def handler: the broker keeps max_pending, hands out
    max_in_flight, says "full" for the rest; the agent keeps its heartbeat and is
    never restarted."""
    # 200 in flight x 10 ms = 2 s of def handlers in hand, twice the heartbeat: only
    # heartbeats between handlers keep the agent from being taken for hung.
    d = daemon_factory(config(max_in_flight=200, max_pending=2000, heartbeat=1.0))
    monkeypatch.setenv("REC_DIR", str(d.dir))
    monkeypatch.setenv("LEDGER_SLEEP", "0.01")
    d.start()
    bus = psutil.Process(bus_pid(d))
    rss_before = bus.memory_info().rss
    peak_in_flight = 0
    with Client(f"ipc://{d.runtime_dir}/bus.sock", name="flooder") as c:
        receipts = []
        for start in range(0, 100_000, 10_000):
            batch = [("sink", "flood.item", i) for i in range(start, start + 10_000)]
            receipts += c.send_confirmed(batch, window=256)
            peak_in_flight = max(peak_in_flight, c.stats()["in_flight_now"])
        accepted = [r for r in receipts if r.ok]
        full = [r for r in receipts if not r.ok]
        assert full and all("full" in (r.error or "") for r in full)
        # max_pending, plus what the agent finished meanwhile
        assert 2000 <= len(accepted) <= 2000 + len(ledger(d))
        deadline = time.monotonic() + 3.0  # three heartbeats of a working agent
        while time.monotonic() < deadline:
            peak_in_flight = max(peak_in_flight, c.stats()["in_flight_now"])
            time.sleep(0.05)
        stats = c.stats()
    rss_after = bus.memory_info().rss
    print(
        f"\nflood: accepted {len(accepted)}, full {len(full)}, peak in flight {peak_in_flight},"
        f" broker RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
    )
    assert peak_in_flight <= 200
    assert stats["pending_now"] + stats["in_flight_now"] <= 2000
    assert rss_after - rss_before < 64 * 2**20
    assert d.events("agent.hung", "sink") == [] and d.events("agent.exited", "sink") == []
    assert len(d.events("agent.ready", "sink")) == 1
    assert len(ledger(d)) > 100  # it was working all along


def test_an_ack_agent_far_behind_gets_everything_nothing_stranded(daemon_factory, monkeypatch):
    """More than the broker's queue limit (10,000) behind, sent in batches without
    receipts: all of it arrives once the agent catches up."""
    d = daemon_factory(config(max_pending=50_000))
    monkeypatch.setenv("REC_DIR", str(d.dir))
    d.start()
    with Client(f"ipc://{d.runtime_dir}/bus.sock", name="batcher") as c:
        for start in range(0, 20_000, 500):
            c.send_batch([("sink", "batch.item", i) for i in range(start, start + 500)])
        c.stats()  # the broker has routed them all
        wait_for(lambda: len({r["id"] for r in ledger(d)}) >= 20_000, 60, "all 20,000 handled")
        wait_for(lambda: c.stats()["pending_now"] + c.stats()["in_flight_now"] == 0, 10, "drained")
        stats = c.stats()
    assert stats["held_now"] == 0 and stats["errors"] == 0
    assert len(ledger(d)) == 20_000  # each once


@pytest.fixture
def small_state_dir(tmp_path: Path):
    """tmp/state on a 2 MiB tmpfs of its own (root only): a disk that can fill up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    state = tmp_path / "state"
    state.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield state
    subprocess.run(["umount", "-l", str(state)], check=False)


def test_a_full_disk_turns_receipts_into_errors_never_a_false_accepted(
    small_state_dir, daemon_factory, monkeypatch
) -> None:
    d = daemon_factory(config() + agent_free())
    monkeypatch.setenv("REC_DIR", str(d.dir))
    d.start()
    filler = small_state_dir / "filler"
    with Client(f"ipc://{d.runtime_dir}/bus.sock", name="filler", receipt_timeout=5) as c:
        c.send("sink", "before", 0)
        free = shutil.disk_usage(small_state_dir).free
        filler.write_bytes(b"\0" * max(0, free - 200_000))
        accepted, refused = [], []
        for i in range(40):  # 40 x 20 KB: past the 200 KB left
            [r] = c.send_confirmed([("sink", "big", {"i": i, "pad": "x" * 20_000})], window=1)
            (accepted if r.ok else refused).append(r)
        assert refused and all(r.error == "journal unavailable" for r in refused)
        c.send("free", "still.works", 1)  # agents without ack keep working
        d.wait_event("bus.journal_unavailable", timeout=10)
        filler.unlink()
        wait_for(lambda: c.send_confirmed([("sink", "after", 1)], window=1)[0].ok, 10, "recovery")
        d.wait_event("bus.journal_recovered", timeout=10)
    assert len(d.events("bus.journal_unavailable")) == 1  # once per episode
    handled = {r["id"] for r in ledger(d)}
    wait_for(lambda: {r.id for r in accepted} <= {x["id"] for x in ledger(d)}, 20, "accepted")
    assert not {r.id for r in refused} & handled  # nothing refused was delivered


def agent_free() -> str:
    return (
        "\n".join(["[agents.free]", 'module = "tests.bus_agents:Recorder"', f'cwd = "{ROOT}"'])
        + "\n"
    )


def test_a_corrupt_journal_is_moved_aside_and_reported(daemon_factory, monkeypatch) -> None:
    d = daemon_factory(config())
    monkeypatch.setenv("REC_DIR", str(d.dir))
    d.state_dir.mkdir(parents=True, exist_ok=True)
    garbage = b"\x10\x00\x00\x00\xde\xad\xbe\xef" + b"not a record" * 4
    (d.state_dir / "bus.journal").write_bytes(garbage)
    d.start()
    event = d.wait_event("bus.journal_corrupt", timeout=10)
    moved = Path(event["moved_to"])
    assert moved.read_bytes() == garbage  # kept as it was, for a post-mortem
    with Client(f"ipc://{d.runtime_dir}/bus.sock", name="after") as c:
        c.send("sink", "fresh.start", 1)  # a new journal works
    wait_for(lambda: ledger(d), 10, "the signal handled")


def test_a_reload_that_removes_an_ack_agent_drops_its_entries_and_says_how_many(
    daemon_factory, monkeypatch
) -> None:
    d = daemon_factory(config() + agent_free())
    monkeypatch.setenv("REC_DIR", str(d.dir))
    d.start()
    assert d.ctl("stop", "sink").returncode == 0
    with Client(f"ipc://{d.runtime_dir}/bus.sock", name="keeper") as c:
        receipts = c.send_confirmed([("sink", "kept.item", i) for i in range(7)])
        assert all(r.ok for r in receipts)
    d.rewrite(agent_free())
    result = d.ctl("reload")
    assert result.returncode == 0, result.stderr
    event = d.wait_event("bus.dropped", "sink", timeout=10)
    assert event["count"] == 7


def test_a_stop_and_start_of_the_daemon_keeps_what_waits(daemon_factory, monkeypatch) -> None:
    first = daemon_factory(config())
    monkeypatch.setenv("REC_DIR", str(first.dir))
    first.start()
    assert first.ctl("stop", "sink").returncode == 0  # down: what comes now waits for it
    with Client(f"ipc://{first.runtime_dir}/bus.sock", name="keeper") as c:
        accepted = [r.id for r in c.send_confirmed([("sink", "wait", i) for i in range(5)])]
    assert first.stop() == 0
    second = daemon_factory(config())
    second.start()
    wait_for(lambda: {r["id"] for r in ledger(second)} == set(accepted), 10, "all five")
