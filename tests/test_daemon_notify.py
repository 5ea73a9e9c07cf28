"""The daemon speaks sd_notify: READY, RELOADING/READY, STOPPING, STATUS, WATCHDOG."""

from __future__ import annotations

import os
import signal
import socket

from tests.conftest import rec, wait_for


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.path = path
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def lines(self) -> list[str]:
        return [line for m in self.drain() for line in m.split("\n")]

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


def test_sd_notify_lifecycle(daemon_factory, tmp_path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        d = daemon_factory(
            f"""
[agents.slow]
command = {rec(tmp_path / "rec")}
start_seconds = 0.3
"""
        )
        d.start(
            wait_ready=False,
            extra_env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"},
        )
        wait_for(lambda: "READY=1" in notify.lines(), 10, "READY=1")
        # READY waited for the tree: the agent had been up start_seconds by then.
        assert d.events("agent.ready", "slow")
        assert any(line.startswith("STATUS=") for line in notify.lines())
        wait_for(lambda: notify.lines().count("WATCHDOG=1") >= 3, 5, "watchdog pings")
        d.signal(signal.SIGHUP)
        d.wait_event("daemon.reloaded")

        def after_reloading() -> list[str]:
            lines = notify.lines()
            return lines[lines.index("RELOADING=1") :] if "RELOADING=1" in lines else []

        # READY=1 follows the reload's last log line (daemon.reloaded), not before it.
        wait_for(lambda: "READY=1" in after_reloading(), 5, "READY=1 after RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in after_reloading())
        assert d.stop() == 0
        assert "STOPPING=1" in notify.lines()
    finally:
        notify.close()
