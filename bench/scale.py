#!/usr/bin/env python3
"""Scale: N idle SDK agents under agentd, fork against exec, supervisord as the anchor.

    python bench/scale.py [--sizes 100,1000,5000,10000] [--modes fork,ksm,exec]
                          [--quick] [--no-supervisord] [--idle-seconds 10]
                          [--kills 20] [--spawns 20] [--cgroup auto] [--py-spy DIR]
                          [--mem-fraction 0.6] [--no-fit] [--heartbeat S]

For each start mode and each N (smallest first), one daemon runs a pool of N
idle SDK agents (`bench/scale_agent.py`, `replicas = N`, `start = MODE`) and an
empty dynamic supervisor whose template is the same agent. Measured:

- all READY: launch of `agentd run` -> its `daemon.ready` event (the pool is
  its only configured child, so that is the last member's READY); also the
  first `agent.starting` -> last `agent.ready`, from the daemon's timestamps.
- memory: PSS and USS (Private_Clean + Private_Dirty) of every agent from
  /proc/PID/smaps_rollup (median and mean), the template's PSS (the shared
  pages' owner), RSS of the daemon and of the broker (the `bus` agent), and
  the drop in the host's MemAvailable per agent (what N agents cost the
  machine, kernel and cgroups included; noisy on a shared host).
- idle CPU over --idle-seconds (10) after the start settled: utime + stime
  from /proc/PID/stat of the daemon, the broker, and all agents plus the
  template, in % of one core.
- `agentd ctl status` wall time: median of 5 (after one warm-up), the whole
  process (Python start included, as a user types it).
- kill -> READY: SIGKILL one member's pid, time until the daemon's JSON log line
  `agent.ready` for that member with a new pid arrives (the log line is read
  by a thread and stamped on arrival); --kills (20) members spread over the
  pool, one at a time, median.
- spawn -> READY: `Client.spawn("dyn", NAME)` on one Client kept open, time
  until that child's `agent.ready` line arrives (and, beside it, until
  `spawn` returned); --spawns (20), one at a time, median.
- CPU per agent, start to idle: utime + stime so far of the agents, the
  daemon, the broker and the template, over N (what one start costs the host).
- where one agent's memory goes (/proc/PID/smaps grouped by mapping), printed
  for each mode at the largest N it reached.

Mode `ksm` is fork with `memory_ksm = true`: the kernel's KSM merges the agents'
copy-on-write copies of their template's pages, which are mostly alike. The
bench turns ksmd on (`run`, and `pages_to_scan` = --ksm-scan, 5000) for that
size and puts both back after. KSM merges an agent only a while after it
started, so the pool is started in steps (--ksm-step, 1000, by `ctl scale`),
each once the memory floor leaves room for a step of unmerged agents; memory
is measured once merging has levelled off, and the idle window runs ksmd at
--ksm-idle-scan (100, the kernel's default), its CPU counted with ours. Its
"ready s" is launch -> the last step's READY, the waits for KSM included.

Before each size the bench checks what the host has: MemAvailable (the size's
estimated memory must fit in 60 % of it; the estimate is the last size's
measured cost per agent, or a default), pid_max and threads-max (three threads
per agent: main, libzmq's IO and reaper threads), and it watches MemAvailable
during the start (a size is stopped below 10 % of RAM). A size that does not
come up — an agent that fails to start, the daemon exiting, EMFILE in its
output, a deadline — is stopped with the reason printed, and the larger sizes
of that mode are skipped. A size that does not fit is replaced by the most
agents that do (a multiple of 100; --no-fit: stop there). A start whose agents
miss the READY deadline (`heartbeat`, 10 s: N concurrent exec starts on two
cores do) is reported, then run again with a longer heartbeat (row "hb=S").
RLIMIT_NOFILE is not assumed: the daemon's and the
broker's fds per agent are printed, so the cap they imply can be read off. The
agents have `redirect_stderr = true`: one pipe each, so one daemon fd per agent
(with two, a 20,000 fd limit stops short of 10,000).

supervisord (from bench/.venv-bench) runs 500 programs of a minimal idle
Python process (`python -c 'import time; time.sleep(1e9)'`, lighter than an
SDK agent: no zmq, no asyncio) with its defaults (startsecs = 1): time to all
RUNNING (launch -> XML-RPC getAllProcessInfo all RUNNING), RSS and PSS per
program, idle CPU of supervisord + programs, `supervisorctl status` time.

Everything started is stopped between sizes and at the end (_common.Cleanup),
also on Ctrl-C; the bench then checks that no agent, template or program of
its own is left.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import math
import os
import resource
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH_DIR,
    MARK,
    MARK_KEY,
    Agentd,
    Cleanup,
    agentd_console_script,
    bench_venv,
    install_sigterm_as_interrupt,
    iso_to_epoch,
    median,
    time_command,
)
from restart import start_supervisord, supervisor_rpc

MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
THREADS_PER_AGENT = 3  # main + libzmq's IO thread and reaper thread
MEM_FRACTION = 0.60  # a size's estimate must fit in this share of MemAvailable
MEM_FLOOR = 0.10  # stop a size if MemAvailable falls below this share of RAM
# Default per-agent cost (MiB of host memory) until a size has been measured.
DEFAULT_COST_MIB = {"fork": 6.0, "exec": 20.0, "ksm": 2.0}  # ksm: once merged
KSM = Path("/sys/kernel/mm/ksm")
UNMERGED_KIB = 6.0 * 1024  # what a forked agent costs before KSM has merged its pages
SLEEPER = [sys.executable, "-c", "import time; time.sleep(1e9)"]
FAIL_WORDS = ("Too many open files", "EMFILE")  # in the daemon's output: this size stops

TARGETS = {
    "agents": 10_000,
    "pss_mib": 2.0,
    "ready_s": 30.0,
    "kill_ms": 5.0,
    "spawn_ms": 5.0,
    "cpu_pct": 5.0,
    "status_s": 1.0,
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- /proc readers -----------------------------------------------------------------


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def threads_in_use() -> int:
    """Tasks (threads) on the host now: what pid_max and threads-max count."""
    return sum(1 for _ in Path("/proc").glob("[0-9]*/task/[0-9]*"))


def cpu_seconds(pid: int) -> float | None:
    """CPU time of the process's live threads, in seconds, from each one's schedstat.

    The scheduler's own count, in ns. stat(5)'s utime + stime are sampled at clock
    ticks, and an idle agent's heartbeat (a fraction of a ms, woken by a timer just
    after a tick) is almost never running when one falls: 1,000 idle agents read
    as 0 % there.
    """
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def rollup(pid: int) -> dict[str, int] | None:
    """/proc/PID/smaps_rollup in KiB (Rss, Pss, Private_Clean, Private_Dirty, ...)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            out[key] = int(parts[0])
    return out


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def host_busy_ticks() -> int:
    """Ticks all cores spent busy (not idle or iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return sum(cpu) - cpu[3] - cpu[4]


def idle_cpu(groups: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """% of one core used by each group of pids over `seconds` (a pid gone counts 0).

    Also "host": every core's busy time over the same window (the noise of a shared host).
    """
    before = {g: [cpu_seconds(p) for p in pids] for g, pids in groups.items()}
    host0 = host_busy_ticks()
    t0 = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - t0
    host1 = host_busy_ticks()
    after = {g: [cpu_seconds(p) for p in pids] for g, pids in groups.items()}
    out = {"host": 100.0 * (host1 - host0) / TICK / wall}
    for g in groups:
        used = sum(
            b - a
            for a, b in zip(before[g], after[g], strict=True)
            if a is not None and b is not None
        )
        out[g] = 100.0 * used / wall
    return out


# --- where one process's memory goes ----------------------------------------------


def thread_stack_pointers(pid: int) -> list[int]:
    """Stack pointers of the threads other than the main one (from /proc/PID/task/*/syscall)."""
    sps = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name == str(pid):
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parts = (task / "syscall").read_text().split()
            if len(parts) >= 8:
                sps.append(int(parts[-2], 16))
    return sps


def classify(start: int, end: int, perms: str, path: str, sps: list[int]) -> str:
    """The group a mapping is counted in."""
    if path == "[heap]":
        return "[heap] (brk: malloc main arena)"
    if path == "[stack]":
        return "[stack] (main thread)"
    if path in ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]"):
        return "[vdso]/[vvar]"
    if not path:
        if any(start <= sp < end for sp in sps):
            return "anon: thread stacks"
        if start % (64 * MIB) == 0 and "rw" in perms:
            return "anon: malloc thread arenas (64 MiB aligned)"
        return "anon: other (pymalloc arenas, big mallocs, mmap)"
    name = os.path.basename(path.split(" (deleted)")[0])
    if name.startswith("libzmq"):
        return "libzmq.so"
    if name.startswith("libpython"):
        return "libpython.so"
    if ".cpython-" in name and name.endswith(".so"):
        return "extension modules (*.cpython-*.so)"
    if ".so" in name:
        return "other .so: " + name.split(".so")[0]
    if path.startswith("/memfd:") or path.startswith("/dev/"):
        return "memfd / dev"
    return "file: " + name


def smaps_breakdown(pid: int) -> dict[str, dict[str, int]]:
    """KiB per mapping group: count, Rss, Pss, Private_Dirty, Shared_Dirty, Private_Clean."""
    sps = thread_stack_pointers(pid)
    groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    current: dict[str, int] | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                path = head[5].strip() if len(head) > 5 else ""
                current = groups[classify(lo, hi, head[1], path, sps)]
                current["count"] += 1
                continue
            key = head[0].rstrip(":")
            if current is not None and key in (
                "Rss",
                "Pss",
                "Private_Dirty",
                "Shared_Dirty",
                "Private_Clean",
                "Shared_Clean",
            ):
                current[key] += int(head[1])
    return {k: dict(v) for k, v in groups.items()}


# --- results ------------------------------------------------------------------------


@dataclass
class Run:
    """One runner at one size."""

    runner: str  # "fork", "exec", "supervisord"
    n: int
    heartbeat: float | None = None  # None: the default (10 s)
    reached: int = 0  # members READY (programs RUNNING)
    stop: str = ""  # why this size stopped short ("" = it ran)
    ready_s: float = float("nan")
    span_s: float = float("nan")  # first agent.starting -> last agent.ready (daemon clock)
    pss_med: float = float("nan")  # KiB
    pss_mean: float = float("nan")
    uss_mean: float = float("nan")
    template_pss: float = float("nan")
    daemon_rss: float = float("nan")  # KiB
    broker_rss: float = float("nan")
    host_kib: float = float("nan")  # MemAvailable drop per agent
    daemon_fds: int = -1
    broker_fds: int = -1
    cpu: dict[str, float] = field(default_factory=dict)
    status_ms: list[float] = field(default_factory=list)
    kill_ms: list[float] = field(default_factory=list)
    kill_daemon_ms: list[float] = field(default_factory=list)  # kill -> ready, daemon's stamp
    kill_steps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    spawn_ms: list[float] = field(default_factory=list)
    spawn_return_ms: list[float] = field(default_factory=list)
    stop_s: float = float("nan")
    ksm_settle_s: float = float("nan")  # all READY -> KSM's merging levelled off
    progress: list[tuple[float, int]] = field(default_factory=list)
    start_cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU so far / N, per process
    load: float = math.nan  # 1-minute load average after the idle window
    profile: dict[str, dict[str, int]] = field(default_factory=dict)
    profile_pid: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.runner + ("" if self.heartbeat is None else f" hb={self.heartbeat:g}")

    @property
    def cpu_total(self) -> float:
        return sum(v for k, v in self.cpu.items() if k != "host") if self.cpu else math.nan


# --- events, read incrementally (a rescan per line would be O(N^2) at 10,000) -------


class Cursor:
    """A position in an Agentd's event list; `take` hands out what arrived since."""

    def __init__(self, daemon: Agentd, pos: int | None = None) -> None:
        self.d = daemon
        with daemon.cond:
            self.pos = len(daemon.events) if pos is None else pos

    def take(self, timeout: float) -> list[tuple[float, dict[str, Any]]]:
        """New events, waiting up to `timeout` for at least one."""
        with self.d.cond:
            if self.pos >= len(self.d.events):
                self.d.cond.wait(timeout)
            new = self.d.events[self.pos :]
            self.pos += len(new)
        return new

    def until(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float
    ) -> tuple[float, dict[str, Any]] | None:
        """The first new event that satisfies `pred` (None on timeout or EOF)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.d.cond:
                while self.pos < len(self.d.events):
                    t, rec = self.d.events[self.pos]
                    self.pos += 1
                    if rec.get("event") == "eof":
                        self.pos -= 1
                        return None
                    if pred(rec):
                        return t, rec
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.d.cond.wait(min(left, 0.5))


def failure(rec: dict[str, Any]) -> str | None:
    """Why this event means the size is not coming up, or None."""
    event = rec.get("event", "")
    if event == "eof":
        return "the daemon exited"
    if event == "agent.exited" or event.endswith("start_failed") or event == "agent.failed":
        tail = " | ".join(rec.get("stderr_tail") or [])[-300:]
        return f"{event} {rec.get('agent')}: reason={rec.get('reason')} code={rec.get('code')}" + (
            f" stderr: {tail}" if tail else ""
        )
    if rec.get("level") in ("error", "critical"):
        return f"{event}: " + str({k: v for k, v in rec.items() if k not in ("timestamp",)})[:400]
    if event == "raw":
        line = rec.get("line", "")
        if any(w in line for w in FAIL_WORDS):
            return "daemon output: " + line[:300]
    return None


# --- agentd at one size --------------------------------------------------------------


def write_config(
    tmp: Path, n: int, mode: str, cgroup: str, spawns: int, heartbeat: float | None = None
) -> Path:
    path = tmp / "agentd.toml"
    beat = "" if heartbeat is None else f"heartbeat = {heartbeat:g}\n"
    beat += "redirect_stderr = true\n"  # one pipe: one daemon fd per agent, not two
    if mode == "ksm":  # forked agents whose pages KSM may merge
        mode, beat = "fork", beat + "memory_ksm = true\n"
    path.write_text(
        f"""\
[daemon]
runtime_dir = "{tmp}/run"
state_dir = "{tmp}/state"
cgroup = "{cgroup}"

[supervisor]
children = ["idle", "dyn"]
max_restarts = 10000
max_seconds = 1

[supervisors.dyn]
strategy = "dynamic"
template = "spawned"
max_children = {max(spawns, 1) + 10}

[agents.idle]
module = "scale_agent:Idle"
cwd = "{BENCH_DIR}"
replicas = {n}
start = "{mode}"
{beat}
[agents.spawned]
module = "scale_agent:Idle"
cwd = "{BENCH_DIR}"
start = "{mode}"
restart = "temporary"
{beat}"""
    )
    return path


def preflight(mode: str, n: int, cost_mib: float) -> str:
    """Why this size cannot run on this host now ("" if it can)."""
    if mode == "ksm" and not (KSM / "run").exists():
        return "this kernel has no KSM (/sys/kernel/mm/ksm)"
    mem = meminfo()
    need = cost_mib * n * 1024
    if need > MEM_FRACTION * mem["MemAvailable"]:
        return (
            f"memory: {n} x {cost_mib:.1f} MiB = {need / MIB:.1f} GiB > "
            f"{MEM_FRACTION:.0%} of MemAvailable {mem['MemAvailable'] / MIB:.1f} GiB"
        )
    pid_max = read_int("/proc/sys/kernel/pid_max") or 32768
    threads_max = read_int("/proc/sys/kernel/threads-max") or pid_max
    limit = min(pid_max, threads_max)
    used = threads_in_use()
    want = THREADS_PER_AGENT * (n + 1) + 50  # + the template, daemon and broker threads
    if used + want > 0.97 * limit:
        return (
            f"pids: {n} agents x {THREADS_PER_AGENT} threads + {used} tasks running "
            f"= {used + want} > 97% of min(pid_max {pid_max}, threads-max {threads_max})"
        )
    return ""


def fitting(cost_mib: float) -> int:
    """The most agents (a multiple of 100) that pass `preflight` on this host now."""
    mem = MEM_FRACTION * meminfo()["MemAvailable"] / (cost_mib * 1024)
    pid_max = read_int("/proc/sys/kernel/pid_max") or 32768
    limit = min(pid_max, read_int("/proc/sys/kernel/threads-max") or pid_max)
    pids = (0.97 * limit - threads_in_use() - 50) / THREADS_PER_AGENT - 1
    return max(0, int(min(mem, pids) // 100 * 100))


class Starter:
    """Launch -> all READY, watching for failures, memory and a deadline."""

    def __init__(self, daemon: Agentd, n: int, deadline_s: float) -> None:
        self.daemon, self.n, self.deadline_s = daemon, n, deadline_s
        self.cursor = Cursor(daemon, 0)
        self.pids: dict[str, int] = {}  # member -> pid of its READY incarnation
        self.broker = 0
        self.template = 0
        self.first_starting: float | None = None
        self.last_ready: float | None = None
        self.progress: list[tuple[float, int]] = []  # (seconds since launch, members READY)
        self.raw: list[str] = []  # the daemon's non-JSON output (tracebacks), first 200 lines

    def note(self, rec: dict[str, Any]) -> None:
        event, agent = rec.get("event"), rec.get("agent", "")
        if event == "agent.ready":
            if agent == "bus":
                self.broker = rec["pid"]
            else:
                self.pids[agent] = rec["pid"]
                if agent.startswith("idle@"):
                    self.last_ready = iso_to_epoch(rec["timestamp"])
        elif event == "agent.starting" and agent.startswith("idle@"):
            if self.first_starting is None:
                self.first_starting = iso_to_epoch(rec["timestamp"])
        elif event == "template.started":
            self.template = rec.get("pid", 0)

    def members_ready(self) -> int:
        return sum(1 for a in self.pids if a.startswith("idle@"))

    def run(self, members: int | None = None) -> tuple[float | None, str]:
        """(perf_counter of daemon.ready, "") or (None, why not).

        With `members`: until that many pool members are READY (a `ctl scale` step).
        """
        floor = MEM_FLOOR * meminfo()["MemTotal"]
        deadline = time.monotonic() + self.deadline_s
        last_print = time.monotonic()
        while True:
            for t, rec in self.cursor.take(0.25):
                why = failure(rec)
                if why:
                    return None, why
                self.note(rec)
                if rec.get("event") == "raw" and len(self.raw) < 200:
                    self.raw.append(rec.get("line", ""))
                if members is None and rec.get("event") == "daemon.ready":
                    return t, ""
                if members is not None and self.members_ready() >= members:
                    return t, ""
            now = time.monotonic()
            if now > deadline:
                return None, f"deadline: {self.deadline_s:.0f} s passed"
            if meminfo()["MemAvailable"] < floor:
                return None, f"memory: MemAvailable fell below {MEM_FLOOR:.0%} of RAM"
            if now - last_print > 5:
                ready = self.members_ready()
                log(f"    {ready}/{self.n} READY, daemon fds {fd_count(self.daemon.pid)}")
                self.progress.append((time.perf_counter() - self.daemon.t_launch, ready))
                last_print = now


class Ksmd:
    """The kernel's KSM for one size: on, scanning fast while agents start and merge.

    What it was (run, pages_to_scan) is put back on exit: the host's KSM is the
    operator's, and the bench only borrows it.
    """

    KNOBS = ("run", "pages_to_scan")

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.saved = {k: (KSM / k).read_text().strip() for k in self.KNOBS}
        self.pid = next(
            (p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "ksmd"), 0
        )

    def start(self) -> Ksmd:
        self.set(pages_to_scan=self.args.ksm_scan, run=1)
        return self

    def restore(self) -> None:
        self.set(**self.saved)

    def set(self, **knobs: object) -> None:
        for knob, value in knobs.items():
            (KSM / knob).write_text(f"{value}\n")

    @staticmethod
    def sharing() -> int:
        """Pages that KSM maps in place of a duplicate (what it saves)."""
        return int((KSM / "pages_sharing").read_text())

    def settle(self, timeout: float) -> float:
        """Wait until merging levels off (< 0.5 % more in 10 s); seconds it took."""
        t0 = time.monotonic()
        prev = self.sharing()
        while time.monotonic() - t0 < timeout:
            time.sleep(10.0)
            now = self.sharing()
            if now > 0 and now - prev < 0.005 * now:
                break
            log(f"    KSM: {now * 4 / MIB:.2f} GiB merged so far")
            prev = now
        return time.monotonic() - t0


def room_for(agents: int, timeout: float) -> bool:
    """Wait until `agents` unmerged starts fit above the memory floor (KSM frees it)."""
    deadline = time.monotonic() + timeout
    while True:
        mem = meminfo()
        if mem["MemAvailable"] - MEM_FLOOR * mem["MemTotal"] > 1.2 * agents * UNMERGED_KIB:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(2.0)


def scale_in_steps(
    run: Run, config: Path, starter: Starter, n: int, step: int, timeout: float
) -> str:
    """Grow the pool to N by `ctl scale`, a step at a time, each once KSM made room.

    KSM merges an agent's pages only some time after it started, so starting all of
    N at once needs N unmerged agents' memory; in steps it needs one step's.
    """
    target = min(n, step)
    while target < n:
        target = min(n, target + step)
        if not room_for(target - starter.members_ready(), timeout):
            return f"memory: KSM had not made room for {step} more in {timeout:.0f} s"
        result = subprocess.run(
            [
                str(agentd_console_script()),
                "ctl",
                "--config",
                str(config),
                "scale",
                "idle",
                str(target),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            return f"ctl scale idle {target}: {result.stderr.strip()[:200]}"
        _, why = starter.run(members=target)
        if why:
            return why
        run.notes.append(f"{target} READY at {time.perf_counter() - starter.daemon.t_launch:.1f} s")
    return ""


def run_agentd(
    cleanup: Cleanup,
    mode: str,
    n: int,
    args: argparse.Namespace,
    profile: bool,
    heartbeat: float | None = None,
) -> Run:
    run = Run(mode, n, heartbeat=heartbeat)
    tmp = cleanup.tmpdir("agentd-scale-")
    first = min(n, args.ksm_step) if mode == "ksm" else n
    config = write_config(tmp, first, mode, args.cgroup, args.spawns, heartbeat)
    avail0 = meminfo()["MemAvailable"]
    ksmd = Ksmd(args).start() if mode == "ksm" else None
    daemon = Agentd(cleanup, config)
    spy = None
    try:
        if args.py_spy:
            spy = PySpy(args.py_spy, f"{mode}-{n}-startup", daemon.pid)
        forked = mode in ("fork", "ksm")
        starter = Starter(daemon, n, deadline_s=60 + (0.1 if forked else 1.0) * n)
        t_ready, why = starter.run()
        if t_ready is not None and ksmd is not None and first < n:
            why = scale_in_steps(run, config, starter, n, first, args.ksm_wait)
            t_ready = None if why else time.perf_counter()
        if spy:
            spy.stop()
            spy = None
        run.reached = sum(1 for a in starter.pids if a.startswith("idle@"))
        run.progress = starter.progress
        if starter.raw:
            shown = "\n      ".join(starter.raw[:40])
            run.notes.append(f"the daemon's non-JSON output:\n      {shown}")
        if t_ready is None:
            run.stop = why
            run.notes.append(f"daemon fds at the stop: {fd_count(daemon.pid)}")
            return run
        run.ready_s = t_ready - daemon.t_launch
        if starter.first_starting and starter.last_ready:
            run.span_s = starter.last_ready - starter.first_starting
        if ksmd is not None:
            run.ksm_settle_s = ksmd.settle(args.ksm_wait)
        measure_idle(run, daemon, starter, args, avail0, ksmd)
        if args.py_spy:
            PySpy(args.py_spy, f"{mode}-{n}-idle", daemon.pid).wait(args.idle_seconds)
            if starter.broker:
                PySpy(args.py_spy, f"{mode}-{n}-broker-idle", starter.broker).wait(
                    args.idle_seconds
                )
        run.status_ms = time_command(
            [str(agentd_console_script()), "ctl", "--config", str(config), "status"],
            runs=args.status_runs,
            warmup=1,
        )
        measure_kills(run, daemon, starter, args.kills)
        measure_spawns(run, daemon, tmp, args.spawns)
        if profile:
            pid = sorted(starter.pids[a] for a in starter.pids if a.startswith("idle@"))[n // 2]
            with contextlib.suppress(OSError):
                run.profile = smaps_breakdown(pid)
                run.profile_pid = pid
        return run
    finally:
        if spy:
            spy.stop()
        stop_and_sweep(cleanup, daemon.proc, run, timeout=max(30.0, 0.02 * n))
        if ksmd is not None:
            ksmd.restore()


def measure_idle(
    run: Run,
    daemon: Agentd,
    starter: Starter,
    args: argparse.Namespace,
    avail0: int,
    ksmd: Ksmd | None = None,
) -> None:
    time.sleep(args.settle)
    agents = [p for a, p in starter.pids.items() if a.startswith("idle@")]
    rolls = [r for r in (rollup(p) for p in agents) if r]
    pss = [r["Pss"] for r in rolls]
    uss = [r["Private_Clean"] + r["Private_Dirty"] for r in rolls]
    run.pss_med = median(pss)
    run.pss_mean = sum(pss) / len(pss) if pss else float("nan")
    run.uss_mean = sum(uss) / len(uss) if uss else float("nan")
    if starter.template:
        tr = rollup(starter.template)
        run.template_pss = tr["Pss"] if tr else float("nan")
    run.daemon_rss = rss_kib(daemon.pid)
    run.broker_rss = rss_kib(starter.broker) if starter.broker else float("nan")
    run.daemon_fds = fd_count(daemon.pid)
    run.broker_fds = fd_count(starter.broker) if starter.broker else -1
    run.host_kib = (avail0 - meminfo()["MemAvailable"]) / run.n
    for key, pids in (
        ("agents", agents),
        ("daemon", [daemon.pid]),
        ("broker", [starter.broker] if starter.broker else []),
        ("template", [starter.template] if starter.template else []),
    ):
        seconds = sum(t for t in (cpu_seconds(p) for p in pids) if t is not None)
        run.start_cpu_ms[key] = 1000.0 * seconds / run.n
    groups = {
        "daemon": [daemon.pid],
        "broker": [starter.broker] if starter.broker else [],
        "agents": agents + ([starter.template] if starter.template else []),
    }
    if ksmd is not None:  # merged: scan at the idle rate, and count ksmd's CPU as ours
        ksmd.set(pages_to_scan=args.ksm_idle_scan)
        groups["ksmd"] = [ksmd.pid]
    run.cpu = idle_cpu(groups, args.idle_seconds)
    run.load = os.getloadavg()[0]


def measure_kills(run: Run, daemon: Agentd, starter: Starter, kills: int) -> None:
    """SIGKILL one member at a time; kill -> its agent.ready line with a new pid."""
    members = sorted(a for a in starter.pids if a.startswith("idle@"))
    if not members or kills <= 0:
        return
    step = max(1, len(members) // kills)
    for name in members[::step][:kills]:
        old = starter.pids[name]
        cursor = Cursor(daemon)
        seen: dict[str, float] = {}

        def done(
            r: dict[str, Any], name: str = name, old: int = old, seen: dict[str, float] = seen
        ) -> bool:
            if r.get("agent") != name:
                return False
            seen.setdefault(r.get("event", ""), iso_to_epoch(r["timestamp"]))
            return r.get("event") == "agent.ready" and r.get("pid") != old

        wall0 = time.time()
        t0 = time.perf_counter()
        os.kill(old, signal.SIGKILL)
        got = cursor.until(done, timeout=30)
        if got is None:
            run.notes.append(f"kill of {name}: no new agent.ready in 30 s")
            break
        run.kill_ms.append((got[0] - t0) * 1000)
        t_ready = iso_to_epoch(got[1]["timestamp"])
        run.kill_daemon_ms.append((t_ready - wall0) * 1000)
        marks = [("kill", wall0)] + [
            (e, seen[e]) for e in ("agent.exited", "agent.starting") if e in seen
        ]
        marks.append(("agent.ready", t_ready))
        for (a, ta), (b, tb) in itertools.pairwise(marks):
            run.kill_steps[f"{a} -> {b}"].append((tb - ta) * 1000)
        starter.pids[name] = got[1]["pid"]
        time.sleep(0.05)


def measure_spawns(run: Run, daemon: Agentd, tmp: Path, spawns: int) -> None:
    """Client.spawn one child at a time; -> its agent.ready line, and -> spawn returned."""
    if spawns <= 0:
        return
    from agentd.bus import Client

    with Client(f"ipc://{tmp}/run/bus.sock", name="scale-bench") as client:
        for i in range(spawns):
            name = f"s{i}"
            cursor = Cursor(daemon)
            t0 = time.perf_counter()
            try:
                client.spawn("dyn", name, timeout=30)
            except Exception as exc:  # the bench reports it and goes on
                run.notes.append(f"spawn {name}: {type(exc).__name__}: {exc}")
                break
            t_ret = time.perf_counter()
            got = cursor.until(
                lambda r, name=name: r.get("event") == "agent.ready" and r.get("agent") == name,
                timeout=30,
            )
            if got is None:
                run.notes.append(f"spawn {name}: no agent.ready in 30 s")
                break
            run.spawn_return_ms.append((t_ret - t0) * 1000)
            run.spawn_ms.append((got[0] - t0) * 1000)
            time.sleep(0.05)


def leftovers() -> list[psutil.Process]:
    """Live processes carrying this bench's environment mark (agents, templates, brokers)."""
    found = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "status"]):
        if p.info["pid"] == me or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(psutil.Error):
            if p.environ().get(MARK_KEY) == MARK:
                found.append(p)
    return found


class PySpy:
    """`py-spy record` of one process into DIR/LABEL.txt (collapsed stacks)."""

    def __init__(self, out_dir: str, label: str, pid: int) -> None:
        exe = Path(sys.executable).parent / "py-spy"
        self.path = Path(out_dir) / f"{label}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.argv = [str(exe), "record", "--nonblocking", "--format", "raw", "-r", "50"]
        self.argv += ["-o", str(self.path), "--pid", str(pid)]
        self.proc: subprocess.Popen[bytes] | None = None
        if exe.exists():
            time.sleep(0.3)  # the interpreter must be up for py-spy to find it
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)
        self.stop()


# --- supervisord ----------------------------------------------------------------------


def stop_and_sweep(cleanup: Cleanup, proc: subprocess.Popen, run: Run, timeout: float) -> None:
    """Stop a supervisor, time it, and kill (and say) whatever of ours it left."""
    t0 = time.perf_counter()
    cleanup.stop(proc, timeout=timeout)
    run.stop_s = time.perf_counter() - t0
    left = leftovers()
    if left:
        run.notes.append(f"{len(left)} process(es) of ours left after the stop: killed")
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()


def run_supervisord(cleanup: Cleanup, n: int, args: argparse.Namespace) -> Run:
    run = Run("supervisord", n)
    pre = preflight("exec", n, 12.0)
    if pre:
        run.stop = pre
        return run
    bin_dir = bench_venv()
    command = " ".join(SLEEPER[:2]) + ' "' + SLEEPER[2] + '"'
    avail0 = meminfo()["MemAvailable"]
    names = [f"p{i:05d}" for i in range(n)]
    proc, tmp, t_launch = start_supervisord(cleanup, bin_dir, names, command)
    try:
        rpc = supervisor_rpc(tmp)
        deadline = time.perf_counter() + 120 + 0.05 * n
        infos: list[dict[str, Any]] = []
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                run.stop = f"supervisord exited ({proc.returncode})"
                return run
            try:
                infos = rpc.supervisor.getAllProcessInfo()
            except (OSError, xmlrpc.client.Fault, http.client.HTTPException):
                infos = []
            run.reached = sum(1 for p in infos if p["statename"] == "RUNNING")
            if len(infos) == n and run.reached == n:
                run.ready_s = time.perf_counter() - t_launch
                break
            time.sleep(0.05)
        else:
            run.stop = f"deadline: {run.reached}/{n} RUNNING"
            return run
        time.sleep(args.settle)
        pids = [p["pid"] for p in infos]
        rolls = [r for r in (rollup(p) for p in pids) if r]
        pss = [r["Pss"] for r in rolls]
        run.pss_med = median(pss)
        run.pss_mean = sum(pss) / len(pss)
        run.uss_mean = sum(r["Private_Clean"] + r["Private_Dirty"] for r in rolls) / len(rolls)
        run.daemon_rss = rss_kib(proc.pid)
        run.daemon_fds = fd_count(proc.pid)
        run.host_kib = (avail0 - meminfo()["MemAvailable"]) / n
        run.cpu = idle_cpu({"daemon": [proc.pid], "agents": pids}, args.idle_seconds)
        run.load = os.getloadavg()[0]
        run.status_ms = time_command(
            [str(bin_dir / "supervisorctl"), "-c", str(tmp / "supervisord.conf"), "status"],
            runs=args.status_runs,
            warmup=1,
            ok_codes=(0, 3),
        )
        return run
    finally:
        stop_and_sweep(cleanup, proc, run, timeout=60)


# --- report ---------------------------------------------------------------------------


def fmt(value: float, spec: str = ".1f") -> str:
    return "-" if value != value else format(value, spec)  # nan -> "-"


def med(values: Iterable[float]) -> float:
    values = list(values)
    return median(values) if values else float("nan")


def host_line() -> str:
    mem = meminfo()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        f"host: {os.cpu_count()} cores, {mem['MemTotal'] / MIB:.1f} GiB RAM "
        f"({mem['MemAvailable'] / MIB:.1f} GiB available now), RLIMIT_NOFILE {soft}/{hard}, "
        f"pid_max {read_int('/proc/sys/kernel/pid_max')}, "
        f"threads-max {read_int('/proc/sys/kernel/threads-max')}, "
        f"{threads_in_use()} tasks running"
    )


def report(runs: list[Run], args: argparse.Namespace) -> None:
    print()
    print(host_line())
    print(
        f'agentd: module agents (bench/scale_agent.py:Idle), cgroup = "{args.cgroup}"; idle CPU'
        f" over {args.idle_seconds:g} s; kill/spawn: medians of {args.kills}/{args.spawns}"
    )
    print()
    print(
        f"{'runner':<15}{'N':>6}{'up':>7}{'ready s':>9}{'PSS med':>9}{'PSS avg':>9}"
        f"{'USS avg':>9}{'host/ag':>9}{'dmn RSS':>9}{'brk RSS':>9}{'fds d/b':>12}"
        f"{'CPU d/b/a %':>18}{'status ms':>11}{'kill ms':>9}{'spawn ms':>10}"
    )
    print(f"{'':<37}" + "".join(f"{u:>9}" for u in ("KiB", "KiB", "KiB", "KiB", "MiB", "MiB")))
    for r in runs:
        if r.ready_s != r.ready_s:
            print(f"{r.label:<15}{r.n:>6}{r.reached:>7}  stopped: {r.stop}")
            continue
        cpu = "/".join(fmt(r.cpu.get(k, math.nan), ".2f") for k in ("daemon", "broker", "agents"))
        fds = f"{r.daemon_fds}/{r.broker_fds if r.broker_fds >= 0 else '-'}"
        print(
            f"{r.label:<15}{r.n:>6}{r.reached:>7}{fmt(r.ready_s, '.2f'):>9}"
            f"{fmt(r.pss_med, '.0f'):>9}{fmt(r.pss_mean, '.0f'):>9}{fmt(r.uss_mean, '.0f'):>9}"
            f"{fmt(r.host_kib, '.0f'):>9}{fmt(r.daemon_rss / 1024):>9}"
            f"{fmt(r.broker_rss / 1024):>9}{fds:>12}{cpu:>18}"
            f"{fmt(med(r.status_ms), '.0f'):>11}{fmt(med(r.kill_ms), '.2f'):>9}"
            f"{fmt(med(r.spawn_ms), '.2f'):>10}"
        )
    print()
    print("up: agents READY (programs RUNNING). ready s: launch -> daemon.ready (supervisord:")
    print("all RUNNING, its startsecs = 1 included). PSS/USS: per agent, smaps_rollup. host/ag:")
    print("MemAvailable drop per agent (kernel, cgroups, page tables included; noisy on a shared")
    print("host). fds d/b: open fds of daemon/broker. CPU d/b/a: daemon, broker, agents +")
    print("template (supervisord: supervisord, -, programs), % of one core. status: `agentd ctl")
    print("status` / `supervisorctl status` wall, median. kill/spawn: -> the agent.ready line.")
    print("hb=S: run again with heartbeat = S (the READY deadline) after a start that missed 10 s.")
    details(runs)
    targets(runs)
    profiles(runs)


def details(runs: list[Run]) -> None:
    print()
    print("details")
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for r in runs:
        print(f"  {r.label} {r.n}:")
        if r.stop:
            print(f"    stopped after {r.reached} READY: {r.stop}")
        if r.progress:
            every = r.progress[:: max(1, len(r.progress) // 12)]
            print("    READY by time: " + ", ".join(f"{t:.0f}s {k}" for t, k in every))
        if r.ready_s != r.ready_s:
            for note in r.notes:
                print(f"    {note}")
            continue
        line = []
        if r.span_s == r.span_s:
            line.append(f"first agent.starting -> last agent.ready {r.span_s:.2f} s")
        if r.template_pss == r.template_pss:
            line.append(f"template PSS {r.template_pss / 1024:.1f} MiB")
        line.append(f"stop (SIGTERM -> all gone) {r.stop_s:.1f} s")
        if "host" in r.cpu:
            line.append(
                f"host during the idle window: {r.cpu['host']:.0f}% of a core busy, "
                f"ours {r.cpu_total:.1f}%, load {r.load:.1f}"
            )
        print("    " + "; ".join(line))
        if "ksmd" in r.cpu:
            print(
                f"    KSM: merging levelled off {r.ksm_settle_s:.0f} s after all READY; ksmd "
                f"{r.cpu['ksmd']:.2f}% of a core in the idle window (counted in ours)"
            )
        if r.start_cpu_ms:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in r.start_cpu_ms.items())
            total = sum(r.start_cpu_ms.values())
            print(f"    CPU ms per agent, start to idle: {total:.2f} = {parts}")
        if r.daemon_fds > 0 and r.runner != "supervisord":
            per = r.daemon_fds / r.n
            print(
                f"    daemon fds {r.daemon_fds} = {per:.2f} per agent -> ~{soft / per:,.0f} "
                f"agents at RLIMIT_NOFILE {soft}; broker fds {r.broker_fds}"
            )
        if r.kill_ms:
            steps = ", ".join(f"{k} {med(v):.2f}" for k, v in r.kill_steps.items())
            print(
                f"    kill -> READY ms: median {med(r.kill_ms):.2f}, max {max(r.kill_ms):.1f}; "
                f"daemon stamps: {steps}"
            )
        if r.spawn_ms:
            print(
                f"    spawn -> READY ms: median {med(r.spawn_ms):.2f}, max {max(r.spawn_ms):.1f};"
                f" Client.spawn returned after {med(r.spawn_return_ms):.2f}"
            )
        if r.status_ms:
            print("    status ms: " + ", ".join(f"{v:.0f}" for v in r.status_ms))
        for note in r.notes:
            print(f"    {note}")


def targets(runs: list[Run]) -> None:
    print()
    print("targets (agentd; each at the largest N its mode reached)")
    modes = ("fork", "ksm", "exec")
    print(f"  {'':<30}{'target':>12}" + "".join(f"{m:>20}" for m in modes))
    best: dict[str, Run | None] = {}
    for mode in modes:
        done = [r for r in runs if r.runner == mode and r.ready_s == r.ready_s]
        best[mode] = max(done, key=lambda r: r.n) if done else None
    rows: list[tuple[str, str, float, Callable[[Run], float]]] = [
        ("agents running", ">=", TARGETS["agents"], lambda r: r.n),
        ("PSS per agent MiB (mean)", "<=", TARGETS["pss_mib"], lambda r: r.pss_mean / 1024),
        ("all READY s", "<=", TARGETS["ready_s"], lambda r: r.ready_s),
        ("kill -> READY ms (median)", "<=", TARGETS["kill_ms"], lambda r: med(r.kill_ms)),
        ("spawn -> READY ms (median)", "<=", TARGETS["spawn_ms"], lambda r: med(r.spawn_ms)),
        ("idle CPU, all, % of a core", "<=", TARGETS["cpu_pct"], lambda r: r.cpu_total),
        ("ctl status s (median)", "<=", TARGETS["status_s"], lambda r: med(r.status_ms) / 1000),
    ]
    for label, op, goal, get in rows:
        cells = []
        for mode in modes:
            r = best[mode]
            if r is None:
                cells.append("-")
                continue
            value = get(r)
            ok = value == value and (value >= goal if op == ">=" else value <= goal)
            if label == "agents running":
                verdict = "met" if ok else "NOT met"
            else:
                verdict = ("met" if r.n >= TARGETS["agents"] else f"met@{r.n}") if ok else "NOT met"
            cells.append(f"{fmt(value, '.2f')} {verdict}")
        print(
            f"  {label:<30}{op + ' ' + format(goal, 'g'):>12}" + "".join(f"{c:>20}" for c in cells)
        )
    print("  (met@N: met at the largest N that ran, short of 10,000)")


def profiles(runs: list[Run]) -> None:
    keys = ("count", "Rss", "Pss", "Private_Dirty", "Private_Clean", "Shared_Dirty", "Shared_Clean")
    heads = ("maps", "Rss", "Pss", "Priv dirty", "Priv clean", "Shr dirty", "Shr clean")
    for mode in ("fork", "exec"):
        done = [r for r in runs if r.runner == mode and r.profile]
        if not done:
            continue
        r = max(done, key=lambda r: r.n)
        print()
        print(f"where one agent's memory goes: {mode}, N = {r.n}, pid {r.profile_pid} (KiB, smaps)")
        print(f"  {'mapping':<48}" + "".join(f"{h:>11}" for h in heads))
        total: dict[str, int] = defaultdict(int)
        rows = sorted(r.profile.items(), key=lambda kv: -kv[1].get("Pss", 0))
        for name, vals in rows:
            for k in keys:
                total[k] += vals.get(k, 0)
            if vals.get("Pss", 0) < 8 and vals.get("Rss", 0) < 64:
                continue
            print(f"  {name[:48]:<48}" + "".join(f"{vals.get(k, 0):>11}" for k in keys))
        print(f"  {'(all mappings)':<48}" + "".join(f"{total[k]:>11}" for k in keys))


# --- main ---------------------------------------------------------------------------


def main() -> int:
    global MEM_FRACTION
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,5000,10000")
    parser.add_argument("--modes", default="fork,ksm,exec")
    parser.add_argument(
        "--quick", action="store_true", help="sizes 20,100; 5 kills/spawns; 3 s idle"
    )
    parser.add_argument("--no-supervisord", action="store_true")
    parser.add_argument(
        "--no-fit",
        dest="fit",
        action="store_false",
        help="when a size does not fit the host, stop there (default: run the most that fit)",
    )
    parser.add_argument(
        "--mem-fraction",
        type=float,
        default=MEM_FRACTION,
        help="a size's estimated memory must fit in this share of MemAvailable",
    )
    parser.add_argument("--supervisord-programs", type=int, default=500)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument(
        "--settle", type=float, default=3.0, help="pause after READY before measuring"
    )
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument(
        "--ksm-step",
        type=int,
        default=1000,
        help="mode ksm: start the pool in steps of this many, each once KSM made room",
    )
    parser.add_argument(
        "--ksm-scan",
        type=int,
        default=5000,
        help="mode ksm: ksmd's pages_to_scan while agents start and merge",
    )
    parser.add_argument(
        "--ksm-idle-scan",
        type=int,
        default=100,
        help="mode ksm: ksmd's pages_to_scan in the idle window (100 is the kernel's default)",
    )
    parser.add_argument(
        "--ksm-wait",
        type=float,
        default=900.0,
        help="mode ksm: seconds at most for KSM to make room for a step, or to level off",
    )
    parser.add_argument("--spawns", type=int, default=20)
    parser.add_argument("--status-runs", type=int, default=5)
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=None,
        help="the agents' heartbeat (and READY deadline); default: agentd's (10 s), and a "
        "size whose agents miss it is run again with a longer one",
    )
    parser.add_argument("--cgroup", default="auto", choices=("auto", "required", "off"))
    parser.add_argument(
        "--py-spy",
        default="",
        metavar="DIR",
        help="py-spy record the daemon's start and idle into DIR",
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.kills, args.spawns = "20,100", 5, 5
        args.idle_seconds, args.settle, args.status_runs = 3.0, 1.0, 3
        args.supervisord_programs = min(args.supervisord_programs, 50)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    MEM_FRACTION = args.mem_fraction
    modes = [m for m in args.modes.split(",") if m]

    install_sigterm_as_interrupt()
    cleanup = Cleanup()
    runs: list[Run] = []
    log(host_line())
    try:
        for mode in modes:
            cost = DEFAULT_COST_MIB[mode]
            queue, largest = list(sizes), 0
            while queue:
                n = queue.pop(0)
                why = preflight(mode, n, cost)
                if why:
                    log(f"{mode} {n}: skipped: {why}")
                    runs.append(Run(mode, n, stop=f"not started: {why}"))
                    fit = fitting(cost)
                    if args.fit and largest < fit < n:
                        log(f"{mode}: {fit} agents fit: running that size instead")
                        queue = [fit]
                        continue
                    break
                log(f"{mode} {n}: starting (estimate {cost:.1f} MiB/agent) ...")
                run = sized_run(cleanup, mode, n, args, args.heartbeat)
                runs.append(run)
                if run.stop and "reason=hung" in run.stop and args.heartbeat is None:
                    # READY did not come within `heartbeat` (10 s) of the start: say so, and
                    # measure the size again with a READY deadline that the start can meet.
                    wait_memory_back()
                    run = sized_run(cleanup, mode, n, args, retry_heartbeat(mode, n))
                    runs.append(run)
                if run.stop:
                    break
                largest = n
                # the next size's estimate: what this one cost the host, never below its USS
                measured = max(run.host_kib, run.uss_mean) / 1024
                if measured == measured:
                    cost = max(measured * 1.15, 1.0)
                wait_memory_back()
        if not args.no_supervisord:
            n = args.supervisord_programs
            log(f"supervisord {n}: starting ...")
            runs.append(run_supervisord(cleanup, n, args))
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        cleanup.close()
        left = leftovers()
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if runs:
            report(runs, args)
        print(
            "\ncleanup: "
            + (
                f"{len(left)} process(es) of ours were left and killed now"
                if left
                else "no process of ours left behind"
            )
        )
    return 0


def sized_run(
    cleanup: Cleanup, mode: str, n: int, args: argparse.Namespace, heartbeat: float | None
) -> Run:
    run = run_agentd(cleanup, mode, n, args, profile=True, heartbeat=heartbeat)
    log(
        f"{run.label} {n}: {run.reached} READY"
        + (f" in {run.ready_s:.2f} s" if run.ready_s == run.ready_s else "")
        + (f"; stopped: {run.stop}" if run.stop else "")
    )
    return run


def retry_heartbeat(mode: str, n: int) -> float:
    """A READY deadline long enough for N concurrent starts on this host (seconds)."""
    per = 0.01 if mode == "fork" else 0.6  # CPU seconds of one start, roughly, over the cores
    return float(min(86400, round(30 + per * n / max(1, (os.cpu_count() or 1) / 2))))


def wait_memory_back(timeout: float = 60.0) -> None:
    """Between sizes: wait until the freed agents' memory shows as available again."""
    deadline = time.monotonic() + timeout
    prev = meminfo()["MemAvailable"]
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = meminfo()["MemAvailable"]
        if abs(now - prev) < 20 * 1024:  # settled within 20 MiB
            return
        prev = now


if __name__ == "__main__":
    sys.exit(main())
