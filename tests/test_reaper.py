"""The daemon's reaper (daemon/reaper.py), on real child processes of the test."""

from __future__ import annotations

import os
import signal
import sys

from agentd.daemon.reaper import Reaper
from tests.conftest import wait_for


def child(code: int = 0, sig: int = 0) -> int:
    """A real child that exits at once (with `code`, or killed by `sig`)."""
    pid = os.fork()
    if pid == 0:
        if sig:
            os.kill(os.getpid(), sig)
        os._exit(code)
    return pid


def state(pid: int) -> str:
    """Its state letter in /proc (Z: a zombie, not reaped yet); "" once reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return ""


def zombie(pid: int) -> bool:
    return state(pid) == "Z"


def test_each_watcher_gets_its_childs_status_while_it_is_a_zombie_then_it_is_reaped() -> None:
    reaper = Reaper()
    seen: dict[int, tuple[int, str]] = {}
    pids = [child(code=3), child(sig=signal.SIGKILL), child(code=0)]
    for pid in pids:
        reaper.watch(pid, lambda status, pid=pid: seen.__setitem__(pid, (status, state(pid))))
    wait_for(lambda: all(zombie(p) for p in pids), 10, "the children to exit")
    reaper.reap()
    assert [os.waitstatus_to_exitcode(seen[p][0]) for p in pids] == [3, -signal.SIGKILL, 0]
    assert all(seen[p][1] == "Z" for p in pids)  # its pid (and group) still held by us
    assert not any(state(p) for p in pids)  # reaped after


def test_an_unknown_child_is_kept_while_a_fork_is_in_flight_and_reaped_after() -> None:
    reaper = Reaper()
    with reaper.hold():  # a forked agent's pid is on its way: this may be it
        orphan = child()
        wait_for(lambda: zombie(orphan), 10, "the child to exit")
        reaper.reap()
        assert zombie(orphan)
    reaper.reap()  # (the daemon's loop runs this soon after the hold ends)
    assert state(orphan) == ""


def test_a_callback_that_reaps_again_does_not_recurse() -> None:
    """An exit handler that ends in reap() (as the daemon's did): the running loop goes on."""
    reaper = Reaper()
    pids = [child() for _ in range(60)]
    wait_for(lambda: all(zombie(p) for p in pids), 10, "the children to exit")
    got: list[int] = []

    def exited(pid: int) -> None:
        got.append(pid)
        reaper.reap()

    for pid in pids:
        reaper.watch(pid, lambda status, pid=pid: exited(pid))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(pids) + 40)  # nesting one reap per exit would pass this
    try:
        reaper.reap()
    finally:
        sys.setrecursionlimit(limit)
    assert sorted(got) == sorted(pids)
    assert not any(state(p) for p in pids)


def test_a_failing_callback_is_logged_and_the_others_still_run() -> None:
    reaper = Reaper()
    first, second = child(), child()
    wait_for(lambda: zombie(first) and zombie(second), 10, "the children to exit")
    got: list[int] = []

    def boom(status: int) -> None:
        raise RuntimeError("an owner's bug")

    reaper.watch(first, boom)
    reaper.watch(second, lambda status: got.append(second))
    reaper.reap()
    assert got == [second]
    assert not state(first) and not state(second)  # both reaped, the failing one too
