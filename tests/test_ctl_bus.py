"""`agentd ctl send / publish / request` against a live daemon and its broker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def config() -> str:
    return f"""
[agents.echo]
module = "tests.bus_agents:Worker"
cwd = "{ROOT}"
[agents.rec]
module = "tests.bus_agents:Recorder"
cwd = "{ROOT}"
"""


def recorded(d) -> list[dict]:
    path = d.dir / "rec.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if "type" in r]


def start(daemon_factory, monkeypatch):
    d = daemon_factory(config())
    monkeypatch.setenv("REC_DIR", str(d.dir))
    return d.start()


def test_request_prints_the_reply_as_json(daemon_factory, monkeypatch) -> None:
    d = start(daemon_factory, monkeypatch)
    result = d.ctl("request", "echo", "any.thing", '{"n": [1, 2]}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"n": [1, 2]}
    # A handler that raises: the error reply is a refusal (1), the agent keeps running.
    result = d.ctl("request", "echo", "work.fail", '"x"')
    assert result.returncode == 1 and "cannot do x" in result.stderr
    assert d.ctl("request", "echo", "again").returncode == 0


def test_request_timeout_is_a_refusal(daemon_factory, monkeypatch) -> None:
    d = start(daemon_factory, monkeypatch)
    t0 = time.monotonic()
    result = d.ctl("request", "rec", "work.slow", "1", "--timeout", "0.5")
    assert result.returncode == 1 and "no reply from rec within 0.5s" in result.stderr
    assert time.monotonic() - t0 < 10


def test_send_and_publish_reach_the_agent(daemon_factory, monkeypatch) -> None:
    d = start(daemon_factory, monkeypatch)
    result = d.ctl("send", "rec", "direct.one", '{"a": 1}')
    assert result.returncode == 0 and "sent direct.one to rec" in result.stdout
    result = d.ctl("publish", "note.two", "[3]")
    assert result.returncode == 0, result.stderr
    assert "published note.two to 2 subscribers" in result.stdout  # both route `**`
    wait_for(lambda: len(recorded(d)) == 2, 10, "both signals recorded")
    first, second = recorded(d)
    assert (first["type"], first["data"]) == ("direct.one", {"a": 1})
    assert (second["type"], second["data"]) == ("note.two", [3])
    assert first["source"].startswith("ctl-")


def test_unknown_recipient_and_bad_json(daemon_factory, monkeypatch) -> None:
    d = start(daemon_factory, monkeypatch)
    result = d.ctl("send", "nobody", "x")
    assert result.returncode == 1 and "unknown recipient 'nobody'" in result.stderr
    result = d.ctl("request", "echo", "x", "{not json")
    assert result.returncode == 2 and "not JSON" in result.stderr
    result = d.ctl("request", "echo", "x", "--timeout", "0")
    assert result.returncode == 2


def test_send_held_while_the_agent_restarts(daemon_factory, monkeypatch) -> None:
    d = start(daemon_factory, monkeypatch)
    assert d.ctl("stop", "rec").returncode == 0
    assert d.ctl("send", "rec", "held.one", "1").returncode == 0  # held, not refused
    assert recorded(d) == []
    assert d.ctl("start", "rec").returncode == 0
    wait_for(lambda: [r["type"] for r in recorded(d)] == ["held.one"], 10, "held delivery")


def test_bus_commands_without_a_daemon_exit_3(tmp_path) -> None:
    conf = tmp_path / "agentd.toml"
    conf.write_text(f'[daemon]\nruntime_dir = "{tmp_path}/run"\n')
    (tmp_path / "run").mkdir()
    base = [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(conf)]
    for args in (["send", "a", "t"], ["publish", "t"], ["request", "a", "t"]):
        t0 = time.monotonic()
        result = subprocess.run(base + args, capture_output=True, text=True, timeout=10)
        assert result.returncode == 3 and "no agentd bus" in result.stderr, result.stderr
        assert time.monotonic() - t0 < 2.0
    # A stale socket file with nobody behind it: the probe gives up within 2 s.
    (tmp_path / "run" / "bus.sock").touch()
    t0 = time.monotonic()
    result = subprocess.run([*base, "send", "a", "t"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 3 and "no agentd bus answering" in result.stderr
    assert time.monotonic() - t0 < 2.0


def test_two_ctl_requests_at_once(daemon_factory, monkeypatch) -> None:
    """ctl's bus name is ctl-<pid>: concurrent ctl processes never take each other's name."""
    d = start(daemon_factory, monkeypatch)
    base = [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(d.config)]
    procs = [
        subprocess.Popen([*base, "request", "echo", "n", str(i)], stdout=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=30)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert [json.loads(o) for o in outputs] == [0, 1, 2, 3]


def test_readme_request_to_the_text_pool(daemon_factory) -> None:
    """The README's `ctl request text task.text.upper ...` line, against the hub's workers."""
    d = daemon_factory("""
[agents.text]
module = "agentd.agents.examples.workers:TextWorker"
replicas = 2
ack = true
""").start()
    task = {
        "job": "j1",
        "key": "result",
        "pool": "text",
        "type": "task.text.upper",
        "payload": {"text": "hi"},
    }
    result = d.ctl("request", "text", "task.text.upper", json.dumps(task))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"text": "HI"}
