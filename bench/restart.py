#!/usr/bin/env python3
"""Restart latency and 200-agent footprint: agentd vs a bare loop, supervisord, circus.

    python bench/restart.py [--kills 50] [--kills-slow 20] [--agents 200] [--idle-seconds 10]

1. Restart latency, kill -> replacement running, for a command agent running
   `/bin/sleep 100000`, measured the same way for every runner: t0 just before
   os.kill(old_pid, SIGKILL); t1 when a NEW direct child of the supervisor
   process with argv == ["/bin/sleep", "100000"] shows up in /proc (polled
   every 0.2 ms by `_common.ChildScanner`; a pid counts once it has exec'd the
   program; the old pid's zombie never counts). Runners:
     bare        a ~20-line Popen + waitpid respawn loop (written to a temp file)
     agentd      `agentd run`, start_seconds = 0, root intensity raised to
                 max_restarts = 10000 (its bound) / max_seconds = 1 so 50 quick kills are
                 not a restart storm (the default 3-in-5 s would give up);
                 `cgroup = "off"`: process groups, as before cgroups
     agentd-cg   the same with `cgroup = "required"`: a fresh cgroup per incarnation
                 (mkdir in each hierarchy, the agent born in it), the old one killed
                 (cgroup.kill) and removed; target <= 1 ms over agentd. agentd and
                 agentd-cg run side by side, their kills interleaved (same load)
     agentd-nopd the same as agentd with `death_signal = false`
     supervisord defaults (startsecs=1, startretries=3, autorestart=true);
                 kills are spaced > startsecs (1.2 s after the replacement
                 appeared) so the process is RUNNING when killed — one that dies
                 within startsecs goes to BACKOFF instead and its restart is delayed
     circus      defaults (respawn=true, check_delay=1 s, no flapping plugin)
   Between kills every runner waits until its replacement has been up for
   --settle (50 ms), supervisord for 1.2 s as said. supervisord and circus get
   --kills-slow kills (default 20) because each restart takes ~1-4 s.
2. Memory overshoot (--skip memory to leave it out): an agent allocating
   500 MB/s (10 MB chunks, every page written) under `limits.memory_mb = 200`,
   with cgroups (the kernel's memory limit, peak = the cgroup's own counter) and
   with sampling (`cgroup = "off"`, RSS every memory_check_interval = 2 s, peak =
   the RSS sample that tripped it); also what the agent itself had allocated when
   it was killed. Median of --memory-trials runs (default 3) each. And, with
   cgroups, the cost of each cgroup operation on this host (median of 50).
3. N agents (--agents 200): start time, RSS and idle CPU (cpu_times delta /
   wall over --idle-seconds) of the agentd daemon process and of supervisord
   with N programs. agentd start = launch -> `daemon.ready`; supervisord start
   = launch -> all N RUNNING by XML-RPC getAllProcessInfo (which includes its
   default startsecs=1). "spawned" = launch -> N sleep children in /proc, for both.

Everything started lives in its own session and is stopped in a `finally`
(SIGTERM, then SIGKILL to the group and every descendant seen), also on Ctrl-C;
the script then checks that none of its sleep processes is left.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    SLEEP_ARGV,
    Agentd,
    ChildScanner,
    Cleanup,
    bench_venv,
    cpu_percent_over,
    export_agentd,
    install_sigterm_as_interrupt,
    iso_to_epoch,
    median,
    percentile,
    rss_mib,
    write_agentd_config,
)

AGENTD_PATH: Path | None = None  # set by --agentd-rev

BARE_LOOP = """\
# The bare reference: respawn the program as soon as it dies, report each pid.
import os
import signal
import subprocess
import sys

argv = sys.argv[1:]
child = None


def stop(signum, frame):
    if child is not None:
        child.kill()
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
while True:
    child = subprocess.Popen(argv)
    print(child.pid, flush=True)
    os.waitpid(child.pid, 0)
"""

SUPERVISORD_CONF = """\
[unix_http_server]
file = {tmp}/supervisor.sock

