"""The supervision tree on real processes: kill real PIDs, check which ones change."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from tests.conftest import alive, rec, wait_for


def three(d_dir, strategy: str, **kw: str) -> str:
    agents = "".join(
        f"""
[agents.{name}]
command = {rec(d_dir)}
start_seconds = 0.1
restart = "{kw.get(name, "permanent")}"
"""
        for name in ("a", "b", "c")
    )
    return f"""
[supervisor]
strategy = "{strategy}"
max_restarts = 10
max_seconds = 10
children = ["a", "b", "c"]
{agents}
"""


@pytest.mark.parametrize(
    ("strategy", "changed"),
    [("one_for_one", {"b"}), ("one_for_all", {"a", "b", "c"}), ("rest_for_one", {"b", "c"})],
)
def test_kill_9_under_each_strategy(daemon_factory, tmp_path, strategy, changed) -> None:
    d = daemon_factory(three(tmp_path / "rec", strategy)).start()
    before = d.pids(["a", "b", "c"])
    os.kill(before["b"], signal.SIGKILL)
    d.wait_event("agent.exited", "b", where=lambda r: r["signal"] == "SIGKILL")
    for name in changed:
        d.wait_event("agent.ready", name, count=2)
    d.wait_event("agent.ready", "c" if "c" in changed else "b", count=2)
    after = d.pids(["a", "b", "c"])
    assert {n for n in before if before[n] != after[n]} == changed
    assert all(alive(p) for p in after.values())
    assert not alive(before["b"])
    exited = d.events("agent.exited")
    assert exited[0]["agent"] == "b" and exited[0]["reason"] == "signal"
    # Siblings stopped by the strategy go down in reverse start order, with reason "stopped".
    assert [e["agent"] for e in exited[1:]] == [n for n in ("c", "a") if n in changed]
    assert all(e["reason"] == "stopped" for e in exited[1:])


@pytest.mark.parametrize(("code", "restarted"), [(0, False), (1, True)])
def test_transient_exit_code(daemon_factory, tmp_path, code, restarted) -> None:
    d = daemon_factory(
        f"""
[agents.t]
command = {rec(tmp_path / "rec", "--exit-after", "0.5", "--code", str(code))}
restart = "transient"
start_seconds = 0.1
[agents.keep]
command = {rec(tmp_path / "rec")}
start_seconds = 0
"""
    ).start()
    d.wait_event("agent.exited", "t")
    if restarted:
        d.wait_event("agent.ready", "t", count=2)
        assert d.events("agent.exited", "t")[0]["code"] == 1
    else:
        # The event log is ordered: a restart would have logged agent.restarting first.
        time.sleep(0.3)
        assert not d.events("agent.restarting", "t")
        assert len(d.events("agent.starting", "t")) == 1
        assert d.events("agent.exited", "t")[0]["code"] == 0


def test_temporary_is_never_restarted(daemon_factory, tmp_path) -> None:
    d = daemon_factory(
        f"""
[agents.tmp]
command = {rec(tmp_path / "rec")}
restart = "temporary"
start_seconds = 0
[agents.marker]
command = {rec(tmp_path / "rec", "--exit-after", "0.3", "--code", "1")}
start_seconds = 0
"""
    ).start()
    os.kill(d.pid("tmp"), signal.SIGKILL)
    d.wait_event("agent.exited", "tmp")
    # marker crashes and restarts twice after tmp's death: a restart of tmp would be before.
    d.wait_event("agent.ready", "marker", count=3)
    assert len(d.events("agent.starting", "tmp")) == 1


def test_intensity_limit_ends_daemon_with_status_1(daemon_factory, tmp_path) -> None:
    d = daemon_factory(
        f"""
[supervisor]
max_restarts = 2
max_seconds = 30
[agents.ok]
command = {rec(tmp_path / "rec")}
start_seconds = 0
[agents.crashy]
command = {rec(tmp_path / "rec", "--exit-after", "0.2", "--code", "3")}
start_seconds = 0
"""
    ).start()
    assert d.wait(timeout=20) == 1
    gave_up = d.events("supervisor.gave_up")
    assert gave_up and gave_up[0]["agent"] == "root"
    report = d.events("daemon.crash_report")
    assert report and "intensity" in report[0]["reason"]
    assert len(d.events("agent.starting", "crashy")) == 3
    assert not alive(d.events("agent.ready", "ok")[0]["pid"])


def test_nested_supervisor_gives_up_and_parent_restarts_it(daemon_factory, tmp_path) -> None:
    d = daemon_factory(
        f"""
