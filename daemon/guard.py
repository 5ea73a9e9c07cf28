"""The guard: kills every agent if the daemon dies, even by kill -9.

PR_SET_PDEATHSIG reaches only the daemon's direct children; whatever an agent
forked lives on. The guard is a tiny separate process that the daemon tells,
over a pipe, about each agent it starts and retires: "+PGID"/"-PGID" for an
agent that is only a process group, "+DIR<TAB>DIR..."/"-DIR..." for one with a
cgroup (its directories, the one to kill first), and "~DIR" for a directory of
agentd's subtree to remove at the end. When the pipe reaches EOF — the daemon
is gone, however it died — the guard SIGKILLs every group it still knows,
kills every cgroup whole (cgroup.kill: setsid() and double forks included),
removes the emptied cgroups and exits. It sits in its own session and ignores
terminal signals, so a Ctrl-C or a signal to the daemon's group cannot take it
down before it has done its one job.

This file runs as a script (`python -S guard.py`), so it starts in a few
milliseconds; only at EOF does it import cgroup.py, its neighbour (standard
library only), for the one kill mechanism the daemon uses too.
"""

import os
import signal
import sys


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    cgroups: dict[str, list[str]] = {}  # first directory -> all of the agent's
    bases: list[str] = []
    buffer = b""
    while True:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            sign, rest = line[:1], line[1:].decode(errors="surrogateescape")
            if rest.startswith("/"):
                dirs = rest.split("\t")
                if sign == b"+":
                    cgroups[dirs[0]] = dirs
                elif sign == b"-":
                    cgroups.pop(dirs[0], None)
                elif sign == b"~":
                    bases.append(rest)
            elif sign == b"+":
                groups.add(int(rest))
            elif sign == b"-":
                groups.discard(int(rest))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    if cgroups or bases:
        import cgroup  # daemon/cgroup.py: this script's directory is sys.path[0]

        cgroup.kill_and_remove(list(cgroups.values()), reversed(bases), wait=2.0)
    sys.exit(0)


if __name__ == "__main__":
    main()