[supervisord]
nodaemon = true
logfile = {tmp}/supervisord.log
pidfile = {tmp}/supervisord.pid
childlogdir = {tmp}/childlogs

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://{tmp}/supervisor.sock
"""

SUPERVISORD_PROGRAM = """
[program:{name}]
command = {command}
autorestart = true
"""

CIRCUS_CONF = """\
[circus]
endpoint = ipc://{tmp}/circus-ctl.sock
pubsub_endpoint = ipc://{tmp}/circus-pub.sock
stats_endpoint = ipc://{tmp}/circus-stats.sock
logoutput = {tmp}/circusd.log

[watcher:{name}]
cmd = {cmd}
args = {args}
numprocesses = 1

[env:{name}]
{mark_key} = {mark}
"""


@dataclass
class Latency:
    runner: str
    kills: int
    samples_ms: list[float] = field(default_factory=list)
    failures: int = 0
    note: str = ""


# --- the restart-latency measurement, identical for every runner ----------------------


class Killer:
    """One runner's child under repeated kill -9; each `kill()` is one sample."""

    def __init__(
        self,
        name: str,
        cleanup: Cleanup,
        parent: int,
        kills: int,
        timeout: float,
        marks: list[tuple[float, int, int, float]] | None = None,
    ) -> None:
        self.name, self.cleanup, self.timeout, self.marks = name, cleanup, timeout, marks
        self.result = Latency(name, kills)
        self.scanner = ChildScanner(parent, SLEEP_ARGV)
        current, _ = self.scanner.wait_new((), timeout=30)
        if current is None:
            raise RuntimeError(f"{name}: no {SLEEP_ARGV} child of pid {parent} after 30 s")
        cleanup.seen_pids.add(current)
        self.current = current

    def kill(self, i: int) -> bool:
        """Kill the child, time it until its replacement runs; False: no replacement."""
        wall0 = time.time()
        t0 = time.perf_counter()
        os.kill(self.current, signal.SIGKILL)
        new, t1 = self.scanner.wait_new({self.current}, timeout=self.timeout)
        wall1 = time.time()
        if new is None:
            self.result.failures += 1
            print(
                f"  {self.name}: kill {i + 1}: no replacement within {self.timeout} s",
                file=sys.stderr,
            )
            new, _ = self.scanner.wait_new({self.current}, timeout=30)
            if new is None:
                self.result.note = "gave up (no replacement)"
                return False
        else:
            self.result.samples_ms.append((t1 - t0) * 1000)
            if self.marks is not None:
                self.marks.append((wall0, self.current, new, wall1))
        self.cleanup.seen_pids.add(new)
        self.current = new
        if (i + 1) % 10 == 0:
            print(
                f"  {self.name}: {i + 1} kills, median so far "
                f"{median(self.result.samples_ms):.2f} ms",
                file=sys.stderr,
                flush=True,
            )
        return True


def measure_restarts(
    name: str,
    cleanup: Cleanup,
    parent: int,
    kills: int,
    settle: float,
    timeout: float,
    marks: list[tuple[float, int, int, float]] | None = None,
) -> Latency:
    """Kill the running child `kills` times; time each until its replacement runs.

    `marks` (if given) gets (wall time of kill, old pid, new pid, wall time of
    detection) per kill, for the agentd event breakdown.
    """
    killer = Killer(name, cleanup, parent, kills, timeout, marks)
    time.sleep(settle)
    for i in range(kills):
        if not killer.kill(i):
            break
        time.sleep(settle)
    return killer.result


