"""Endpoints: one parser, and every process that takes one refuses a bad one clearly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.bus import BusError, Client
from agentd.bus.endpoint import Endpoint, parse_endpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("ipc:///run/agentd/control.sock", {"path": "/run/agentd/control.sock"}),
        ("ipc://bus.sock", {"path": "bus.sock"}),
        ("tcp://127.0.0.1:5555", {"host": "127.0.0.1", "port": 5555}),
        ("tcp://localhost:1", {"host": "localhost", "port": 1}),
        ("tcp://*:65535", {"host": "*", "port": 65535}),
        ("tcp://[::1]:5555", {"host": "::1", "port": 5555}),
    ],
)
def test_parses_ipc_and_tcp(text: str, parts: dict) -> None:
    assert parse_endpoint(text) == Endpoint(text, text[:3], **parts)  # type: ignore[arg-type]


def test_only_tcp_needs_keys() -> None:
    assert parse_endpoint("tcp://127.0.0.1:5555").needs_keys
    assert parse_endpoint("tcp://0.0.0.0:1").needs_keys
    assert not parse_endpoint("ipc:///run/agentd/control.sock").needs_keys


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "is not an endpoint"),
        ("/run/agentd/control.sock", "is not an endpoint"),
        ("ipc://", "needs a socket path"),
        ("tcp://127.0.0.1", "needs a host and a port"),
        ("tcp://:5555", "needs a host and a port"),
        ("tcp://127.0.0.1:0", "from 1 to 65535"),
        ("tcp://127.0.0.1:65536", "from 1 to 65535"),
        ("tcp://127.0.0.1:*", "from 1 to 65535"),
        ("tcp://127.0.0.1:5555/", "from 1 to 65535"),
        ("tcp://127.0.0.1:\u0665\u0665", "from 1 to 65535"),  # digits, but not ASCII
        # ZeroMQ refuses upper-case transports, so a network endpoint spelt TCP://
        # is refused here, not let through as if it were host-local.
        ("TCP://0.0.0.0:1", "unknown transport 'TCP'"),
        ("inproc://bus", "unknown transport 'inproc'"),
        ("ws://127.0.0.1:80", "unknown transport 'ws'"),
    ],
)
def test_bad_endpoints_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_endpoint(text)
    assert needle in str(caught.value) and repr(text) in str(caught.value)


def test_client_refuses_a_bad_endpoint() -> None:
    with pytest.raises(BusError, match=re.escape("bad bus endpoint: 'tcp://127.0.0.1'")):
        Client("tcp://127.0.0.1", name="nobody")


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **env},
        cwd=ROOT,
    )


def test_broker_and_agent_refuse_a_bad_endpoint() -> None:
    broker = run(["-m", "agentd.bus.broker", "--endpoint", "udp://127.0.0.1:5555"])
    assert broker.returncode == 2
    assert "--endpoint: 'udp://127.0.0.1:5555': unknown transport 'udp'" in broker.stderr
    agent = run(["-m", "agentd.agents", "tests.bus_agents:Recorder"], AGENTD_BUS="bus.sock")
    assert agent.returncode == 2
    assert "AGENTD_BUS: 'bus.sock' is not an endpoint" in agent.stderr


def test_ctl_refuses_a_bad_endpoint(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text('[daemon]\ncontrol = "tcp://127.0.0.1:http"\n')
    result = run(["-m", "agentd.daemon.cli", "ctl", "--config", str(config), "status"])
    assert result.returncode == 3
    assert "daemon.control: 'tcp://127.0.0.1:http': the tcp port must be" in result.stderr
