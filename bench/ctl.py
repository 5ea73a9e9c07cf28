#!/usr/bin/env python3
"""`agentd ctl status` wall time with N agents, next to `supervisorctl status`.

    python bench/ctl.py [--agents 500] [--runs 20] [--warmup 2] [--agentd-rev HEAD]

1. agentd phase: `agentd run` with N command agents (`/bin/sleep 100000`,
   start_seconds = 0, max_restarts = 1000000 / max_seconds = 1), waited on
   until `daemon.ready` and N sleep children in /proc. Then, interleaved round
   by round (after --warmup rounds that are dropped), each timed as a whole
   process with `subprocess.run` (stdout and stderr to pipes, wall time):
     python -c pass           the interpreter floor (same interpreter)
     agentd --version         the console script, click, agentd.daemon.cli
     agentd ctl status        THE figure
     python -m agentd.daemon.cli ctl status   (for context: runpy instead of the script)
   `agentd` is the console script next to sys.executable, NOT `which agentd`
   (a pyenv shim is bash and adds ~70 ms).
2. supervisord phase: supervisord with the same N programs (unix_http_server
   socket in a temp dir, defaults otherwise), waited on until all RUNNING by
   XML-RPC, then `supervisorctl -c CONF status` timed the same way. The two
   daemons never run at the same time (each phase has the machine to itself).
3. Diagnosis (always printed): where agentd's time goes —
   - the request round trip measured in-process with a tiny zmq DEALER
     (`status` vs `ping`: the difference is the daemon building its rows),
   - the psutil calls the daemon makes per row, timed here on the same N pids,
   - `python -X importtime` of the ctl command (the biggest imports).

Everything started is stopped in a `finally`; the script then checks that no
sleep process of its own is left.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    SLEEP_ARGV,
    Agentd,
    ChildScanner,
    Cleanup,
    agentd_console_script,
    bench_venv,
    export_agentd,
    install_sigterm_as_interrupt,
    median,
    percentile,
    time_command,
    write_agentd_config,
)
from restart import start_supervisord, supervisor_rpc

TARGET_RATIO = 0.5


def agentd_env(pythonpath: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(pythonpath), *filter(None, [env.get("PYTHONPATH")])]
        )
    return env


def time_interleaved(
    cmds: dict[str, list[str]], runs: int, warmup: int, env: dict[str, str]
) -> dict[str, list[float]]:
    """Each round runs every command once; the first `warmup` rounds are dropped."""
    out: dict[str, list[float]] = {label: [] for label in cmds}
    for i in range(warmup + runs):
        for label, argv in cmds.items():
            ms = time_command(argv, runs=1, warmup=0, env=env)[0]
            if i >= warmup:
                out[label].append(ms)
    return out


# --- diagnosis ---------------------------------------------------------------------------


def round_trips(endpoint: str, pythonpath: Path | None, runs: int) -> dict[str, list[float]]:
    """In-process request -> Reply times (ms) on one connected DEALER, per command."""
    if pythonpath is not None:
        sys.path.insert(0, str(pythonpath))
    import zmq

    from agentd.daemon.protocol import Ack, Item, Reply, Request, decoder, encoder

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    out: dict[str, list[float]] = {}
    size = 0
    try:
        for cmd, args in (("ping", {}), ("status", {"names": []})):
            out[cmd] = []
            for i in range(runs + 2):
                t0 = time.perf_counter()
                sock.send(encoder.encode(Request(cmd, args)))
                while True:
                    if not sock.poll(30000):
                        raise RuntimeError(f"no reply to {cmd} in 30 s")
                    raw = sock.recv()
                    frame = decoder.decode(raw)
                    if isinstance(frame, (Ack, Item)):
                        continue
                    if isinstance(frame, Reply):
                        break
                if i >= 2:
                    out[cmd].append((time.perf_counter() - t0) * 1000)
                if cmd == "status":
                    size = len(raw)
        out["status reply bytes"] = [float(size)]
    finally:
        sock.close(0)
        ctx.term()
    return out


def psutil_costs(pids: list[int]) -> dict[str, float]:
    """Total ms over `pids` of each psutil call the daemon makes per status row."""
    costs: dict[str, float] = {}

    def timed(label: str, fn) -> list:
        t0 = time.perf_counter()
        result = []
        for pid in pids:
            try:
                result.append(fn(pid))
            except psutil.Error:
                result.append(None)
        costs[label] = (time.perf_counter() - t0) * 1000
        return result

    procs = timed("psutil.Process(pid)", psutil.Process)
    procs = [p for p in procs if p is not None]
    by_pid = {p.pid: p for p in procs}
    live = list(by_pid)

    def mem(pid: int) -> int:
        return by_pid[pid].memory_info().rss

    def cpu(pid: int) -> float:
        return by_pid[pid].cpu_percent(None)

    def kids(pid: int) -> list:
        return by_pid[pid].children(recursive=True)

    pids[:] = live
    timed("memory_info().rss", mem)
    t0 = time.perf_counter()
    # The alternative: one pass over /proc for all rows, descendants walked from the map.
    parent_of = {p.pid: p.info["ppid"] for p in psutil.process_iter(["ppid"])}
    kids_of: dict[int, list[int]] = {}
    for child, parent in parent_of.items():
        kids_of.setdefault(parent, []).append(child)
    for pid in live:
        stack = list(kids_of.get(pid, ()))
        while stack:
            stack.extend(kids_of.get(stack.pop(), ()))
    costs["one ppid map, all rows"] = (time.perf_counter() - t0) * 1000
    timed("cpu_percent(None)", cpu)
    timed("children(recursive=True)", kids)
    costs["/proc entries"] = float(sum(1 for n in os.listdir("/proc") if n.isdigit()))
    return costs


def import_times(argv: list[str], env: dict[str, str], repeat: int = 3) -> list[tuple[str, int]]:
    """Top-level imports of `argv` (run with -X importtime): (name, cumulative us), min of runs."""
    best: dict[str, int] = {}
    pattern = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", *argv], capture_output=True, env=env, text=True
        )
        for line in done.stderr.splitlines():
            m = pattern.match(line)
            if not m or len(m.group(3)) > 1:  # top level only: one space of indent
                continue
            name, cum = m.group(4), int(m.group(2))
            best[name] = min(best.get(name, cum), cum)
    return sorted(best.items(), key=lambda kv: -kv[1])


# --- phases ------------------------------------------------------------------------------


def agentd_phase(
    cleanup: Cleanup, args: argparse.Namespace, pythonpath: Path | None
) -> tuple[dict[str, list[float]], dict]:
    tmp = cleanup.tmpdir()
    names = {f"a{i:03d}": SLEEP_ARGV for i in range(args.agents)}
    config = write_agentd_config(
        tmp / "agentd.toml",
        tmp / "run",
        names,
        start_seconds=0,
        max_restarts=1000000,
        max_seconds=1,
    )
    daemon = Agentd(cleanup, config, pythonpath=pythonpath)
    try:
        scanner = ChildScanner(daemon.pid, SLEEP_ARGV)
        spawned = scanner.wait_count(args.agents, timeout=120, interval=0.01)
        ready = daemon.wait_event("daemon.ready", timeout=120)
        cleanup.seen_pids |= scanner.matched
        if ready is None or spawned is None:
            raise RuntimeError(f"agentd: {args.agents} agents not up in 120 s\n" + daemon.tail())
        time.sleep(1.0)
        env = agentd_env(pythonpath)
        script = str(agentd_console_script())
        status = [script, "ctl", "--config", str(config), "status"]
        cmds = {
            "python -c pass (floor)": [sys.executable, "-c", "pass"],
            "agentd --version": [script, "--version"],
            f"agentd ctl status ({args.agents} agents)": status,
            "python -m agentd.daemon.cli ctl status": [
                sys.executable,
                "-m",
                "agentd.daemon.cli",
                *status[1:],
            ],
        }
        check = subprocess.run(status, capture_output=True, text=True, env=env)
        lines = check.stdout.splitlines()
        running = sum(1 for line in lines[1:] if line.split()[1:2] == ["running"])
        if check.returncode != 0 or running < args.agents:
            raise RuntimeError(
                f"agentd ctl status: exit {check.returncode}, {running} running\n{check.stderr}"
            )
        print(f"agentd: {running} running; timing ...", file=sys.stderr, flush=True)
        times = time_interleaved(cmds, args.runs, args.warmup, env)
        diag: dict = {"status lines": len(lines), "status bytes": len(check.stdout)}
        print("agentd: diagnosis ...", file=sys.stderr, flush=True)
        diag["round trips"] = round_trips(
            f"ipc://{tmp / 'run' / 'control.sock'}", pythonpath, args.runs
        )
        diag["psutil"] = psutil_costs(sorted(scanner.matched))
        diag["imports"] = import_times(status, env)
        diag["imports --version"] = dict(import_times([script, "--version"], env))
        return times, diag
    finally:
        cleanup.stop(daemon.proc)


def supervisord_phase(cleanup: Cleanup, args: argparse.Namespace) -> dict[str, list[float]]:
    bin_dir = bench_venv()
    names = [f"a{i:03d}" for i in range(args.agents)]
    proc, tmp, _ = start_supervisord(cleanup, bin_dir, names)
    try:
        scanner = ChildScanner(proc.pid, SLEEP_ARGV)
        spawned = scanner.wait_count(args.agents, timeout=120, interval=0.01)
        cleanup.seen_pids |= scanner.matched
        if spawned is None:
            raise RuntimeError(f"supervisord: {args.agents} programs not spawned in 120 s")
        rpc = supervisor_rpc(tmp)
        deadline = time.monotonic() + 120
        while True:
            try:
                states = [p["statename"] for p in rpc.supervisor.getAllProcessInfo()]
            except (OSError, xmlrpc.client.Fault, http.client.HTTPException):
                states = []
            if len(states) == args.agents and all(s == "RUNNING" for s in states):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord: {args.agents} programs not RUNNING in 120 s")
            time.sleep(0.1)
        time.sleep(1.0)
        print("supervisord: all RUNNING; timing ...", file=sys.stderr, flush=True)
        ctl = [str(bin_dir / "supervisorctl"), "-c", str(tmp / "supervisord.conf"), "status"]
        return time_interleaved(
            {f"supervisorctl status ({args.agents} programs)": ctl},
            args.runs,
            args.warmup,
            dict(os.environ),
        )
    finally:
        cleanup.stop(proc)


# --- report ------------------------------------------------------------------------------


def report(times: dict[str, list[float]], diag: dict, args: argparse.Namespace) -> None:
    print()
    print(
        f"CLI wall time, whole process (subprocess.run, stdout to a pipe), {args.agents} "
        f"x /bin/sleep running; {args.runs} runs after {args.warmup} warm-ups"
    )
    print(f"agentd under test: {args.agentd_label}; interpreter {sys.executable}")
    print(f"{'command':<46}{'runs':>5}{'median ms':>11}{'p90 ms':>9}")
    for label, samples in times.items():
        print(
            f"{label:<46}{len(samples):>5}{median(samples):>11.1f}{percentile(samples, 90):>9.1f}"
        )
    a = next((v for k, v in times.items() if k.startswith("agentd ctl status")), None)
    s = next((v for k, v in times.items() if k.startswith("supervisorctl")), None)
    if a and s:
        ratio = median(a) / median(s)
        verdict = "MET" if ratio <= TARGET_RATIO else "MISSED"
        print(
            f"ratio agentd / supervisorctl (median): {ratio:.2f}   "
            f"target <= {TARGET_RATIO:.2f}  {verdict}"
        )
    if not diag:
        return
    print()
    print("where agentd ctl status spends its time")
    rt = diag["round trips"]
    ping, stat = median(rt["ping"]), median(rt["status"])
    print(f"  in-process round trip (connected DEALER, median of {len(rt['ping'])}):")
    print(f"    ping    {ping:8.2f} ms")
    print(
        f"    status  {stat:8.2f} ms   (p90 {percentile(rt['status'], 90):.2f}; "
        f"reply {int(rt['status reply bytes'][0])} bytes msgpack)"
    )
    print(f"    -> daemon building {args.agents} rows: ~{stat - ping:.2f} ms")
    ps = diag["psutil"]
    n = args.agents
    print(
        f"  psutil, timed in the bench on the same {n} agent pids "
        f"({int(ps['/proc entries'])} pids in /proc):"
    )
    for key in (
        "psutil.Process(pid)",
        "memory_info().rss",
        "cpu_percent(None)",
        "children(recursive=True)",
        "one ppid map, all rows",
    ):
        print(f"    {key:<26}{ps[key]:8.2f} ms total  {ps[key] * 1000 / n:8.1f} us/agent")
    if "python -c pass (floor)" in times:
        floor = median(times["python -c pass (floor)"])
        version = median(times["agentd --version"])
        total = median(a) if a else float("nan")
        print("  client side (medians):")
        print(f"    interpreter floor                 {floor:8.2f} ms")
        print(
            f"    + console script, click, cli      {version - floor:8.2f} ms "
            "(agentd --version - floor)"
        )
        print(
            f"    + ctl imports, config, zmq, table {total - version - stat:8.2f} ms "
            "(ctl status - --version - status round trip)"
        )
        print(f"    + status round trip               {stat:8.2f} ms")
        print(f"    = agentd ctl status               {total:8.2f} ms")
    print(f"  output: {diag['status lines']} lines, {diag['status bytes']} bytes")
    print("  -X importtime, top-level imports of `agentd ctl status` (cumulative, min of 3):")
    base = diag["imports --version"]
    for name, us in diag["imports"][:12]:
        extra = "" if name in base else "   (not imported by --version)"
        print(f"    {name:<34}{us / 1000:8.2f} ms{extra}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma list: agentd,supervisord")
    parser.add_argument(
        "--agentd-rev",
        default=None,
        help="benchmark this committed revision of agentd (git archive) instead of the "
        "installed working tree, e.g. HEAD",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    install_sigterm_as_interrupt()
    cleanup = Cleanup()
    times: dict[str, list[float]] = {}
    diag: dict = {}
    leftovers = []
    try:
        pythonpath = None
        if args.agentd_rev:
            rev = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", args.agentd_rev],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            pythonpath = export_agentd(rev, cleanup.tmpdir("agentd-src-"))
            args.agentd_label = f"agentd @ {rev}"
        else:
            args.agentd_label = "agentd (installed working tree)"
        if "agentd" not in skip:
            print(f"agentd: {args.agents} agents ...", file=sys.stderr, flush=True)
            t, diag = agentd_phase(cleanup, args, pythonpath)
            times.update(t)
        if "supervisord" not in skip:
            print(f"supervisord: {args.agents} programs ...", file=sys.stderr, flush=True)
            times.update(supervisord_phase(cleanup, args))
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        leftovers = cleanup.close()
        if leftovers:
            print(
                f"WARNING: {len(leftovers)} sleep process(es) were left behind and killed now: "
                + ", ".join(str(p.pid) for p in leftovers),
                file=sys.stderr,
            )
        if times:
            report(times, diag, args)
    if not leftovers:
        print("\ncleanup: no sleep processes left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
