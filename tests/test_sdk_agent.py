"""The agent SDK as agentd runs it: `python -m agentd.agents tests.bus_agents:Class`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from agentd.bus import BusError
from agentd.bus.link import AgentEntry
from tests.conftest_bus import ROOT, wait_for


def entry(name: str) -> AgentEntry:
    return AgentEntry(name=name, pool=None, subscribe=[], ack=False, heartbeat=10.0)


def test_setup_runs_once_before_ready(bus) -> None:
    bus.table(entry("a"))
    proc = bus.agent("a", incarnation=3)
    first = bus.records("a")[0]
    assert first == {"setup": 3, "pid": proc.pid}  # written before READY was sent
    c = bus.client("tx")
    c.request("a", "x", 1)
    assert [r for r in bus.records("a") if "setup" in r] == [first]


def test_handler_that_raises_is_an_error_reply_and_the_agent_lives(bus) -> None:
    bus.table(entry("w"))
    proc = bus.agent("w", "Worker")
    c = bus.client("tx")
    with pytest.raises(BusError, match="ValueError: cannot do 7"):
        c.request("w", "work.fail", 7)
    assert c.request("w", "other", [1]) == [1]  # a def handler's return value
    assert proc.poll() is None
    log = (bus.dir / "w.log").read_text()
    assert "Traceback" in log and "cannot do 7" in log


def test_ctx_request_and_emit_from_a_handler(bus) -> None:
    bus.table(entry("relay"), entry("echo"))
    bus.agent("relay", "Relay")
    bus.agent("echo")
    c = bus.client("tx")
    answer = c.request("relay", "relay.request", {"to": "echo", "value": 7})
    assert answer == {"got": 7, "by": "echo"}
    wait_for(lambda: any(r["type"] == "relay.done" for r in bus.got("echo")), 5, "the emit")
    with pytest.raises(BusError, match="unknown recipient"):
        c.request("relay", "relay.request", {"to": "nobody", "value": 1})


def test_sigterm_finishes_the_handler_then_exits_0(bus) -> None:
    bus.table(entry("w"))
    proc = bus.agent("w", "Worker")
    c = bus.client("tx")
    c.send("w", "work.finish", None)  # a 1 s async handler
    wait_for(lambda: any(r.get("started") for r in bus.got("w")), 5, "the handler to start")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 0
    assert any(r.get("finished") for r in bus.got("w"))
    bus.link.wait_event("disconnected", "w", 0)


def test_the_agent_runner_needs_the_bus_endpoint() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    result = subprocess.run(
        [sys.executable, "-m", "agentd.agents", "tests.bus_agents:Recorder"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "AGENTD_BUS" in result.stderr
