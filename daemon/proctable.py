"""One pass over /proc: parent, resident memory and CPU time of every process.

`ctl status` reports RSS (the agent and everything it forked) and CPU% for
every agent, and the memory sampler checks limits the same way. Asking psutil
per agent costs a Process object, a statm read, a stat read and — for the
descendants — a scan of every process per agent: about 4 s for 500 agents.
Reading each /proc/PID/stat once per call gives all three facts for every
process (~10 ms for 600 processes), so that is what this module does; psutil
stays the tool for one-off questions about a single process.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


class Facts(NamedTuple):
    ppid: int
    rss: int  # bytes
    cpu: float  # seconds of CPU (user + system) so far


def _read_stat(pid: str) -> Facts | None:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None  # gone since listdir
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # "pid (comm) state ppid ..." — comm may hold spaces and parentheses: split after the last ")".
    # Only as far as rss (field 24; 21 after the split point): a third less work per process.
    fields = raw[raw.rfind(b")") + 2 :].split(None, 22)
    try:
        return Facts(
            ppid=int(fields[1]),
            rss=int(fields[21]) * PAGE,
            cpu=(int(fields[11]) + int(fields[12])) / TICKS,
        )
    except (IndexError, ValueError):
        return None


class ProcTable:
    """A snapshot of every process's facts and the parent -> children map."""

    def __init__(self) -> None:
        self.taken = time.monotonic()
        self.facts: dict[int, Facts] = {}
        self.kids: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            facts = _read_stat(entry)
            if facts is None:
                continue
            pid = int(entry)
            self.facts[pid] = facts
            self.kids.setdefault(facts.ppid, []).append(pid)

    def descendants(self, pid: int) -> list[int]:
        """Everything `pid` forked, at any depth (not `pid` itself)."""
        found: list[int] = []
        stack = list(self.kids.get(pid, ()))
        while stack:
            child = stack.pop()
            found.append(child)
            stack.extend(self.kids.get(child, ()))
        return found

    def tree_rss(self, pid: int) -> int | None:
        """RSS of `pid` and its descendants, in bytes; None if `pid` is gone."""
        facts = self.facts.get(pid)
        if facts is None:
            return None
        if pid not in self.kids:
            return facts.rss  # forked nothing: most agents, at every scrape
        return facts.rss + sum(self.facts[p].rss for p in self.descendants(pid) if p in self.facts)

    def cpu_seconds(self, pid: int) -> float | None:
        facts = self.facts.get(pid)
        return None if facts is None else facts.cpu
