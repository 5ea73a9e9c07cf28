"""The guard: kills every agent process group if the daemon dies, even by kill -9.

PR_SET_PDEATHSIG reaches only the daemon's direct children; whatever an agent
forked lives on in the agent's process group. The guard is a tiny separate
process that the daemon tells about each group it creates ("+PGID") and
retires ("-PGID") over a pipe. When the pipe reaches EOF — the daemon is
gone, however it died — the guard SIGKILLs every group it still knows and
exits. It sits in its own session and ignores terminal signals, so a Ctrl-C
or a signal to the daemon's group cannot take it down before it has done its
one job.

This file runs as a script (`python -S guard.py`), so it imports nothing from
agentd and starts in a few milliseconds.
"""

import os
import signal
import sys


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    buffer = b""
    while True:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line[:1] == b"+":
                groups.add(int(line[1:]))
            elif line[:1] == b"-":
                groups.discard(int(line[1:]))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    sys.exit(0)


if __name__ == "__main__":
    main()
