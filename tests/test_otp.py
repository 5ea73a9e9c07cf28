"""OTP conformance with real processes: group restarts, auto_shutdown, shutdown = infinity.

The pure rules are in test_tree.py; these check that the daemon carries them out
(the exit status of a tree that ended its own work, the restarted transient child).
"""

from __future__ import annotations

import json
import os
import signal
from datetime import datetime

from tests.conftest import rec, wait_for

# Runs until stopped; exits 0 by itself on its first incarnation only.
ONCE = json.dumps(
    ["sh", "-c", 'test "$AGENTD_INCARNATION" = 0 && exit 0; exec sleep 1000'],
)
LONG = json.dumps(["sleep", "1000"])


def job(seconds: float) -> str:
    return json.dumps(["sh", "-c", f"sleep {seconds}"])


def test_root_auto_shutdown_any_significant_exits_0(daemon_factory) -> None:
    d = daemon_factory(
        f"""
[supervisor]
auto_shutdown = "any_significant"
children = ["web", "main"]
[agents.web]
command = {LONG}
start_seconds = 0
[agents.main]
command = {job(0.5)}
start_seconds = 0
restart = "transient"
significant = true
"""
    ).start()
    assert d.wait(15) == 0
    assert d.events("supervisor.auto_shutdown", "root")
    assert d.events("agent.exited", "web")[-1]["reason"] == "stopped"


def test_nested_all_significant_ends_the_tree(daemon_factory) -> None:
    d = daemon_factory(
        f"""
[supervisor]
auto_shutdown = "any_significant"
children = ["web", "batch"]
[supervisors.batch]
auto_shutdown = "all_significant"
restart = "transient"
significant = true
children = ["j1", "j2"]
[agents.web]
command = {LONG}
start_seconds = 0
[agents.j1]
command = {job(0.2)}
start_seconds = 0
restart = "transient"
significant = true
[agents.j2]
command = {job(1.0)}
start_seconds = 0
restart = "transient"
significant = true
"""
    ).start()
    assert d.wait(15) == 0
    ended = [e["agent"] for e in d.events("supervisor.auto_shutdown")]
    assert ended == ["batch", "root"]
    # batch waited for both jobs: j2's own exit came before batch's shutdown.
    j2 = d.events("agent.exited", "j2")[-1]
    assert j2["reason"] == "exit" and j2["code"] == 0


def test_one_for_all_starts_a_transient_child_that_had_ended(daemon_factory) -> None:
    d = daemon_factory(
        f"""
[supervisor]
strategy = "one_for_all"
children = ["a", "t", "c"]
[agents.a]
command = {LONG}
start_seconds = 0
[agents.t]
command = {ONCE}
start_seconds = 0
restart = "transient"
[agents.c]
command = {LONG}
start_seconds = 0
"""
    ).start()
    wait_for(lambda: d.events("agent.exited", "t"), 10, "t to end normally")
    assert d.events("agent.exited", "t")[0]["code"] == 0
    d.ctl("stop", "c")  # ctl stop is not a failure; a kill is
    d.ctl("start", "c")
    os.kill(d.pid("c"), signal.SIGKILL)
    wait_for(lambda: len(d.events("agent.ready", "t")) >= 2, 10, "t started again")
    status = {r["name"]: r for r in d.ctl_json("status", "--json")["agents"]}
    assert status["t"]["state"] == "running"
    assert status["t"]["restarts"] == 1


def test_shutdown_infinity_is_never_killed(daemon_factory, tmp_path) -> None:
    # Takes a second to stop after SIGTERM; says when its trap is set.
    slow = json.dumps(
        [
            "sh",
            "-c",
            'trap "sleep 1; exit 0" TERM; touch "$0.$AGENTD_NAME"; while :; do sleep 0.1; done',
            str(tmp_path / "trap"),
        ]
    )
    d = daemon_factory(
        f"""
[agents.patient]
command = {slow}
start_seconds = 0
shutdown = "infinity"
[agents.hasty]
command = {slow}
start_seconds = 0
shutdown = 0.3
"""
    ).start()
    for name in ("patient", "hasty"):
        wait_for(lambda n=name: (tmp_path / f"trap.{n}").exists(), 10, f"{name}'s trap")
    assert d.stop() == 0
    patient = d.events("agent.exited", "patient")[-1]
    hasty = d.events("agent.exited", "hasty")[-1]
    assert (patient["code"], patient["signal"]) == (0, None)
    assert hasty["signal"] == "SIGKILL"


def test_a_pools_members_stop_together_and_the_next_child_waits_for_all(
    daemon_factory, tmp_path
) -> None:
    """As they start: a stop of the tree stops a pool's members at once, not in turn,
    and the child configured before the pool stops only once every member is down."""
    d = daemon_factory(
        f"""
[supervisor]
children = ["first", "pool"]
[agents.first]
command = {rec(tmp_path / "rec")}
start_seconds = 0.1
[agents.pool]
command = {rec(tmp_path / "rec", "--ignore-term")}
start_seconds = 0.1
shutdown = 1.0
replicas = 4
"""
    ).start()
    started = tmp_path / "rec" / "started"  # written once its SIGTERM handler is in place
    wait_for(lambda: started.exists() and len(started.read_text().split("\n")) > 5, 10)
    assert d.stop() == 0
    exits = {e["agent"]: e for e in d.events("agent.exited")}
    pool = [exits[f"pool@{i}"] for i in range(4)]
    assert all(e["reason"] == "stopped" and e["signal"] == "SIGKILL" for e in pool)
    # Each ignores SIGTERM for its 1 s grace: in turn, their ends would be a second
    # apart or more; together, all four graces run at once.
    stamps = sorted(_at(e) for e in pool)
    assert stamps[-1] - stamps[0] < 1.0
    order = [e["agent"] for e in d.events("agent.exited") if e["agent"] != "bus"]
    assert order[-1] == "first"  # after the whole pool


def _at(record: dict) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