[supervisor]
max_restarts = 5
max_seconds = 30
children = ["front", "workers"]
[supervisors.workers]
strategy = "one_for_all"
max_restarts = 1
max_seconds = 30
children = ["w1", "w2"]
[agents.front]
command = {rec(tmp_path / "rec")}
start_seconds = 0
[agents.w1]
command = {rec(tmp_path / "rec")}
start_seconds = 0
[agents.w2]
command = {rec(tmp_path / "rec")}
start_seconds = 0
"""
    ).start()
    front = d.pid("front")
    os.kill(d.pid("w1"), signal.SIGKILL)
    d.wait_event("agent.ready", "w2", count=2)
    os.kill(d.pid("w2"), signal.SIGKILL)
    d.wait_event("supervisor.gave_up", "workers")
    d.wait_event("agent.restarting", "workers")
    d.wait_event("agent.ready", "w2", count=3)
    assert d.pid("front") == front  # one_for_one at the root: front untouched
    assert not d.events("supervisor.gave_up", "root")


def test_reverse_order_stop_on_sigterm(daemon_factory, tmp_path) -> None:
    names = ["first", "second", "third", "fourth"]
    agents = "".join(
        f"[agents.{n}]\ncommand = {rec(tmp_path / 'rec')}\nstart_seconds = 0.05\n" for n in names
    )
    d = daemon_factory(
        f'[supervisor]\nchildren = ["first", "inner", "fourth"]\n'
        f'[supervisors.inner]\nchildren = ["second", "third"]\n{agents}'
    ).start()
    # The daemon's own record of the order: an agent's file write may lag its start.
    assert [e["agent"] for e in d.events("agent.ready") if e["agent"] != "bus"] == names
    # Ready after 50 ms is before a loaded machine has run rec.py's SIGTERM handler.
    wait_for(lambda: len(d.started()) == len(names), 10, "every agent's handler")
    assert d.stop() == 0
    assert d.term_order() == list(reversed(names))
    d.wait_event("daemon.stopping")


def test_agent_ignoring_sigterm_is_killed_after_shutdown(daemon_factory, tmp_path) -> None:
    d = daemon_factory(
        f"""
[agents.stubborn]
command = {rec(tmp_path / "rec", "--ignore-term")}
start_seconds = 0
shutdown = 0.5
"""
    ).start()
    wait_for(lambda: d.started(), 5, "the agent to install its SIGTERM handler")
    t0 = time.monotonic()
    assert d.stop() == 0
    elapsed = time.monotonic() - t0
    exited = d.events("agent.exited", "stubborn")[0]
    assert exited["signal"] == "SIGKILL" and exited["reason"] == "stopped"
    assert d.term_order() == ["stubborn"]  # it did get SIGTERM first
    assert 0.5 <= elapsed < 5


def test_grandchild_dies_with_agent(daemon_factory, tmp_path) -> None:
    d = daemon_factory(
        f"""
[agents.parent]
command = {rec(tmp_path / "rec", "--grandchild")}
start_seconds = 0.2
"""
    ).start()
    grandchild_file = d.dir / "parent.grandchild"
    first = int(wait_for(lambda: grandchild_file.exists() and grandchild_file.read_text()))
    assert alive(first)
    os.kill(d.pid("parent"), signal.SIGKILL)  # the agent crashes; its child must not linger
    wait_for(lambda: not alive(first), 5, "grandchild of crashed agent to die")
    # It was reparented to agentd (a subreaper), which reaps it: no zombie left behind.
    wait_for(lambda: not os.path.exists(f"/proc/{first}"), 5, "its zombie to be reaped")
    d.wait_event("agent.ready", "parent", count=2)
    second = int(grandchild_file.read_text().split()[-1])
    assert alive(second)
    d.stop()
    wait_for(lambda: not alive(second), 5, "grandchild of stopped agent to die")


def test_kill_9_of_daemon_leaves_nothing(daemon_factory, tmp_path) -> None:
    d = daemon_factory(
        f"""
