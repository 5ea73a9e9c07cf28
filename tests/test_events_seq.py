"""Events without gaps: seq and run on every event, `ctl events --since [RUN:]SEQ`, -f.

The ring's rollover is tested in-process on a small `EventLog`, and live on a
daemon whose `daemon.event_history` is small; resuming, the run check and a
daemon that goes away are tested against real daemons through `agentd ctl`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from agentd.daemon.control import Refused, cmd_events
from agentd.daemon.events import HISTORY, RECENT, EventLog, NotHeld
from tests.conftest import DaemonProc, rec, wait_for


def config(d_dir) -> str:
    return f"""
[agents.alpha]
command = {rec(d_dir)}
start_seconds = 0
[agents.beta]
command = {rec(d_dir)}
start_seconds = 0
"""


# --- the ring, in-process ------------------------------------------------------------


def emit_n(log: EventLog, n: int) -> None:
    for i in range(n):
        log.emit("test.tick", "t", i=i)


def test_seq_counts_from_one_and_run_is_per_log() -> None:
    log, other = EventLog(), EventLog()
    emit_n(log, 3)
    assert [e.seq for e in log.history] == [1, 2, 3]
    assert {e.run for e in log.history} == {log.run} and log.run != other.run
    assert ":" not in log.run  # `--since RUN:SEQ` splits on it
    assert HISTORY == 10_000 and RECENT == 100


def test_after_and_rollover() -> None:
    log = EventLog(capacity=50)
    assert log.after(0) == [] and log.oldest == 1
    emit_n(log, 120)  # holds 71..120
    assert (log.oldest, log.newest) == (71, 120)
    assert [e.seq for e in log.after(70)] == list(range(71, 121))
    assert [e.seq for e in log.after(100)] == list(range(101, 121))
    assert log.after(120) == [] and log.after(500) == []
    with pytest.raises(NotHeld, match=r"event 70 is no longer held.*oldest it holds is 71"):
        log.after(69)
    assert [e.seq for e in log.recent(10)] == list(range(111, 121))


def run_events(log: EventLog, args: dict[str, Any], until: int | None = None) -> Any:
    """cmd_events on a real EventLog: the seqs it sent, and its result or refusal.

    With `until`, emits one event at a time while it follows, until it has sent
    that seq, then cancels it (what a ctl going away looks like to the daemon).
    """

    async def scenario() -> tuple[list[int], Any]:
        sent: list[int] = []

        async def send(data: Any) -> bool:
            sent.append(data["seq"])
            return True

        task = asyncio.create_task(cmd_events(SimpleNamespace(events=log), args, send))  # type: ignore[arg-type]
        while until is not None and not task.done() and (not sent or sent[-1] < until):
            await asyncio.sleep(0)
            if log.newest < until:
                log.emit("test.live", "t")
        if until is not None:
            task.cancel()
        try:
            return sent, await task
        except asyncio.CancelledError:
            return sent, None
        except Refused as exc:
            return sent, exc

    return asyncio.run(scenario())


def test_cmd_events_history_bounds_and_rollover() -> None:
    log = EventLog(capacity=50)
    emit_n(log, 30)
    sent, _ = run_events(log, {})
    assert sent == list(range(1, 31))  # fewer than RECENT: all
    emit_n(log, 150)  # 180 emitted; the ring holds 131..180
    sent, _ = run_events(log, {})
    assert sent == list(range(131, 181))
    sent, _ = run_events(log, {"since": 170})
    assert sent == list(range(171, 181))
    sent, _ = run_events(log, {"since": 180})
    assert sent == []  # past the newest: nothing, no error
    sent, refused = run_events(log, {"since": 100})
    assert sent == [] and isinstance(refused, Refused)
    assert "event 101 is no longer held" in str(refused)
    assert f"--since {log.run}:130 goes on from there" in str(refused)
    sent, refused = run_events(log, {"since": 10, "run": "0123abcd"})
    assert isinstance(refused, Refused) and f"this daemon's run is {log.run}" in str(refused)


def test_cmd_events_follow_from_history_into_live_without_gap() -> None:
    log = EventLog(capacity=50)
    emit_n(log, 40)
    sent, _ = run_events(log, {"since": 35, "run": log.run, "follow": True}, until=90)
    assert sent == list(range(36, 91))  # history, then live, across the ring's rollover
    log = EventLog(capacity=50)  # one per event loop, as in the daemon
    emit_n(log, 90)
    sent, _ = run_events(log, {"since": 95, "follow": True}, until=100)
    assert sent == [96, 97, 98, 99, 100]  # waited for seqs past the newest


def test_a_follower_that_falls_behind_the_ring_is_told() -> None:
    log = EventLog(capacity=20)
    emit_n(log, 5)

    async def scenario() -> tuple[list[int], Refused | None]:
        sent: list[int] = []
        gate = asyncio.Event()

        async def send(data: Any) -> bool:
            sent.append(data["seq"])
            if data["seq"] == 3:
                await gate.wait()  # a ctl that stops reading
            return True

        daemon = SimpleNamespace(events=log)
        task = asyncio.create_task(cmd_events(daemon, {"since": 0, "follow": True}, send))  # type: ignore[arg-type]
        while sent[-1:] != [3]:
            await asyncio.sleep(0)
        emit_n(log, 40)  # 45 emitted: the ring holds 26..45
        gate.set()
        try:
            await task
        except Refused as exc:
            return sent, exc
        return sent, None

    sent, refused = asyncio.run(scenario())
    assert sent == [1, 2, 3, 4, 5]  # the batch it had taken, then the gap is refused
    assert refused is not None and "event 6 is no longer held" in str(refused)


# --- against a real daemon ----------------------------------------------------------------


def ctl_cmd(d: DaemonProc, *args: str) -> list[str]:
    return [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(d.config), *args]


def logged(d: DaemonProc) -> list[tuple[int, str, str]]:
    """(seq, event, agent) of every event line in the daemon's JSON log, in order."""
    return [(r["seq"], r["event"], r["agent"]) for r in d.lines if "seq" in r]


