"""Helpers for the bus tests: a real broker process, the daemon's link, SDK agents.

Not a conftest (that one belongs to the daemon tests): test modules build a
`Bus` in a small fixture of their own. Everything a `Bus` starts is killed by
PID when it closes, and a broker that does not exit 0 on SIGTERM fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentd.bus import Client
from agentd.bus.link import AgentEntry, BrokerEvent, BrokerLink

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def start_broker(directory: Path, *args: str, name: str = "bus.sock") -> subprocess.Popen[bytes]:
    """`python -m agentd.bus.broker` on an ipc socket in `directory`; returns once it is bound."""
    path = directory / name
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentd.bus.broker", "--endpoint", f"ipc://{path}", *args],
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "broker.log", "ab"),  # noqa: SIM115 - the child owns it
    )
    try:
        wait_for(lambda: path.exists() or proc.poll() is not None, 10, "the broker to bind")
        assert proc.poll() is None, (directory / "broker.log").read_text()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


class LinkThread:
    """The daemon's `BrokerLink`, on an asyncio loop in a thread of the test process."""

    def __init__(self, endpoint: str, max_frame: int = 1024 * 1024) -> None:
        self.events: list[BrokerEvent] = []
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> BrokerLink:
            link = BrokerLink(endpoint, self._on_event, max_frame=max_frame)
            await link.start()
            return link

        self.link = self._run(make())

    def _on_event(self, event: BrokerEvent) -> None:
        with self._lock:
            self.events.append(event)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        async def call() -> None:
            fn(*args)

        self._run(call())

    def set_agents(self, entries: list[AgentEntry]) -> None:
        """Set the table and wait until the broker confirmed it."""
        self._call(self.link.set_agents, entries)
        self.wait_confirmed()

    def update(self, entries: list[AgentEntry], removed: list[str]) -> None:
        """Change part of the table (as a spawn does) and wait until the broker confirmed it."""
        self._call(self.link.update, entries, removed)
        self.wait_confirmed()

    def broker_restarted(self) -> None:
        self._call(self.link.broker_restarted)
        self.wait_confirmed()

    def agent_down(self, name: str, incarnation: int) -> None:
        self._call(self.link.agent_down, name, incarnation)

    def sync(self) -> None:
        """A stats round trip on the link's socket: the broker has read all sent before."""
        assert self._run(self.link.stats(5.0)) is not None, "no stats answer from the broker"

    def wait_confirmed(self, timeout: float = 10.0) -> None:
        wait_for(lambda: self.link.confirmed == self.link.version, timeout, "the table")

    def wait_event(
        self, kind: str, name: str, incarnation: int | None = None, timeout: float = 10.0
    ) -> BrokerEvent:
        def found() -> BrokerEvent | None:
            with self._lock:
                for e in self.events:
                    same = incarnation is None or e.incarnation == incarnation
                    if e.kind == kind and e.name == name and same:
                        return e
            return None

        return wait_for(found, timeout, f"{kind} from {name}")

    def close(self) -> None:
        self._run(self.link.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Bus:
    """One broker, one link, and the agents and clients of one test."""

    def __init__(self, tmp: Path, *broker_args: str, max_frame: int | None = None) -> None:
        self.dir = tmp
        if max_frame is not None:
            broker_args += ("--max-frame", str(max_frame))
        self.broker_args = broker_args
        self.endpoint = f"ipc://{tmp}/bus.sock"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.clients: list[Client] = []
        self.broker = start_broker(tmp, *broker_args)
        self.procs.append(self.broker)
        self.link = LinkThread(self.endpoint, max_frame or 1024 * 1024)

    def restart_broker(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.broker.pid, sig)
        self.broker.wait(10)
        self.broker = start_broker(self.dir, *self.broker_args)
        self.procs.append(self.broker)
        self.link.broker_restarted()

    def table(self, *entries: AgentEntry) -> None:
        self.link.set_agents(list(entries))

    def agent(
        self,
        name: str,
        cls: str = "Recorder",
        *,
        incarnation: int = 0,
        heartbeat: float = 10.0,
        ack: bool = False,
        wait_ready: bool = True,
    ) -> subprocess.Popen[bytes]:
        """An SDK agent from tests/bus_agents.py as a real process, the way agentd runs it."""
        env = dict(os.environ)
        env.update(
            AGENTD_NAME=name,
            AGENTD_INCARNATION=str(incarnation),
            AGENTD_BUS=self.endpoint,
            AGENTD_HEARTBEAT=repr(heartbeat),
            REC_DIR=str(self.dir),
        )
        if ack:
            env["AGENTD_ACK"] = "1"
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentd.agents", f"tests.bus_agents:{cls}"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
        log.close()
        self.procs.append(proc)
        if wait_ready:
            self.link.wait_event("ready", name, incarnation, timeout=15)
        return proc

    def kill(self, proc: subprocess.Popen[bytes], name: str, incarnation: int) -> None:
        """kill -9, reaped, and the broker told, as the daemon does on SIGCHLD; returns once
        the broker has read the `down`. A client's signal on another socket could otherwise
        reach the broker before it, and go to the dead agent's pipe instead of being held."""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.link.agent_down(name, incarnation)
        self.link.sync()

    def client(self, name: str) -> Client:
        c = Client(self.endpoint, name=name)
        self.clients.append(c)
        return c

    def records(self, name: str) -> list[dict[str, Any]]:
        path = self.dir / f"{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def got(self, name: str) -> list[dict[str, Any]]:
        """The signals agent `name` handled (its setup lines left out)."""
        return [r for r in self.records(name) if "type" in r]

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.link.close()
        broker_rc = None
        if self.broker.poll() is None:
            self.broker.send_signal(signal.SIGTERM)
            try:
                broker_rc = self.broker.wait(10)
            except subprocess.TimeoutExpired:
                broker_rc = "hung"
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        assert broker_rc in (None, 0), f"the broker exited {broker_rc} on SIGTERM"
