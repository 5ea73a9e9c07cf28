"""sd_notify against real datagram sockets, filesystem and abstract."""

from __future__ import annotations

import os
import socket
import uuid

from agentd.daemon.notify import Notifier


def bound(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_messages_to_a_path_socket(tmp_path) -> None:
    sock = bound(str(tmp_path / "n.sock"))
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
    assert n.enabled
    n.ready(status="3 agents running")
    assert sock.recv(4096) == b"READY=1\nSTATUS=3 agents running"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.reloading()
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1" and second.startswith("MONOTONIC_USEC=")
    n.status("busy")
    assert sock.recv(4096) == b"STATUS=busy"
    sock.close()


def test_abstract_namespace() -> None:
    name = f"agentd-test-{uuid.uuid4().hex}"
    sock = bound(b"\0" + name.encode())
    Notifier.from_env({"NOTIFY_SOCKET": f"@{name}"}).ready()
    assert sock.recv(4096) == b"READY=1"
    sock.close()


def test_disabled_without_notify_socket() -> None:
    n = Notifier.from_env({})
    assert not n.enabled and n.watchdog_interval() is None
    n.ready()  # a no-op, not an error


def test_vanished_socket_does_not_raise(tmp_path) -> None:
    Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready()


def test_watchdog_interval() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval() == 15.0
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_env(env).watchdog_interval() == 15.0
    env["WATCHDOG_PID"] = "1"
    assert Notifier.from_env(env).watchdog_interval() is None