def as_rows(lines: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    return [(e["seq"], e["event"], e["name"]) for e in lines]


def read_until(stream: subprocess.Popen[str], seq: int) -> list[dict[str, Any]]:
    """Lines of a `ctl events -f` until the one with `seq` (then stop reading)."""
    assert stream.stdout is not None
    out: list[dict[str, Any]] = []
    while not out or out[-1]["seq"] < seq:
        line = stream.stdout.readline()
        assert line, f"stream ended after {out[-1:]}"
        out.append(json.loads(line))
    return out


def stop(stream: subprocess.Popen[str]) -> None:
    stream.send_signal(signal.SIGINT)
    assert stream.wait(5) == 0


def test_resume_with_since_sees_every_event_once_in_order(daemon_factory, tmp_path) -> None:
    d = daemon_factory(config(tmp_path / "rec")).start()
    first = subprocess.Popen(
        ctl_cmd(d, "events", "--since", "0", "-f"), stdout=subprocess.PIPE, text=True
    )
    try:
        a = read_until(first, 3)  # read a few, then stop reading mid-history
    finally:
        stop(first)
    run = a[0]["run"]
    assert d.ctl("restart", "alpha").returncode == 0
    d.wait_event("agent.ready", "alpha", count=2)
    newest = max(s for s, _, _ in logged(d))
    second = subprocess.Popen(
        ctl_cmd(d, "events", "--since", f"{run}:{a[-1]['seq']}", "-f"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        b = read_until(second, newest)  # the rest of the history, then live
    finally:
        stop(second)
    assert d.ctl("restart", "beta").returncode == 0
    d.wait_event("agent.ready", "beta", count=2)
    rest = d.ctl("events", "--since", f"{run}:{b[-1]['seq']}")
    assert rest.returncode == 0, rest.stderr
    c = [json.loads(line) for line in rest.stdout.splitlines()]
    seen = a + b + c
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))  # no gap, no repeat
    assert {e["run"] for e in seen} == {run}
    # The same events, in the order the daemon's JSON log has them.
    wait_for(lambda: as_rows(seen) == logged(d), what="the log to agree")
    assert ("agent.exited", "beta") in {(e, n) for _, e, n in as_rows(c)}


def test_since_past_the_newest_prints_nothing_or_waits(daemon_factory, tmp_path) -> None:
    d = daemon_factory(config(tmp_path / "rec")).start()
    newest = max(s for s, _, _ in logged(d))
    ahead = d.ctl("events", "--since", str(newest + 50))
    assert (ahead.returncode, ahead.stdout) == (0, "")
    follower = subprocess.Popen(
        ctl_cmd(d, "events", "--since", str(newest + 1), "-f"), stdout=subprocess.PIPE, text=True
    )
    try:
        assert d.ctl("restart", "alpha").returncode == 0
        got = read_until(follower, newest + 2)
    finally:
        stop(follower)
    assert [e["seq"] for e in got] == [newest + 2]  # newest + 1 was before --since's SEQ


def test_plain_events_and_usage(daemon_factory, tmp_path) -> None:
    d = daemon_factory(config(tmp_path / "rec")).start()
    out = [json.loads(line) for line in d.ctl("events").stdout.splitlines()]
    wait_for(lambda: as_rows(out) == logged(d), what="all of them (fewer than 100)")
    assert set(out[0]) == {"seq", "run", "time", "event", "name", "data"}
    assert out[0]["seq"] == 1 and out[-1]["event"] == "daemon.ready"
    for bad in ("abc", "-1", "x:", "1.5"):
        assert d.ctl("events", "--since", bad).returncode == 2, bad


def test_daemon_restart_ends_the_stream_and_the_old_run_is_refused(
    daemon_factory, tmp_path
) -> None:
    d = daemon_factory(config(tmp_path / "rec")).start()
    follower = subprocess.Popen(
        ctl_cmd(d, "events", "-f"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        got = read_until(follower, max(s for s, _, _ in logged(d)))
        run = got[0]["run"]
        assert d.stop() == 0
        out, err = follower.communicate(timeout=10)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    got += [json.loads(line) for line in out.splitlines()]
    assert follower.returncode == 3, err
    assert [e["seq"] for e in got] == list(range(1, len(got) + 1))
    assert "event stream lost" in err and f"resume with --since {run}:{got[-1]['seq']}" in err

    again = daemon_factory(config(tmp_path / "rec")).start()
    old = again.ctl("events", "--since", f"{run}:{got[-1]['seq']}")
    assert old.returncode == 1 and old.stdout == ""
    assert f"run {run} is over" in old.stderr
    new_run = json.loads(again.ctl("events").stdout.splitlines()[0])["run"]
    assert new_run != run and f"--since {new_run}:0" in old.stderr
    fresh = [
        json.loads(line)
        for line in again.ctl("events", "--since", f"{new_run}:0").stdout.splitlines()
    ]
    assert fresh[0]["seq"] == 1
    wait_for(lambda: as_rows(fresh) == logged(again), what="the log to agree")


HISTORY_BOUND = 20


def test_since_across_the_daemons_history_rollover(daemon_factory, tmp_path) -> None:
    """A daemon with a 20-event ring, 25 reloads past it: resume inside it, and past its end."""
    d = daemon_factory(f"[daemon]\nevent_history = {HISTORY_BOUND}\n" + config(tmp_path / "rec"))
    d.start()
    for n in range(1, 26):  # one daemon.reloaded each (SIGHUPs sent together would merge)
        d.signal(signal.SIGHUP)
        d.wait_event("daemon.reloaded", count=n)
    newest = max(s for s, _, _ in logged(d))
    oldest = newest - HISTORY_BOUND + 1  # the ring holds oldest..newest
    assert oldest > 1
    run = json.loads(d.ctl("events").stdout.splitlines()[0])["run"]

    held = d.ctl("events", "--since", f"{run}:{oldest - 1}")  # oldest itself is next: held
    assert held.returncode == 0, held.stderr
    got = as_rows([json.loads(line) for line in held.stdout.splitlines()])
    assert got == [row for row in logged(d) if row[0] >= oldest]  # each once, in order
    assert [seq for seq, _, _ in got] == list(range(oldest, newest + 1))

    gone = d.ctl("events", "--since", f"{run}:{oldest - 2}")  # would need oldest - 1: dropped
    assert (gone.returncode, gone.stdout) == (1, "")
    assert f"event {oldest - 1} is no longer held" in gone.stderr
    assert f"the daemon keeps the last {HISTORY_BOUND} events" in gone.stderr
    assert f"--since {run}:{oldest - 1} goes on from there" in gone.stderr
