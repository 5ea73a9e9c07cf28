"""sd_notify, written against the protocol: one datagram to $NOTIFY_SOCKET.

No libsystemd: the protocol is a newline-separated `KEY=VALUE` datagram sent
to an AF_UNIX socket whose path is in NOTIFY_SOCKET (a leading `@` means the
Linux abstract namespace). When NOTIFY_SOCKET is unset every call is a no-op,
so the daemon calls these unconditionally.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

from agentd.bus.log import get_logger


class Notifier:
    """Sends READY/RELOADING/STOPPING/STATUS/WATCHDOG to systemd, if it is listening."""

    def __init__(self, address: str | None, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.address = address
        self.enabled = bool(address)
        self._sock: socket.socket | None = None
        if self.enabled:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        return cls(environ.get("NOTIFY_SOCKET") or None, environ)

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def send(self, *lines: str) -> None:
        """One datagram; a vanished or refusing socket is logged, never raised."""
        if not self.enabled or self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._target())
        except OSError as exc:
            get_logger("agentd").debug("notify.failed", error=str(exc))

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC in seconds, if the watchdog is meant for this process."""
        usec = self.environ.get("WATCHDOG_USEC")
        if not self.enabled or not usec:
            return None
        pid = self.environ.get("WATCHDOG_PID")
        if pid and (not pid.strip().isdigit() or int(pid) != os.getpid()):
            return None  # the watchdog is meant for another process
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 2 / 1_000_000 if value > 0 else None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog_loop(notifier: Notifier, interval: float | None = None) -> None:
    """WATCHDOG=1 every `interval` (default: notifier.watchdog_interval()) until cancelled.

    Run it as a task on the daemon's own event loop: if the loop gets stuck, the
    pings stop and systemd restarts the service. Returns at once when there is
    no watchdog for this process.
    """
    interval = notifier.watchdog_interval() if interval is None else interval
    if not interval:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
