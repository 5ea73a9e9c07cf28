"""A test agent: records its life in files so tests can check what happened.

    rec.py DIR [--ignore-term] [--grandchild] [--exit-after S] [--code N]
           [--alloc-mb N] [--stderr TEXT]

Writes "NAME PID INCARNATION" to DIR/started, "NAME" to DIR/term on SIGTERM
(one O_APPEND line per event, so the file order is the arrival order), and the
grandchild's PID to DIR/NAME.grandchild.
"""

import argparse
import os
import signal
import sys
import time


def append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (line + "\n").encode())
    os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--code", type=int, default=0)
    parser.add_argument("--alloc-mb", type=int, default=0)
    parser.add_argument("--stderr", default="")
    args = parser.parse_args()
    name = os.environ["AGENTD_NAME"]
    incarnation = os.environ["AGENTD_INCARNATION"]

    def on_term(signum, frame):
        append(os.path.join(args.dir, "term"), name)
        if not args.ignore_term:
            sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if args.grandchild:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(60)
        append(os.path.join(args.dir, f"{name}.grandchild"), str(pid))
    print(f"{name} up", flush=True)
    if args.stderr:
        print(args.stderr, file=sys.stderr, flush=True)
    if args.alloc_mb:
        hog = bytearray(args.alloc_mb * 1024 * 1024)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
    append(os.path.join(args.dir, "started"), f"{name} {os.getpid()} {incarnation}")
    deadline = time.monotonic() + args.exit_after if args.exit_after is not None else None
    while deadline is None or time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(args.code)


if __name__ == "__main__":
    main()