def run_bare(cleanup: Cleanup, kills: int, settle: float) -> Latency:
    tmp = cleanup.tmpdir()
    script = tmp / "bare_loop.py"
    script.write_text(BARE_LOOP)
    proc = cleanup.popen(
        [sys.executable, "-S", str(script), *SLEEP_ARGV],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        return measure_restarts("bare", cleanup, proc.pid, kills, settle, timeout=10)
    finally:
        cleanup.stop(proc)


def daemon_setting(config: Path, line: str) -> None:
    """Add one `[daemon]` line to a config written by write_agentd_config."""
    config.write_text(config.read_text().replace("[daemon]\n", f"[daemon]\n{line}\n", 1))


def sleeper_daemon(cleanup: Cleanup, *daemon_lines: str) -> Agentd:
    """agentd running one `sleep` agent that may restart without end, plus `[daemon]` lines."""
    tmp = cleanup.tmpdir()
    config = write_agentd_config(
        tmp / "agentd.toml",
        tmp / "run",
        {"sleeper": SLEEP_ARGV},
        start_seconds=0,
        max_restarts=10_000,
        max_seconds=1,
    )
    for line in daemon_lines:
        daemon_setting(config, line)
    return Agentd(cleanup, config, pythonpath=AGENTD_PATH)


def run_agentd(
    cleanup: Cleanup, kills: int, settle: float, death_signal: bool = True
) -> tuple[Latency, dict[str, list[float]]]:
    # The kernel death signal costs an exec of the trampoline per spawn; the guard
    # process still kills every agent group if the daemon dies.
    lines = () if death_signal else ("death_signal = false",)
    runner = "agentd" if death_signal else "agentd-nopd"
    daemon = sleeper_daemon(cleanup, *lines, 'cgroup = "off"')
    marks: list[tuple[float, int, int, float]] = []
    try:
        if daemon.wait_event("daemon.ready", timeout=30) is None:
            raise RuntimeError(f"{runner}: no daemon.ready in 30 s\n" + daemon.tail())
        result = measure_restarts(
            runner, cleanup, daemon.pid, kills, settle, timeout=10, marks=marks
        )
        time.sleep(0.2)
        return result, agentd_breakdown(daemon, marks)
    finally:
        cleanup.stop(daemon.proc)


def run_agentd_pair(
    cleanup: Cleanup, kills: int, settle: float
) -> tuple[list[Latency], dict[str, dict[str, list[float]]]]:
    """agentd without and with cgroups, both running, their kills interleaved.

    The two are compared under the same load (this host is shared), each round
    killing first one, then the other (alternating which goes first).
    """
    daemons: dict[str, Agentd] = {}
    marks: dict[str, list[tuple[float, int, int, float]]] = {}
    try:
        for runner, mode in (("agentd", "off"), ("agentd-cg", "required")):
            daemons[runner] = sleeper_daemon(cleanup, f'cgroup = "{mode}"')
        for runner, daemon in daemons.items():
            if daemon.wait_event("daemon.ready", timeout=30) is None:
                raise RuntimeError(f"{runner}: no daemon.ready in 30 s\n" + daemon.tail())
        killers = [
            Killer(runner, cleanup, d.pid, kills, 10, marks.setdefault(runner, []))
            for runner, d in daemons.items()
        ]
        time.sleep(settle)
        for i in range(kills):
            for killer in killers if i % 2 == 0 else reversed(killers):
                killer.kill(i)
                time.sleep(settle)
        time.sleep(0.2)
        results = [k.result for k in killers]
        return results, {r: agentd_breakdown(daemons[r], marks[r]) for r in daemons}
    finally:
        for daemon in daemons.values():
            cleanup.stop(daemon.proc)


def agentd_breakdown(
    daemon: Agentd, marks: list[tuple[float, int, int, float]]
) -> dict[str, list[float]]:
    """Per kill, from agentd's own event timestamps (ms)."""
    with daemon.cond:
        records = [rec for _, rec in daemon.events]
    exited = {r.get("pid"): r for r in records if r.get("event") == "agent.exited"}
    ready = {r.get("pid"): r for r in records if r.get("event") == "agent.ready"}
    starting = [r for r in records if r.get("event") == "agent.starting"]
    out: dict[str, list[float]] = {
        "kill -> agent.exited": [],
        "agent.exited -> agent.starting": [],
        "agent.starting -> agent.ready (spawn)": [],
        "agent.ready -> seen in /proc": [],
    }
    for wall0, old, new, wall1 in marks:
        ex, rd = exited.get(old), ready.get(new)
        if ex is None or rd is None:
            continue
        t_ex, t_rd = iso_to_epoch(ex["timestamp"]), iso_to_epoch(rd["timestamp"])
        st = [
            iso_to_epoch(r["timestamp"])
            for r in starting
            if t_ex <= iso_to_epoch(r["timestamp"]) <= t_rd
        ]
        if not st:
            continue
        out["kill -> agent.exited"].append((t_ex - wall0) * 1000)
        out["agent.exited -> agent.starting"].append((st[0] - t_ex) * 1000)
        out["agent.starting -> agent.ready (spawn)"].append((t_rd - st[0]) * 1000)
        out["agent.ready -> seen in /proc"].append((wall1 - t_rd) * 1000)
    return out


# --- memory overshoot: the kernel's limit against sampling -----------------------------

ALLOCATOR = """\
# 500 MB/s: a 10 MB chunk (every page written) every 20 ms; says how much it holds.
import sys, time
chunks, start = [], time.monotonic()
while True:
    chunks.append(b"\\x01" * (10 << 20))
    print(len(chunks) * 10, flush=True)
    time.sleep(max(0.0, start + len(chunks) * 0.02 - time.monotonic()))
"""
LIMIT_MB = 200


@dataclass
class Overshoot:
    mode: str
    peaks_mb: list[float] = field(default_factory=list)  # the daemon's measure of the peak
    allocated_mb: list[float] = field(default_factory=list)  # what the agent said it held
    seconds: list[float] = field(default_factory=list)  # agent start -> agent.exited
    reasons: list[str] = field(default_factory=list)


def run_overshoot(cleanup: Cleanup, cgroups: bool, trials: int) -> Overshoot:
    result = Overshoot("cgroup" if cgroups else "sampling")
    for _ in range(trials):
        tmp = cleanup.tmpdir()
        script = tmp / "alloc.py"
        script.write_text(ALLOCATOR)
        config = write_agentd_config(
            tmp / "agentd.toml", tmp / "run", {"hog": [sys.executable, str(script)]}
        )
        daemon_setting(config, 'cgroup = "required"' if cgroups else 'cgroup = "off"')
        text = config.read_text().replace('restart = "permanent"', 'restart = "temporary"')
        config.write_text(text + f"limits = {{ memory_mb = {LIMIT_MB} }}\n")
        daemon = Agentd(cleanup, config, pythonpath=AGENTD_PATH)
        try:
            ready = agent_event(daemon, "agent.ready", "hog", 30)
            exited = agent_event(daemon, "agent.exited", "hog", 30)
            memory = agent_event(daemon, "agent.memory", "hog", 1)
            if ready is None or exited is None or memory is None:
                raise RuntimeError("overshoot: no memory kill in 30 s\n" + daemon.tail())
            rec = memory[1]
            peak = rec.get("peak") if cgroups else rec.get("rss")
            result.peaks_mb.append((peak or 0) / 2**20)
            log = (tmp / "run" / "log" / "hog.log").read_text().split()
            result.allocated_mb.append(float(log[-1]) if log else 0.0)
            result.seconds.append(exited[0] - ready[0])
            result.reasons.append(exited[1].get("reason", "?"))
        finally:
            cleanup.stop(daemon.proc)
    return result


def agent_event(daemon: Agentd, event: str, agent: str, timeout: float) -> tuple | None:
    """The first `event` about `agent`: (arrival perf_counter, record), or None."""
    deadline = time.monotonic() + timeout
    with daemon.cond:
        while True:
            for t, rec in daemon.events:
                if rec.get("event") == event and rec.get("agent") == agent:
                    return t, rec
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            daemon.cond.wait(left)


def cgroup_costs(repeat: int = 50) -> dict[str, list[float]]:
    """Microseconds per cgroup step of a restart on this host, in-process (root).

    Each spawn follows 50 ms without any cgroup migration on the host, as between two
    restarts: moving a process in (cgroup.procs, the setpriv fallback's way) then waits
    for an RCU grace period; the helper's clone3 does not move anything.
    """
    from agentd.daemon import cgroup, spawn
    from agentd.daemon.spec import AgentSpec

    tree = cgroup.open_subtree(cgroup.detect(), f"agentd-bench-{os.getpid()}")
    spec = AgentSpec(name="bench", pool=None, argv=("/bin/true",), bus_agent=False)
    out: dict[str, list[float]] = {
        "mkdir + limits (Subtree.group)": [],
        "spawn, no cgroup (to its exit)": [],
        "spawn, born in its cgroup (clone3)": [],
        "spawn, moved in (sh -c, setpriv)": [],
        "reap: populated + oom_kills": [],
        "rmdir (Group.remove)": [],
    }

    def timed(key: str, group: cgroup.Group | None, move: bool = False) -> None:
        time.sleep(0.05)
        have_helper = spawn._HAVE_HELPER
        spawn._HAVE_HELPER = have_helper and not move  # moved in: the sh -c fallback
        try:
            t0 = time.perf_counter()
            spawn.spawn(spec, 0, "ipc:///nowhere", group=group).wait()
            out[key].append((time.perf_counter() - t0) * 1e6)
        finally:
            spawn._HAVE_HELPER = have_helper

    try:
        for i in range(repeat):
            t0 = time.perf_counter()
            group = tree.group("bench", i, memory_mb=512)
            out["mkdir + limits (Subtree.group)"].append((time.perf_counter() - t0) * 1e6)
            timed("spawn, no cgroup (to its exit)", None)
            timed("spawn, born in its cgroup (clone3)", group)
            timed("spawn, moved in (sh -c, setpriv)", group, move=True)
            t0 = time.perf_counter()
            group.populated()
            group.oom_kills()
            out["reap: populated + oom_kills"].append((time.perf_counter() - t0) * 1e6)
            t0 = time.perf_counter()
            while not group.remove():
                time.sleep(0.0005)
            out["rmdir (Group.remove)"].append((time.perf_counter() - t0) * 1e6)
    finally:
        tree.close()
        while True:  # the helper's trampolines are our strays here: reap them
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
    return out


# --- supervisord ---------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self._path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def make_connection(self, host):  # type: ignore[override]
        return _UnixHTTPConnection(self._path)


def supervisor_rpc(tmp: Path) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy(
        "http://localhost/RPC2", transport=_UnixTransport(str(tmp / "supervisor.sock"))
    )


def start_supervisord(
    cleanup: Cleanup, bin_dir: Path, names: list[str], command: str = " ".join(SLEEP_ARGV)
) -> tuple:
    """supervisord with one program per name, all running `command`: (proc, tmp, launched)."""
    tmp = cleanup.tmpdir()
    (tmp / "childlogs").mkdir()
    conf = SUPERVISORD_CONF.format(tmp=tmp)
    for name in names:
        conf += SUPERVISORD_PROGRAM.format(name=name, command=command)
    path = tmp / "supervisord.conf"
    path.write_text(conf)
    t_launch = time.perf_counter()
    proc = cleanup.popen(
        [str(bin_dir / "supervisord"), "-c", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp,
    )
    return proc, tmp, t_launch


def run_supervisord(cleanup: Cleanup, bin_dir: Path, kills: int) -> Latency:
    proc, _, _ = start_supervisord(cleanup, bin_dir, ["sleeper"])
    try:
        result = measure_restarts("supervisord", cleanup, proc.pid, kills, 1.2, timeout=20)
        result.note = "kills spaced 1.2 s (> startsecs=1)"
        return result
    finally:
        cleanup.stop(proc)


# --- circus --------------------------------------------------------------------------


def run_circus(cleanup: Cleanup, bin_dir: Path, kills: int, settle: float) -> Latency:
    from _common import MARK, MARK_KEY

    tmp = cleanup.tmpdir()
    path = tmp / "circus.ini"
    path.write_text(
        CIRCUS_CONF.format(
            tmp=tmp,
            name="sleeper",
            cmd=SLEEP_ARGV[0],
            args=" ".join(SLEEP_ARGV[1:]),
            mark_key=MARK_KEY,
            mark=MARK,
        )
    )
    proc = cleanup.popen(
        [str(bin_dir / "circusd"), str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp,
    )
    try:
        return measure_restarts("circus", cleanup, proc.pid, kills, settle, timeout=20)
    finally:
        cleanup.stop(proc)


# --- N agents ------------------------------------------------------------------------


@dataclass
class Footprint:
    runner: str
    start_s: float
    spawned_s: float
    rss_mib: float
    cpu_pct: float
    note: str = ""


def footprint_agentd(cleanup: Cleanup, n: int, idle: float) -> Footprint:
    tmp = cleanup.tmpdir()
    names = {f"a{i:03d}": SLEEP_ARGV for i in range(n)}
    config = write_agentd_config(tmp / "agentd.toml", tmp / "run", names, start_seconds=0)
    daemon = Agentd(cleanup, config, pythonpath=AGENTD_PATH)
    try:
        scanner = ChildScanner(daemon.pid, SLEEP_ARGV)
        t_spawned = scanner.wait_count(n, timeout=120, interval=0.005)
        ready = daemon.wait_event("daemon.ready", timeout=120)
        if ready is None or t_spawned is None:
            raise RuntimeError(f"agentd: {n} agents not up in 120 s\n" + daemon.tail())
        cleanup.seen_pids |= scanner.matched
        time.sleep(1.0)
        rss = rss_mib(daemon.pid)
        cpu = cpu_percent_over(daemon.pid, idle)
        return Footprint(
            "agentd",
            ready[0] - daemon.t_launch,
            t_spawned - daemon.t_launch,
            rss,
            cpu,
            "start = launch -> daemon.ready (start_seconds=0)",
        )
    finally:
        cleanup.stop(daemon.proc)


def footprint_supervisord(cleanup: Cleanup, bin_dir: Path, n: int, idle: float) -> Footprint:
    names = [f"a{i:03d}" for i in range(n)]
    proc, tmp, t_launch = start_supervisord(cleanup, bin_dir, names)
    try:
        scanner = ChildScanner(proc.pid, SLEEP_ARGV)
        t_spawned = scanner.wait_count(n, timeout=120, interval=0.005)
        if t_spawned is None:
            raise RuntimeError(f"supervisord: {n} programs not spawned in 120 s")
        cleanup.seen_pids |= scanner.matched
        rpc = supervisor_rpc(tmp)
        deadline = time.perf_counter() + 120
        t_running = None
        while time.perf_counter() < deadline:
            try:
                states = [p["statename"] for p in rpc.supervisor.getAllProcessInfo()]
            except (OSError, xmlrpc.client.Fault, http.client.HTTPException):
                states = []
            if len(states) == n and all(s == "RUNNING" for s in states):
                t_running = time.perf_counter()
                break
            time.sleep(0.02)
        if t_running is None:
            raise RuntimeError(f"supervisord: {n} programs not RUNNING in 120 s")
        time.sleep(1.0)
        rss = rss_mib(proc.pid)
        cpu = cpu_percent_over(proc.pid, idle)
        return Footprint(
            "supervisord",
            t_running - t_launch,
            t_spawned - t_launch,
            rss,
            cpu,
            "start = launch -> all RUNNING (startsecs=1)",
        )
    finally:
        cleanup.stop(proc)


# --- report --------------------------------------------------------------------------


def report(
    lat: list[Latency],
    breakdowns: dict[str, dict[str, list[float]]],
    feet: list[Footprint],
    args: argparse.Namespace,
    overshoots: list[Overshoot] | None = None,
    costs: dict[str, list[float]] | None = None,
) -> None:
    bare = next((r for r in lat if r.runner == "bare" and r.samples_ms), None)
    bare_med = median(bare.samples_ms) if bare else float("nan")
    print()
    print("restart latency (kill -> replacement running), /bin/sleep 100000, detector: /proc")
    print("scan of the supervisor's direct children every 0.2 ms, same for all runners")
    print(f"agentd under test: {args.agentd_label}")
    print(f"{'runner':<13}{'kills':>6}{'median ms':>12}{'p90 ms':>10}{'vs bare':>12}  note")
    for r in lat:
        med = median(r.samples_ms)
        p90 = percentile(r.samples_ms, 90)
        vs = "" if r is bare else f"{med - bare_med:+.2f} ms"
        kills = f"{len(r.samples_ms)}" + (f"/{r.kills}" if len(r.samples_ms) != r.kills else "")
        note = r.note
        if r.failures:
            note += f" {r.failures} kill(s) not replaced within timeout"
        print(f"{r.runner:<13}{kills:>6}{med:>12.2f}{p90:>10.2f}{vs:>12}  {note}")
    for name in ("agentd", "agentd-cg", "agentd-nopd"):
        agentd = next((r for r in lat if r.runner == name and r.samples_ms), None)
        if agentd and bare:
            over = median(agentd.samples_ms) - bare_med
            verdict = "MET" if over < 2.0 else "MISSED"
            print(f"target: {name} adds < 2 ms over bare median -> {over:+.2f} ms  {verdict}")
    plain = next((r for r in lat if r.runner == "agentd" and r.samples_ms), None)
    cg = next((r for r in lat if r.runner == "agentd-cg" and r.samples_ms), None)
    if plain and cg:
        added = median(cg.samples_ms) - median(plain.samples_ms)
        verdict = "MET" if added <= 1.0 else "MISSED"
        print(f"target: agentd-cg adds <= 1 ms over agentd median -> {added:+.2f} ms  {verdict}")
    print('agentd: cgroup = "off"; agentd-cg: cgroup = "required" (a cgroup per incarnation)')
    print("agentd-nopd: `death_signal = false` (no death-signal trampoline; the guard still reaps)")
    shown = {name: b for name, b in breakdowns.items() if b and any(b.values())}
    if shown:
        names = list(shown)
        print()
        print("restart, from agentd's own event timestamps (median ms)")
        print(f"  {'step':<40}" + "".join(f"{n:>12}" for n in names))
        for step in next(iter(shown.values())):
            cells = "".join(f"{median(shown[n].get(step, [])):>12.2f}" for n in names)
            print(f"  {step:<40}{cells}")
    if costs:
        print()
        print("cgroup operations on this host, in-process (median / p90 microseconds)")
        for step, values in costs.items():
            print(f"  {step:<40}{median(values):>8.0f}{percentile(values, 90):>9.0f}")
    if overshoots:
        print()
        print(f"memory overshoot: 500 MB/s allocator, limits.memory_mb = {LIMIT_MB} (medians)")
        print(
            f"{'mode':<10}{'runs':>5}{'peak MB':>10}{'peak/limit':>12}"
            f"{'held MB':>10}{'held/limit':>12}{'kill s':>9}  reasons"
        )
        for o in overshoots:
            if not o.peaks_mb:
                continue
            peak, held = median(o.peaks_mb), median(o.allocated_mb)
            print(
                f"{o.mode:<10}{len(o.peaks_mb):>5}{peak:>10.0f}{peak / LIMIT_MB:>12.2f}"
                f"{held:>10.0f}{held / LIMIT_MB:>12.2f}{median(o.seconds):>9.2f}  "
                + ",".join(sorted(set(o.reasons)))
            )
        print("peak: cgroup = the cgroup's own high-water mark (memory.peak / max_usage_in_bytes);")
        print("sampling = the RSS sample that tripped the limit. held: the agent's own count of")
        print("what it had allocated when it was killed. kill s: agent.ready -> agent.exited.")
    if feet:
        print()
        print(f"{args.agents} agents   start s  spawned s   RSS MiB  idle CPU %  note")
        for f in feet:
            print(
                f"{f.runner:<12}{f.start_s:>8.2f}{f.spawned_s:>11.2f}{f.rss_mib:>10.1f}"
                f"{f.cpu_pct:>12.2f}  {f.note}"
            )
        a = next((f for f in feet if f.runner == "agentd"), None)
        if a:
            checks = [
                (f"start {args.agents} < 1 s", a.start_s < 1.0, f"{a.start_s:.2f} s"),
                ("RSS < 40 MiB", a.rss_mib < 40, f"{a.rss_mib:.1f} MiB"),
                ("idle CPU < 0.5%", a.cpu_pct < 0.5, f"{a.cpu_pct:.2f} %"),
            ]
            for label, ok, value in checks:
                print(f"target: agentd {label:<18} -> {value:<10} {'MET' if ok else 'MISSED'}")
        print(f"(idle CPU over {args.idle_seconds:g} s, daemon process only, 100% = one core)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kills for bare and agentd")
    parser.add_argument("--kills-slow", type=int, default=20, help="kills for supervisord, circus")
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument(
        "--settle", type=float, default=0.05, help="replacement uptime between kills"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of parts to skip: bare,agentd,cgroup,memory,supervisord,circus,footprint",
    )
    parser.add_argument("--memory-trials", type=int, default=3)
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
    lat: list[Latency] = []
    breakdowns: dict[str, dict[str, list[float]]] = {}
    feet: list[Footprint] = []
    overshoots: list[Overshoot] = []
    costs: dict[str, list[float]] = {}
    leftovers = []
    try:
        global AGENTD_PATH
        if args.agentd_rev:
            rev = subprocess.run(
                [
                    "git",
                    "-C",
                    str(Path(__file__).resolve().parent.parent),
                    "rev-parse",
                    "--short",
                    args.agentd_rev,
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            AGENTD_PATH = export_agentd(rev, cleanup.tmpdir("agentd-src-"))
            print(f"agentd: committed revision {rev}", file=sys.stderr)
            args.agentd_label = f"agentd @ {rev}"
        else:
            args.agentd_label = "agentd (installed working tree)"
        bin_dir = None
        if not {"supervisord", "circus"} <= skip or "footprint" not in skip:
            bin_dir = bench_venv()
        if "bare" not in skip:
            print(f"bare: {args.kills} kills ...", file=sys.stderr, flush=True)
            lat.append(run_bare(cleanup, args.kills, args.settle))
        if "agentd" not in skip:
            print(f"agentd: {args.kills} kills ...", file=sys.stderr, flush=True)
            if "cgroup" in skip:
                result, breakdowns["agentd"] = run_agentd(cleanup, args.kills, args.settle)
                lat.append(result)
            else:
                print(
                    f"agentd and agentd with cgroups, interleaved: {args.kills} kills each ...",
                    file=sys.stderr,
                    flush=True,
                )
                pair, found = run_agentd_pair(cleanup, args.kills, args.settle)
                lat += pair
                breakdowns.update(found)
            print(
                f"agentd (death_signal = false): {args.kills} kills ...",
                file=sys.stderr,
                flush=True,
            )
            lat.append(run_agentd(cleanup, args.kills, args.settle, death_signal=False)[0])
        if "memory" not in skip:
            for cgroups in (True, False):
                mode = "cgroup" if cgroups else "sampling"
                print(f"memory overshoot ({mode}) ...", file=sys.stderr, flush=True)
                overshoots.append(run_overshoot(cleanup, cgroups, args.memory_trials))
            if AGENTD_PATH is None:
                costs = cgroup_costs()
        if "supervisord" not in skip:
            assert bin_dir is not None
            print(f"supervisord: {args.kills_slow} kills ...", file=sys.stderr, flush=True)
            lat.append(run_supervisord(cleanup, bin_dir, args.kills_slow))
        if "circus" not in skip:
            assert bin_dir is not None
            print(f"circus: {args.kills_slow} kills ...", file=sys.stderr, flush=True)
            lat.append(run_circus(cleanup, bin_dir, args.kills_slow, args.settle))
        if "footprint" not in skip:
            assert bin_dir is not None
            print(f"agentd: {args.agents} agents ...", file=sys.stderr, flush=True)
            feet.append(footprint_agentd(cleanup, args.agents, args.idle_seconds))
            print(f"supervisord: {args.agents} programs ...", file=sys.stderr, flush=True)
            feet.append(footprint_supervisord(cleanup, bin_dir, args.agents, args.idle_seconds))
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
        if lat or feet or overshoots:
            report(lat, breakdowns, feet, args, overshoots, costs)
    if not leftovers:
        print("\ncleanup: no sleep processes left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
