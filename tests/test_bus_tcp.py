"""A tcp bus and control socket with CurveZMQ keys, through a real daemon."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from agentd.bus import BusTimeout, Client
from agentd.bus.keys import SERVER, create_keypair, create_keys_dir

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_bus_and_control_with_keys(daemon_factory, tmp_path) -> None:
    keys = tmp_path / "keys"
    create_keys_dir(keys)
    bus = f"tcp://127.0.0.1:{free_port()}"
    d = daemon_factory(f"""
[agents.echo]
module = "tests.bus_agents:Worker"
cwd = "{ROOT}"
""")
    text = d.config.read_text()
    head = f'bus = "{bus}"\ncontrol = "tcp://127.0.0.1:{free_port()}"\nkeys_dir = "{keys}"\n'
    d.config.write_text(text.replace("[daemon]\n", "[daemon]\n" + head, 1))
    d.start()  # the SDK agent got READY through the curve-secured bus

    result = d.ctl("request", "echo", "x", '{"over": "tcp"}')  # ctl uses the keys too
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"over": "tcp"}
    assert {a["name"] for a in d.ctl_json("status")["agents"]} == {"echo", "bus"}

    with Client(bus, name="trusted", keys_dir=str(keys)) as c:
        assert c.request("echo", "y", 1) == 1

    # A client whose key is not in keys/allowed: the handshake fails, it gets nothing.
    stranger = tmp_path / "stranger"
    create_keypair(stranger, "ctl")
    (stranger / f"{SERVER}.key").write_bytes((keys / f"{SERVER}.key").read_bytes())
    c = Client(bus, name="stranger", keys_dir=str(stranger), receipt_timeout=1.0)
    try:
        with pytest.raises(BusTimeout):
            c.send("echo", "z", 1)
    finally:
        c.close(linger=0)
    # And no key at all is refused before anything is sent.
    with pytest.raises(Exception, match="keys"):
        Client(bus, name="nokeys")


def test_broker_that_cannot_bind_backs_off(daemon_factory, tmp_path) -> None:
    """The bus port is taken: the broker is retried with growing delays, not in a loop."""
    keys = tmp_path / "keys"
    create_keys_dir(keys)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = daemon_factory('[agents.a]\ncommand = ["/bin/sleep", "60"]\nstart_seconds = 0\n')
        text = d.config.read_text()
        head = f'bus = "tcp://127.0.0.1:{port}"\nkeys_dir = "{keys}"\n'
        d.config.write_text(text.replace("[daemon]\n", "[daemon]\n" + head, 1))
        d.start(wait_ready=False)
        d.wait_event("agent.restarting", "bus", count=5, timeout=15)
        delays = [e["delay"] for e in d.events("agent.restarting", "bus")]
        # A first failure slower than QUICK (a loaded machine's interpreter start) counts
        # as a broker that ran: no delay for it. From the first quick failure on, doubling.
        while delays and delays[0] == 0.0:
            delays.pop(0)
        assert delays[:3] == [0.1, 0.2, 0.4], delays
        assert d.stop() == 0  # SIGTERM while the broker is still failing: a clean exit
        assert not d.events("agent.starting", "a")  # the tree never started without a bus
