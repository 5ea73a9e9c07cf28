"""`agentd ctl` against a live daemon: every command, JSON shapes, exit codes, reload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import alive, rec, wait_for

STATUS_KEYS = {
    "name",
    "state",
    "pid",
    "uptime",
    "restarts",
    "supervisor",
    "last_exit",
    "rss",
    "cpu",
    "held",
    "in_flight",
}


def base(d_dir) -> str:
    return f"""
[supervisor]
children = ["alpha", "workers"]
[supervisors.workers]
strategy = "one_for_one"
children = ["pool"]
[agents.alpha]
command = {rec(d_dir)}
start_seconds = 0
[agents.pool]
command = {rec(d_dir)}
start_seconds = 0
replicas = 2
"""


def by_name(status: dict) -> dict[str, dict]:
    return {a["name"]: a for a in status["agents"]}


def test_status_json_shape_and_table(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    status = d.ctl_json("status")
    rows = by_name(status)
    assert {"alpha", "pool@0", "pool@1"} <= set(rows)
    for row in status["agents"]:
        assert set(row) == STATUS_KEYS
    alpha = rows["alpha"]
    assert alpha["state"] == "running" and alpha["pid"] == d.pid("alpha")
    assert alpha["supervisor"] == "root" and rows["pool@1"]["supervisor"] == "workers"
    assert alpha["restarts"] == 0 and alpha["last_exit"] is None
    assert alpha["rss"] > 0 and isinstance(alpha["uptime"], float)
    only = d.ctl_json("status", "pool")
    assert [a["name"] for a in only["agents"]] == ["pool@0", "pool@1"]
    table = d.ctl("status")
    assert table.returncode == 0
    header, *lines = table.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "PID"]
    assert any(line.split()[:2] == ["alpha", "running"] for line in lines)
    assert "\x1b[" not in table.stdout  # no colour when not a terminal


def test_status_shows_last_exit_and_restarts(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    os.kill(d.pid("alpha"), signal.SIGKILL)
    d.wait_event("agent.ready", "alpha", count=2)
    alpha = by_name(d.ctl_json("status", "alpha"))["alpha"]
    assert alpha["restarts"] == 1
    assert alpha["last_exit"] == {"code": None, "signal": "SIGKILL", "reason": "signal"}


def test_tree_draws_strategies_and_states(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    out = d.ctl("tree").stdout
    assert out.splitlines()[0].startswith("root [one_for_one, 3 in 5s] running")
    assert "workers [one_for_one" in out and "pool@1 (permanent) running" in out


def test_stop_keeps_permanent_agent_down_until_start(daemon_factory, tmp_path) -> None:
    d = daemon_factory(
        base(tmp_path / "rec").replace("[supervisor]\n", "[supervisor]\nmax_restarts = 0\n")
    ).start()
    pid = d.pid("alpha")
    result = d.ctl("stop", "alpha")
    assert result.returncode == 0 and "alpha: stopped" in result.stdout
    assert not alive(pid)  # returns once the change is done
    row = by_name(d.ctl_json("status", "alpha"))["alpha"]
    assert row["state"] == "stopped" and row["last_exit"]["reason"] == "stopped"
    time.sleep(0.5)
    assert len(d.events("agent.starting", "alpha")) == 1  # not restarted
    assert d.popen.poll() is None  # max_restarts=0 and still running: not counted
    result = d.ctl("start", "alpha")
    assert result.returncode == 0
    row = by_name(d.ctl_json("status", "alpha"))["alpha"]
    assert row["state"] == "running" and row["pid"] != pid and alive(row["pid"])


def test_restart_gives_new_pid(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    before = d.pids(["alpha", "pool@0"])
    assert d.ctl("restart", "alpha").returncode == 0
    after = by_name(d.ctl_json("status"))
    assert after["alpha"]["pid"] != before["alpha"]
    assert after["pool@0"]["pid"] == before["pool@0"]


def test_refusals_and_usage(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    unknown = d.ctl("stop", "nobody")
    assert unknown.returncode == 1 and "unknown agent `nobody`" in unknown.stderr
    assert d.ctl("scale", "alpha", "3").returncode == 1  # not a pool
    assert d.ctl("logs", "nobody").returncode == 1
    assert d.ctl("bogus-command").returncode == 2
    assert d.ctl("scale", "pool", "many").returncode == 2


def test_scale_up_and_down(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    keep = d.pid("pool@0")
    up = d.ctl("scale", "pool", "4")
    assert up.returncode == 0 and "added: pool@2, pool@3" in up.stdout
    rows = by_name(d.ctl_json("status", "pool"))
    assert [rows[f"pool@{i}"]["state"] for i in range(4)] == ["running"] * 4
    top = rows["pool@3"]["pid"]
    down = d.ctl("scale", "pool", "1")
    assert down.returncode == 0 and "removed: pool@1, pool@2, pool@3" in down.stdout
    assert not alive(top)
    stopped = [e["agent"] for e in d.events("agent.exited")]
    assert sorted(stopped) == ["pool@1", "pool@2", "pool@3"]  # stopped together, as a pool
    assert [a["name"] for a in d.ctl_json("status", "pool")["agents"]] == ["pool@0"]
    assert d.pid("pool@0") == keep


def test_logs_and_events(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    wait_for(lambda: len(d.started()) == 3)
    logs = d.ctl("logs", "alpha", "-n", "5")
    assert logs.returncode == 0 and logs.stdout == "alpha up\n"
    events = [json.loads(line) for line in d.ctl("events").stdout.splitlines()]
    assert {"time", "event", "name", "data"} <= set(events[0])
    assert [e["event"] for e in events][-1] == "daemon.ready"


def test_events_and_logs_follow(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    cmd = [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(d.config)]
    follower = subprocess.Popen([*cmd, "events", "-f"], stdout=subprocess.PIPE, text=True)
    logs = subprocess.Popen(
        [*cmd, "logs", "alpha", "-f", "-n", "1"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert follower.stdout is not None and logs.stdout is not None
        # Both print their history first; once it is out, they are following.
        assert logs.stdout.readline() == "alpha up\n"
        while json.loads(follower.stdout.readline())["event"] != "daemon.ready":
            pass
        os.kill(d.pid("alpha"), signal.SIGKILL)
        seen = [json.loads(follower.stdout.readline())]
        while not (seen[-1]["event"] == "agent.ready" and seen[-1]["name"] == "alpha"):
            seen.append(json.loads(follower.stdout.readline()))
        assert [e["event"] for e in seen if e["name"] == "alpha"] == [
            "agent.exited",
            "agent.restarting",
            "agent.starting",
            "agent.ready",
        ]
        assert logs.stdout.readline() == "alpha up\n"  # the new incarnation's output, live
    finally:
        for p in (follower, logs):
            p.send_signal(signal.SIGINT)
            assert p.wait(5) == 0


def test_no_daemon_exits_3_quickly(tmp_path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(f'[daemon]\nruntime_dir = "{tmp_path}/run"\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "control.sock").touch()  # a stale socket file: nobody behind it
    for args in (["status"], ["stop", "x"], ["events", "-f"]):
        t0 = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert result.returncode == 3, result.stderr
        # Not a hang: the ack timeout (1 s) and an interpreter start, with room for load.
        assert time.monotonic() - t0 < 5.0
        assert "no agentd answering" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "run" / "control.sock").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(config), "status"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 3


def test_reload_add_remove_change_unchanged(daemon_factory, tmp_path) -> None:
    r = tmp_path / "rec"
    d = daemon_factory(f"""
