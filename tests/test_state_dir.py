"""state_dir (SPEC §10): `agentd check` and `run` refuse one they cannot use, the daemon
creates it, agents are told where it is, and the broker's notices become daemon events."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from agentd.bus.envelope import DAEMON_ID, Notice, encoder
from agentd.bus.link import BrokerLink
from agentd.daemon import spawn
from agentd.daemon.bus import notice_event
from agentd.daemon.events import EventLog
from agentd.daemon.spec import AgentSpec


def agentd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd.daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def config(tmp_path: Path, state_dir: str | None) -> Path:
    path = tmp_path / "agentd.toml"
    daemon = f'[daemon]\nruntime_dir = "{tmp_path}/run"\n'
    if state_dir is not None:
        daemon += f'state_dir = "{state_dir}"\n'
    path.write_text(daemon + '[agents.a]\ncommand = ["/bin/sleep", "60"]\nstart_seconds = 0\n')
    return path


# --- agentd check / run -------------------------------------------------------------------


def test_check_reports_a_state_dir_under_a_regular_file(tmp_path: Path) -> None:
    """Root may write anywhere, but nobody can mkdir under a regular file."""
    (tmp_path / "plain").write_text("not a directory\n")
    state = tmp_path / "plain" / "state"
    path = config(tmp_path, str(state))
    result = agentd("check", "--config", str(path))
    assert result.returncode == 1
    assert f"{path}:3: daemon.state_dir: cannot create {state}: " in result.stderr
    assert f"{tmp_path / 'plain'} is not a directory" in result.stderr


def test_check_reports_a_state_dir_that_is_a_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("")
    path = config(tmp_path, str(state))
    result = agentd("check", "--config", str(path))
    assert result.returncode == 1
    assert f"cannot write {state}: {state} is not a directory" in result.stderr


def test_check_reports_an_unusable_default_state_dir(tmp_path: Path) -> None:
    """No state_dir in the file: the default ($STATE_DIRECTORY here) is checked as well."""
    (tmp_path / "plain").write_text("")
    state = tmp_path / "plain" / "agentd"
    env = dict(os.environ, STATE_DIRECTORY=str(state))
    result = agentd("check", "--config", str(config(tmp_path, None)), env=env)
    assert result.returncode == 1
    assert f"daemon.state_dir (default): cannot create {state}" in result.stderr


def test_check_passes_and_creates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "er" / "state"
    result = agentd("check", "--config", str(config(tmp_path, str(state))))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "deep").exists()  # check only looks; the daemon creates it


def test_run_refuses_an_unusable_state_dir_and_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    path = config(tmp_path, str(tmp_path / "plain" / "state"))
    result = agentd("run", "--config", str(path))
    assert result.returncode == 1 and "daemon.state_dir" in result.stderr
    assert not (tmp_path / "run").exists()


# --- the daemon creates it --------------------------------------------------------------


def test_daemon_creates_the_state_dir_0750(daemon_factory, tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "agentd"
    d = daemon_factory(
        f'[daemon]\nstate_dir = "{state}"\n[agents.a]\ncommand = ["/bin/sleep", "60"]\n'
    )
    assert d.state_dir != state  # our own setting wins over the fixture's
    # Not waiting for daemon.ready: the state dir comes before the broker and the tree.
    d.start(wait_ready=False)
    d.wait_event("daemon.starting")  # (its signal handlers are set by then)
    assert state.is_dir()
    assert state.stat().st_mode & 0o777 == 0o750
    assert d.stop() == 0


def test_fixture_daemons_keep_state_in_their_temp_dir(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory('[agents.a]\ncommand = ["/bin/sleep", "60"]\n')
    assert f'state_dir = "{tmp_path / "state"}"' in d.config.read_text()
    d.rewrite('[agents.b]\ncommand = ["/bin/sleep", "60"]\n')
    assert f'state_dir = "{tmp_path / "state"}"' in d.config.read_text()


# --- agents are told ----------------------------------------------------------------------


def test_agents_get_agentd_state_dir(tmp_path: Path) -> None:
    spec = AgentSpec(
        name="a",
        pool=None,
        argv=("/bin/sh", "-c", 'printf %s "$AGENTD_STATE_DIR"'),
        bus_agent=False,
    )
    popen = spawn.spawn(spec, 0, "ipc:///nowhere", death_signal=False, state_dir=str(tmp_path))
    out, _ = popen.communicate(timeout=10)
    assert out.decode() == str(tmp_path)
    assert "AGENTD_STATE_DIR" not in spawn.agent_env(spec, 0, "ipc:///nowhere")


# --- broker notices -----------------------------------------------------------------------


def test_link_hands_notices_to_the_daemon(tmp_path: Path) -> None:
    """A real ROUTER plays the broker: its notice frames reach on_notice, in order, and a
    callback that raises does not stop the next one."""

    async def scenario() -> list[Notice]:
        endpoint = f"ipc://{tmp_path}/bus.sock"
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(endpoint)
        got: asyncio.Queue[Notice] = asyncio.Queue()

        def on_notice(notice: Notice) -> None:
            if notice.event == "bus.boom":
                raise RuntimeError("a broken callback")
            got.put_nowait(notice)

        link = BrokerLink(endpoint, lambda event: None, on_notice=on_notice)
        await link.start()
        try:
            ident, _table = await asyncio.wait_for(router.recv_multipart(), 10)
            assert ident == DAEMON_ID
            enc = encoder()
            for notice in (
                Notice("bus.boom", "bus"),
                Notice("bus.dead_lettered", "w", {"id": "x1", "deliveries": 5, "error": "E"}),
                Notice("bus.journal_corrupt", "bus", {"moved_to": "/s/bus.journal.corrupt"}),
            ):
                await router.send_multipart([DAEMON_ID, enc.encode(notice)])
            return [await asyncio.wait_for(got.get(), 10) for _ in range(2)]
        finally:
            await link.close()
            router.close(0)
            ctx.term()

    first, second = asyncio.run(scenario())
    assert first == Notice("bus.dead_lettered", "w", {"id": "x1", "deliveries": 5, "error": "E"})
    assert second.event == "bus.journal_corrupt" and second.agent == "bus"


def test_a_notice_becomes_a_daemon_event() -> None:
    events = EventLog()
    follower = events.follow()
    info: dict[str, Any] = {"id": "x1", "type": "job.run", "deliveries": 5, "error": "E"}
    record = notice_event(events, Notice("bus.dead_lettered", "worker", info))
    assert (record.event, record.name, record.data) == ("bus.dead_lettered", "worker", info)
    assert events.history[-1] == record and follower.get_nowait() == record
    # `ctl events` sends msgspec.to_builtins(event): the notice's fields are all there.
    assert msgspec.to_builtins(record)["data"]["deliveries"] == 5
    # Info keys that are an event's own fields are kept under another name, not lost.
    clash = notice_event(
        events, Notice("bus.dropped", "w", {"agent": "w", "event": "e", "count": 3})
    )
    assert clash.data == {"agent_": "w", "event_": "e", "count": 3}
