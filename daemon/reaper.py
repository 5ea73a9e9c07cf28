"""The daemon's one reaper: every child it has, waited for on SIGCHLD, by pid.

A pidfd per agent would cost a file descriptor per agent, and the fd limit is
what caps how many agents one daemon runs (a hard RLIMIT_NOFILE of 20,000 is
common). The daemon is the parent of every agent (exec'd, or forked and
reparented to it as their subreaper) and of the broker, the guard and the
templates, so one SIGCHLD handler can find them all: waitid(P_ALL, WNOWAIT)
peeks at the next exited child without reaping it, a syscall per exited child
and none per running one.

An exited child is handed to whoever watches its pid while it is still a
zombie: its pid and process group cannot be reused yet, so the owner can
still signal what it left behind (`kill(-pgid)`), then it is reaped. A child
nobody watches is an orphan reparented to us (we are a subreaper) and is just
reaped — except while a fork is in flight (`hold`): a forked agent is our
child before its pid reaches us, so an unknown zombie waits until the pid is
known.

There is one reaper per process because waitid(P_ALL) is process-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator

from agentd.bus.log import get_logger

ExitCallback = Callable[[int], None]  # given the wait status, while the child is a zombie


def wait_status(info: os.waitid_result) -> int:
    """waitid's (code, status) as the wait status waitpid would have returned."""
    if info.si_code == os.CLD_EXITED:
        return (info.si_status & 0xFF) << 8
    core = 0x80 if info.si_code == os.CLD_DUMPED else 0
    return (info.si_status & 0x7F) | core


class Reaper:
    """Who waits for which child; `reap()` runs on every SIGCHLD."""

    def __init__(self) -> None:
        self._watched: dict[int, ExitCallback] = {}
        self._holds = 0
        self._reaping = False  # a callback that ends in reap(): the running loop goes on

    def watch(self, pid: int, on_exit: ExitCallback) -> None:
        """Call `on_exit(status)` when `pid` exits (once); it is reaped right after.

        Nothing is reaped here: a child that has already exited is found by the next
        SIGCHLD's reap (or the one a hold's end schedules), after what the caller
        schedules now — an agent ready at once (`start_seconds = 0`) that exits at
        once is a normal end, not a failed start.
        """
        self._watched[pid] = on_exit

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While a fork is in flight: an unknown zombie may be its agent, so keep it."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if self._holds == 0:
                self._soon()

    def reap(self) -> None:
        """Hand every exited child to its watcher, reap it; reap orphans."""
        if self._reaping:
            return
        self._reaping = True
        try:
            self._reap_all()
        finally:
            self._reaping = False

    def _reap_all(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return  # no children at all
            if info is None:
                return
            pid = info.si_pid
            on_exit = self._watched.pop(pid, None)
            if on_exit is None and self._holds:
                return  # perhaps a forked agent whose pid is on its way: after the fork
            try:
                if on_exit is not None:
                    on_exit(wait_status(info))
            except Exception:  # one owner's bug must not leave the others unreaped
                get_logger("agentd.reaper").exception("reaper.callback_failed", pid=pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def _soon(self) -> None:
        with contextlib.suppress(RuntimeError):  # no loop: nothing runs to be reaped for
            asyncio.get_running_loop().call_soon(self.reap)


reaper = Reaper()