[agents.same]
command = {rec(r)}
start_seconds = 0
[agents.changes]
command = {rec(r)}
start_seconds = 0
[agents.goes]
command = {rec(r)}
start_seconds = 0
""").start()
    before = d.pids(["same", "changes", "goes"])
    d.rewrite(f"""
[agents.same]
command = {rec(r)}
start_seconds = 0
[agents.changes]
command = {rec(r)}
start_seconds = 0
env = {{ NEW = "1" }}
[agents.comes]
command = {rec(r)}
start_seconds = 0
""")
    result = d.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert "added: comes" in result.stdout
    assert "removed: goes" in result.stdout
    assert "changed: changes" in result.stdout
    rows = by_name(d.ctl_json("status"))
    assert set(rows) == {"same", "changes", "comes", "bus"}
    assert rows["bus"]["supervisor"] is None and rows["bus"]["state"] == "running"
    assert rows["same"]["pid"] == before["same"]
    assert rows["changes"]["pid"] != before["changes"] and rows["changes"]["state"] == "running"
    assert rows["comes"]["state"] == "running"
    assert not alive(before["goes"])
    d.wait_event("daemon.reloaded")


def test_invalid_reload_changes_nothing(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    before = {a["name"]: a["pid"] for a in d.ctl_json("status")["agents"]}
    d.config.write_text(d.config.read_text() + "\n[agents.alpha2]\nrestrat = 1\n")
    result = d.ctl("reload")
    assert result.returncode == 1
    assert f"{d.config}:" in result.stderr and "restrat" in result.stderr
    after = {a["name"]: a["pid"] for a in d.ctl_json("status")["agents"]}
    assert after == before


def test_sighup_reloads(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    d.config.write_text(
        d.config.read_text()
        + f"\n[agents.late]\ncommand = {rec(tmp_path / 'rec')}\nstart_seconds = 0\n"
    )
    d.config.write_text(
        d.config.read_text().replace(
            'children = ["alpha", "workers"]', 'children = ["alpha", "workers", "late"]'
        )
    )
    d.signal(signal.SIGHUP)
    d.wait_event("daemon.reloaded")
    assert by_name(d.ctl_json("status", "late"))["late"]["state"] == "running"


def test_shutdown_command_stops_everything(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    pids = [a["pid"] for a in d.ctl_json("status")["agents"] if a["pid"]]
    result = d.ctl("shutdown")
    assert result.returncode == 0
    assert not any(alive(p) for p in pids)
    assert d.wait(10) == 0
    assert not (d.runtime_dir / "control.sock").exists()


def test_second_daemon_on_same_socket_refuses(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    result = subprocess.run(
        [sys.executable, "-m", "agentd.daemon.cli", "run", "--config", str(d.config)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1
    assert "already answering" in result.stderr
    assert d.ctl("status").returncode == 0


def test_runtime_dir_and_socket_modes(daemon_factory, tmp_path) -> None:
    d = daemon_factory(base(tmp_path / "rec")).start()
    assert (d.runtime_dir.stat().st_mode & 0o777) == 0o750
    assert ((d.runtime_dir / "control.sock").stat().st_mode & 0o777) == 0o660
