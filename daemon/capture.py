"""Capture of an agent's stdout and stderr into `<log_dir>/<name>.log`.

Each stream is a pipe read by the daemon's event loop (no thread per agent),
appended to one file per agent name that survives restarts and rotates by
size (`name.log` → `name.log.1` → ...). The last lines of stderr are kept in
memory for the `agent.exited` event, which is what an operator wants first
when something crashes.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict, deque
from pathlib import Path

TAIL_LINES = 20
TAIL_LINE_MAX = 500


class LogFile:
    """An append-only, size-rotated log file for one agent name.

    Its fd is open only while the agent writes: at most MAX_OPEN log files are
    open at once (the least recently written is closed first), so ten thousand
    idle agents hold no log fd — the fd limit is what caps the agent count.
    """

    MAX_OPEN = 256
    _open: OrderedDict[LogFile, None] = OrderedDict()  # process-wide, as the fd limit is

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        self._size = 0
        self.followers: set[asyncio.Queue[str]] = set()

    def write(self, data: bytes) -> None:
        for queue in list(self.followers):
            try:
                queue.put_nowait(data.decode("utf-8", "replace"))
            except asyncio.QueueFull:
                self.followers.discard(queue)
        self._opened()
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        os.write(self._fd, data)
        self._size += len(data)

    def _opened(self) -> None:
        """Open it (append) if it is not, and mark it the most recently written."""
        if self._fd >= 0:
            LogFile._open.move_to_end(self)
            return
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size
        LogFile._open[self] = None
        while len(LogFile._open) > self.MAX_OPEN:
            oldest = next(iter(LogFile._open))
            oldest.close()

    def _rotate(self) -> None:
        os.close(self._fd)
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_TRUNC, 0o640
        )
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            LogFile._open.pop(self, None)


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a file, reading backwards from its end."""
    if lines <= 0 or not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        block, data = 8192, b""
        while end > 0 and data.count(b"\n") <= lines:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
    text = data.decode("utf-8", "replace").splitlines()
    return text[-lines:]


class StreamReader:
    """Pumps one pipe into a LogFile; for stderr also keeps the tail lines."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fd: int, log: LogFile, keep_tail: bool
    ) -> None:
        self.loop = loop
        self.fd = fd
        self.log = log
        self.tail: deque[str] | None = deque(maxlen=TAIL_LINES) if keep_tail else None
        self._partial = b""
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        self.drain()

    def drain(self) -> None:
        """Read what is there now; close on EOF. Safe to call after close."""
        while self.fd >= 0:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            self.log.write(data)
            if self.tail is not None:
                self._keep(data)

    def _keep(self, data: bytes) -> None:
        assert self.tail is not None
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self.tail.append(line[:TAIL_LINE_MAX].decode("utf-8", "replace"))
        self._partial = self._partial[-TAIL_LINE_MAX:]

    def tail_lines(self) -> list[str]:
        if self.tail is None:
            return []
        lines = list(self.tail)
        if self._partial:
            lines.append(self._partial.decode("utf-8", "replace"))
        return lines[-TAIL_LINES:]

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
