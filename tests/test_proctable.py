"""ProcTable against psutil, on real processes: a child that forked a grandchild."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from agentd.daemon.proctable import ProcTable
from tests.conftest import wait_for


def test_facts_match_psutil_and_descendants_are_found() -> None:
    # The child forks a grandchild holding ~50 MB, then both sleep.
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    ballast = bytearray(50 * 1024 * 1024)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "else:\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        me = os.getpid()
        table = ProcTable()
        assert table.facts[child.pid].ppid == me
        [grandchild] = table.descendants(child.pid)
        assert psutil.Process(grandchild).ppid() == child.pid
        assert child.pid in table.descendants(me)
        own = psutil.Process(child.pid).memory_info().rss
        assert abs(table.facts[child.pid].rss - own) < 1024 * 1024
        assert table.tree_rss(child.pid) >= own + 50 * 1024 * 1024
        times = psutil.Process(me).cpu_times()
        assert abs(table.cpu_seconds(me) - (times.user + times.system)) < 0.5
    finally:
        for pid in ProcTable().descendants(child.pid):
            os.kill(pid, 9)
        child.kill()
        child.wait()
    wait_for(lambda: ProcTable().tree_rss(child.pid) is None, 5, "the child to be gone")