[agents.one]
command = {rec(tmp_path / "rec", "--grandchild")}
start_seconds = 0.2
[agents.two]
command = {rec(tmp_path / "rec", "--grandchild", "--ignore-term")}
start_seconds = 0.2
"""
    ).start()
    pids = list(d.pids(["one", "two"]).values())
    for name in ("one", "two"):
        path = d.dir / f"{name}.grandchild"
        pids.append(int(wait_for(lambda p=path: p.exists() and p.read_text())))
    assert all(alive(p) for p in pids)
    d.signal(signal.SIGKILL)
    d.wait(5)
    wait_for(lambda: not any(alive(p) for p in pids), 5, "every agent and grandchild to die")


def test_memory_limit_kills_with_reason_memory(daemon_factory, tmp_path) -> None:
    d = daemon_factory(
        f"""
[daemon]
memory_check_interval = 0.2
[agents.hog]
command = {rec(tmp_path / "rec", "--alloc-mb", "120")}
start_seconds = 0
limits = {{ memory_mb = 60 }}
"""
    ).start()
    exited = d.wait_event("agent.exited", "hog", timeout=15)
    assert exited["reason"] == "memory"
    d.wait_event("agent.starting", "hog", count=2)


def test_logs_captured_with_stderr_tail(daemon_factory, tmp_path) -> None:
    d = daemon_factory(
        f"""
[agents.talker]
command = {
            rec(
                tmp_path / "rec",
                "--stderr",
                "something broke",
                "--exit-after",
                "0.3",
                "--code",
                "2",
            )
        }
start_seconds = 0.1
"""
    ).start()
    exited = d.wait_event("agent.exited", "talker")
    assert exited["stderr_tail"] == ["something broke"]
    assert exited["code"] == 2 and exited["reason"] == "exit"
    log = d.runtime_dir / "log" / "talker.log"
    text = wait_for(lambda: log.exists() and log.read_text())
    assert "talker up" in text and "something broke" in text
    assert "agent.exited" not in text  # only the agent's own lines


def test_missing_program_is_start_failed_and_fails_the_tree(daemon_factory, tmp_path) -> None:
    # `check` refuses a command that does not resolve; this one does, but its
    # interpreter is missing, so the exec itself fails.
    ghost = tmp_path / "ghost"
    ghost.write_text("#!/nonexistent/interpreter\n")
    ghost.chmod(0o755)
    d = daemon_factory(
        f"""
[agents.ghost]
command = ["{ghost}"]
"""
    ).start(wait_ready=False)
    assert d.wait(10) == 1
    exited = d.events("agent.exited", "ghost")[0]
    assert exited["reason"] == "start_failed"
    assert "No such file or directory" in " ".join(exited["stderr_tail"])


def test_second_sigterm_escalates(daemon_factory, tmp_path) -> None:
    """And restarts nothing: `inner`, whose turn to stop had not come, does not start
    again the child that kill_all killed (an orderly shutdown would let it)."""
    d = daemon_factory(
        f"""
[supervisor]
children = ["inner", "stubborn"]
[supervisors.inner]
children = ["quiet"]
[agents.quiet]
command = {rec(tmp_path / "rec")}
start_seconds = 0
[agents.stubborn]
command = {rec(tmp_path / "rec", "--ignore-term")}
start_seconds = 0
shutdown = 60
"""
    ).start()
    wait_for(lambda: len(d.started()) == 2, 5, "both agents, stubborn with its SIGTERM handler")
    d.signal(signal.SIGTERM)
    wait_for(lambda: d.term_order() == ["stubborn"], 5, "SIGTERM to reach the agent")
    d.signal(signal.SIGTERM)
    assert d.wait(5) == 0
    assert d.events("agent.exited", "stubborn")[0]["signal"] == "SIGKILL"
    assert [e["signal"] for e in d.events("agent.exited", "quiet")] == ["SIGKILL"]
    assert not d.events("agent.restarting") and len(d.events("agent.starting", "quiet")) == 1


def test_log_rotates_by_size(daemon_factory, tmp_path) -> None:
    script = "import sys\nfor i in range(4000): print('x' * 99)\nsys.stdout.flush()\n"
    d = daemon_factory(
        f"""
[daemon]
log_max_bytes = 100000
log_backups = 2
[agents.chatty]
command = ["{sys.executable}", "-c", "{script.encode("unicode_escape").decode()}"]
restart = "transient"
start_seconds = 0
"""
    ).start()
    d.wait_event("agent.exited", "chatty")
    log_dir = d.runtime_dir / "log"
    assert sorted(p.name for p in log_dir.glob("chatty.log*")) == [
        "chatty.log",
        "chatty.log.1",
        "chatty.log.2",
    ]
    assert all(p.stat().st_size <= 100000 for p in log_dir.glob("chatty.log*"))
