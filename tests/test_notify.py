"""sd_notify against real datagram sockets, filesystem and abstract."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from agentd.daemon.notify import Notifier, watchdog_loop


def bound(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path) -> Iterator[tuple[socket.socket, str]]:
    """(bound socket, NOTIFY_SOCKET value): a socket file, or `@name` in the abstract namespace."""
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock, env = bound(path), path
    else:
        name = f"agentd-test-{uuid.uuid4().hex}"
        sock, env = bound(b"\0" + name.encode()), f"@{name}"
    yield sock, env
    sock.close()


def test_each_message(listener) -> None:
    sock, address = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert n.enabled
    n.ready()
    assert sock.recv(4096) == b"READY=1"
    n.ready(status="3 agents running")
    assert sock.recv(4096) == b"READY=1\nSTATUS=3 agents running"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.status("busy")
    assert sock.recv(4096) == b"STATUS=busy"
    n.send("A=1", "B=2")
    assert sock.recv(4096) == b"A=1\nB=2"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    n.close()


def test_disabled_without_notify_socket() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}):
        n = Notifier.from_env(env)
        assert not n.enabled and n.watchdog_interval() is None
        n.ready()  # a no-op, not an error
        n.reloading()
        n.watchdog()


def test_missing_and_removed_socket_do_not_raise(tmp_path) -> None:
    Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "never.sock")}).ready()
    path = tmp_path / "gone.sock"
    sock = bound(str(path))
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    n.ready()
    assert sock.recv(4096) == b"READY=1"
    sock.close()
    path.unlink()
    n.stopping()  # ENOENT: logged at debug, not raised
    n.watchdog()
    # Abstract socket with nobody bound: ECONNREFUSED, also swallowed.
    Notifier.from_env({"NOTIFY_SOCKET": f"@agentd-none-{uuid.uuid4().hex}"}).watchdog()


def test_watchdog_interval() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval() == 15.0
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_env(env).watchdog_interval() == 15.0
    env["WATCHDOG_PID"] = str(os.getpid() + 1)
    assert Notifier.from_env(env).watchdog_interval() is None
    env["WATCHDOG_PID"] = "garbage"
    assert Notifier.from_env(env).watchdog_interval() is None
    for usec in ("0", "", "soon"):
        assert (
            Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": usec}).watchdog_interval()
            is None
        )
    assert Notifier.from_env({"NOTIFY_SOCKET": "@x"}).watchdog_interval() is None


def test_watchdog_loop_pings(tmp_path) -> None:
    path = str(tmp_path / "wd.sock")
    sock = bound(path)
    n = Notifier.from_env(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert n.watchdog_interval() == pytest.approx(0.05)

    async def main() -> list[bytes]:
        task = asyncio.create_task(watchdog_loop(n))
        got: list[bytes] = []
        deadline = time.monotonic() + 3
        sock.setblocking(False)
        while len(got) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            try:
                got.append(sock.recv(4096))
            except BlockingIOError:
                pass
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    assert asyncio.run(main()) == [b"WATCHDOG=1", b"WATCHDOG=1"]
    sock.close()
    n.close()


def test_watchdog_loop_returns_without_watchdog() -> None:
    asyncio.run(asyncio.wait_for(watchdog_loop(Notifier.from_env({})), 1))
