"""The process runtime: carries out Start/Stop for agents and reports what happened.

It owns the OS side of each agent — the Popen, its pid watched by the daemon's
reaper (SIGCHLD: no polling, no fd), the stdout/stderr pipes, the stop
escalation timers, the agent's cgroup (cgroup.py) or, without one, its process
group and the memory sampler — and reports back through two callbacks:
`on_started` (ready: READY on the bus or `start_seconds` up) and `on_exited`
(with an `ExitInfo` naming the reason). It makes no supervision decisions.

With a cgroup, the kernel keeps the limits: the OOM killer ends a group past
its memory limit, and the reason `memory` is known the moment the agent
exits (memory.events, or v1's OOM eventfd for a child the kernel killed
alone); a stop ends with cgroup.kill, so nothing the agent started survives it,
setsid() and double forks included.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from agentd.bus.log import get_logger

from . import cgroup, spawn
from .capture import TAIL_LINES, LogFile, StreamReader
from .events import EventLog
from .forkserver import ForkError, ForkServer, TemplateKey, template_key
from .proctable import ProcTable
from .reaper import reaper
from .spec import AgentSpec, DaemonSpec, Limits


class ExitInfo(msgspec.Struct, frozen=True):
    """How an agent ended; `reason` is one of the contract's exit reasons."""

    code: int | None
    signal: int | None
    reason: str  # exit | signal | hung | memory | stopped | start_failed
    stderr_tail: list[str] = []

    @property
    def abnormal(self) -> bool:
        if self.reason == "stopped":
            return False
        return not (self.reason == "exit" and self.code == 0)


@dataclass(eq=False)  # by identity: a set of them counts the ones starting
class Proc:
    """One running incarnation of an agent."""

    name: str
    incarnation: int
    spec: AgentSpec
    popen: subprocess.Popen[bytes] | None
    pid: int
    started_at: float = field(default_factory=time.time)
    forking: bool = False  # start = "fork": asked a template, no pid yet
    queued: bool = False  # waiting for room to start (ProcessRuntime.STARTING)
    exited: bool = False  # reaped
    ready: bool = False
    ready_early: bool = False  # READY from the bus before the fork's pid came back
    stopping: bool = False
    stop_hard: bool = False  # kill_everything while forking: SIGKILL on arrival
    kill_reason: str | None = None
    start_error: str | None = None
    readers: list[StreamReader] = field(default_factory=list)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    cpu_mark: tuple[float, float] | None = None  # (when, CPU seconds) at the last cpu() call
    group: cgroup.Group | None = None  # its cgroup; None: a process group only
    oom_fd: int = -1  # v1: the eventfd the kernel signals on OOM
    paused: str | None = None  # how it was paused: "freeze" (its cgroup) or "sigstop"

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()


SPARE_AFTER = 0.02  # seconds after a start (off its path): the next cgroup is made then
CORES = os.cpu_count() or 1

StartedCallback = Callable[[str, int], None]
ExitedCallback = Callable[[str, int, ExitInfo], None]


class Guard:
    """The companion process that kills agent groups if the daemon dies (guard.py)."""

    def __init__(self) -> None:
        script = Path(__file__).with_name("guard.py")
        self.popen = subprocess.Popen(
            [sys.executable, "-S", str(script)],
            stdin=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        assert self.popen.stdin is not None
        self._fd = self.popen.stdin.fileno()
        self._closing = False
        reaper.watch(self.popen.pid, self._exited)

    def _exited(self, status: int) -> None:
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        if not self._closing:  # agents now outlive a kill -9 of the daemon: say so
            get_logger("agentd.guard").error("guard.exited", code=self.popen.returncode)

    def add(self, pgid: int) -> None:
        self._write(f"+{pgid}\n")

    def remove(self, pgid: int) -> None:
        self._write(f"-{pgid}\n")

    def add_group(self, group: cgroup.Group) -> None:
        self._write(f"+{group.line()}\n")

    def remove_group(self, group: cgroup.Group) -> None:
        self._write(f"-{group.line()}\n")

    def add_base(self, path: str) -> None:
        """A directory of agentd's subtree to remove after the kills (the daemon made it)."""
        self._write(f"~{path}\n")

    def _write(self, line: str) -> None:
        try:
            os.write(self._fd, line.encode())
        except OSError:
            pass

    def close(self) -> None:
        """Normal exit: EOF lets the guard go (every group is already gone)."""
        self._closing = True
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        try:
            self.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def _fork_placement(group: cgroup.Group | None) -> tuple[str, list[str]]:
    """A forked agent's cgroup2 directory to be born in, and v1 cgroup.procs to join."""
    if group is None:
        return "", []
    return group.main if group.v2 else "", [
        os.path.join(d, "cgroup.procs") for d in group.v1_dirs()
    ]


def _described(exc: BaseException) -> str:
    """An error as a start_failed's stderr tail says it."""
    return f"{type(exc).__name__}: {exc}"


class ProcessRuntime:
    """Starts, stops and watches agent processes for the supervision tree.

    At most STARTING[mode] agents are between their start and READY at once; the
    others wait in line (state `starting`, no process yet), and their READY
    deadline runs from their real start. A pool of 600 exec agents started all at
    once on two cores spent so long importing that most missed the deadline and
    were killed as hung, again and again; forked agents are cheap to start, but
    ten thousand at once would starve the broker and the daemon all the same.
    """

    STARTING = {"exec": 2 * CORES, "fork": 16 * CORES}

    def __init__(
        self,
        daemon: DaemonSpec,
        agents: dict[str, AgentSpec],
        events: EventLog,
        on_started: StartedCallback,
        on_exited: ExitedCallback,
        guard: Guard | None = None,
        cgroups: cgroup.Subtree | None = None,
    ) -> None:
        self.daemon = daemon
        self.agents = dict(agents)
        self.events = events
        self.on_started = on_started
        self.on_exited = on_exited
        self.guard = guard
        self.cgroups = cgroups
        self.procs: dict[str, Proc] = {}
        self._starting: dict[str, set[Proc]] = {mode: set() for mode in self.STARTING}
        self._waiting: dict[str, deque[Proc]] = {mode: deque() for mode in self.STARTING}
        self.last_exit: dict[str, ExitInfo] = {}
        self.logs: dict[str, LogFile] = {}
        self._memory_task: asyncio.Task[None] | None = None
        self._forkserver: ForkServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # name -> (cgroup, (incarnation, limits) it was made for): the next one, made ahead
        self._spares: dict[str, tuple[cgroup.Group, tuple[int, Limits]]] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    # --- actions -----------------------------------------------------------------

    def start(self, name: str, incarnation: int) -> None:
        """Spawn `name` (exec, or fork from a template) when there is room; report
        on_started once started."""
        spec = self.agents[name]
        if len(self._starting[spec.start]) >= self.STARTING[spec.start]:
            proc = Proc(name, incarnation, spec, None, pid=0, queued=True)
            self.procs[name] = proc
            self._waiting[spec.start].append(proc)
            return
        self._launch(name, incarnation)

    def _leave_start_line(self, proc: Proc) -> None:
        """Ready or gone: its room goes to the next in line."""
        starting = self._starting[proc.spec.start]
        if proc not in starting:
            return
        starting.discard(proc)
        waiting = self._waiting[proc.spec.start]
        while waiting and len(starting) < self.STARTING[proc.spec.start]:
            next_one = waiting.popleft()
            if self.procs.get(next_one.name) is next_one:
                self._launch(next_one.name, next_one.incarnation)

    def _unqueue(self, proc: Proc) -> None:
        """Stopped before it started: it ends now, as stopped (it never ran)."""
        if proc.stopping:
            return  # already on its way out (a stop, then kill_everything)
        with contextlib.suppress(ValueError):
            self._waiting[proc.spec.start].remove(proc)
        proc.stopping = True
        self.loop.call_soon(self._finish, proc, None)

    def _launch(self, name: str, incarnation: int) -> None:
        """Start it now, holding a place in the start line until READY or its end."""
        spec = self.agents[name]
        self._spawn(name, incarnation, spec)
        self._starting[spec.start].add(self.procs[name])

    def _spawn(self, name: str, incarnation: int, spec: AgentSpec) -> None:
        self.events.emit("agent.starting", name, incarnation=incarnation)
        if spec.start == "fork":
            self._start_forked(spec, incarnation)
            return
        group = None
        try:
            if self.cgroups is not None:
                group = self._group_for(name, incarnation, spec.limits)
            popen = spawn.spawn(
                spec,
                incarnation,
                self.daemon.bus,
                self.daemon.death_signal,
                self.daemon.keys_dir,
                self.daemon.state_dir,
                group=group,
            )
        except (OSError, KeyError, subprocess.SubprocessError) as exc:
            if group is not None:
                self._retire(group)
            proc = Proc(name, incarnation, spec, None, pid=0, start_error=_described(exc))
            self.procs[name] = proc
            self.loop.call_soon(self._finish, proc, None)
            return
        proc = Proc(name, incarnation, spec, popen, popen.pid, group=group)
        self.procs[name] = proc
        self._spare_later(proc)
        assert popen.stdout is not None
        err = None if popen.stderr is None else os.dup(popen.stderr.fileno())
        self._capture(proc, os.dup(popen.stdout.fileno()), err)
        popen.stdout.close()
        if popen.stderr is not None:
            popen.stderr.close()
        self._watch(proc)

    def _start_forked(self, spec: AgentSpec, incarnation: int) -> None:
        """Ask the agent's template for a fork; the pid comes back asynchronously.

        With cgroups, the agent joins its cgroup (writes its pid into cgroup.procs)
        right after the fork, before it runs any agent code (forkserver.ForkRequest).
        """
        group = None
        if self.cgroups is not None:
            try:
                group = self._group_for(spec.name, incarnation, spec.limits)
            except OSError as exc:
                proc = Proc(spec.name, incarnation, spec, None, pid=0, start_error=_described(exc))
                self.procs[spec.name] = proc
                self.loop.call_soon(self._finish, proc, None)
                return
        proc = Proc(spec.name, incarnation, spec, None, pid=0, forking=True, group=group)
        self.procs[spec.name] = proc
        self._spare_later(proc)
        out, out_w = os.pipe()
        err, err_w = os.pipe() if not spec.redirect_stderr else (None, out_w)
        self._capture(proc, out, err)
        task = self.loop.create_task(self._fork(proc, out_w, err_w))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fork(self, proc: Proc, stdout: int, stderr: int) -> None:
        env = spawn.agent_env(
            proc.spec,
            proc.incarnation,
            self.daemon.bus,
            self.daemon.keys_dir,
            self.daemon.state_dir,
        )
        try:
            born_in, joins = _fork_placement(proc.group)
            pid = await self.forkserver.fork(
                proc.spec, proc.incarnation, env, stdout, stderr, born_in, joins
            )
        except (ForkError, OSError, KeyError, subprocess.SubprocessError) as exc:
            proc.forking = False
            proc.start_error = str(exc) if isinstance(exc, ForkError) else _described(exc)
            self._finish(proc, None)
            return
        finally:
            os.close(stdout)  # the agent has its own copies now
            if stderr != stdout:  # redirect_stderr: one pipe passed as both
                os.close(stderr)
        proc.forking = False
        proc.pid = pid
        self._watch(proc)
        if proc.stop_hard:
            spawn.kill_group(pid, signal.SIGKILL)
        elif proc.stopping:
            self.stop(proc.name)
        elif proc.ready_early:
            self._ready(proc)

    def _capture(self, proc: Proc, stdout: int, stderr: int | None) -> None:
        """Pump the agent's stdout and stderr (our ends of its pipes) into its log.

        The last reader keeps the tail lines: stderr's, or with redirect_stderr (no
        stderr pipe) the one pipe's.
        """
        log = self._log(proc.name)
        proc.readers = [StreamReader(self.loop, stdout, log, keep_tail=stderr is None)]
        if stderr is not None:
            proc.readers.append(StreamReader(self.loop, stderr, log, keep_tail=True))

    def _watch(self, proc: Proc) -> None:
        """A running agent, exec'd or forked alike: guard, reaper, start timers, memory."""
        spec = proc.spec
        if self.guard is not None and proc.group is None:  # a cgroup is guarded as a whole
            self.guard.add(proc.pid)
        reaper.watch(proc.pid, lambda status: self._reap(proc, status))
        if spec.bus_agent:
            # A bus agent is started by READY; silence until then counts as hung.
            proc.timers.append(self.loop.call_later(spec.heartbeat, self._start_timeout, proc))
        elif spec.start_seconds <= 0:
            self.loop.call_soon(self._ready, proc)
        else:
            proc.timers.append(self.loop.call_later(spec.start_seconds, self._ready, proc))
        group = proc.group
        if spec.limits.memory_mb:
            if group is None or "memory" not in group.dirs:
                self._ensure_memory_sampler()  # no memory cgroup: the fallback samples RSS
            else:
                proc.oom_fd = group.oom_eventfd() or -1
                if proc.oom_fd >= 0:
                    self.loop.add_reader(proc.oom_fd, self._oom, proc)

    @property
    def forkserver(self) -> ForkServer:
        if self._forkserver is None:
            self._forkserver = ForkServer(self.daemon, self.guard, self._template_user)
        return self._forkserver

    def _template_user(self, key: TemplateKey) -> AgentSpec | None:
        """An agent that still forks from `key`: a dead template is started again for it."""
        for spec in self.agents.values():
            if spec.start == "fork" and template_key(spec) == key:
                return spec
        return None

    def retire_templates(self, names: list[str] | None = None) -> None:
        """Re-make these agents' templates (new code), or (None) drop those no agent uses."""
        if self._forkserver is None:
            return
        if names is None:
            self._forkserver.retire_unwanted()
        else:
            self._forkserver.retire([self.agents[n] for n in names if n in self.agents])

    def close_templates(self) -> None:
        if self._forkserver is not None:
            self._forkserver.close()

    def stop(self, name: str) -> None:
        """stop_signal to the group, `shutdown` seconds' grace, then kill it whole."""
        proc = self.procs.get(name)
        if proc is not None and proc.queued:
            self._unqueue(proc)
            return
        if proc is not None and proc.forking:
            proc.stopping = True  # carried out once the fork's pid is back
            return
        if proc is None or proc.pid == 0:
            return
        spec = proc.spec  # the spec it was started with, even after a reload
        proc.stopping = True
        proc.cancel_timers()
        if spec.shutdown is None:
            self._kill_all_of(proc)
            return
        spawn.kill_group(proc.pid, spec.stop_signal)
        if proc.paused:
            self.resume(name)  # a frozen (or stopped) agent gets its signal once thawed
        if spec.shutdown == math.inf:
            return  # "infinity": its own time (a daemon stop is still bounded, kill_everything)
        proc.timers.append(self.loop.call_later(spec.shutdown, self._kill_all_of, proc))

    def kill(self, name: str, reason: str, incarnation: int | None = None) -> bool:
        """Kill a misbehaving agent at once (hung, memory); handled as a crash."""
        proc = self.procs.get(name)
        if proc is None or proc.pid == 0 or proc.stopping or proc.kill_reason:
            return False
        if incarnation is not None and proc.incarnation != incarnation:
            return False
        proc.kill_reason = reason
        proc.cancel_timers()
        self._kill_all_of(proc)
        return True

    def pause(self, name: str) -> bool:
        """Freeze the agent's cgroup (SIGSTOP to its process group without one)."""
        proc = self.procs.get(name)
        if proc is None or proc.pid == 0 or proc.exited or proc.stopping:
            return False
        proc.paused = "sigstop"
        if proc.group is not None and proc.group.can_freeze:
            try:
                proc.group.freeze(True)
                proc.paused = "freeze"
            except OSError:
                pass
        if proc.paused == "sigstop":
            spawn.kill_group(proc.pid, signal.SIGSTOP)
        return True

    def resume(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is None or not proc.paused:
            return False
        if proc.paused == "freeze" and proc.group is not None:
            try:
                proc.group.freeze(False)
            except OSError:
                pass  # gone already
        else:
            spawn.kill_group(proc.pid, signal.SIGCONT)
        proc.paused = None
        return True

    def frozen(self, name: str) -> bool:
        """Has the kernel finished freezing it (cgroup.events frozen)? SIGSTOP: at once."""
        proc = self.procs.get(name)
        if proc is None or not proc.paused:
            return False
        if proc.paused == "sigstop" or proc.group is None:
            return True
        try:
            return proc.group.frozen()
        except OSError:
            return False

    def _kill_all_of(self, proc: Proc) -> None:
        """SIGKILL the agent and everything it started: its cgroup, else its process group."""
        if proc.group is not None:
            try:
                proc.group.kill()
                return
            except (OSError, ValueError):
                pass
        spawn.kill_group(proc.pid, signal.SIGKILL)

    def _oom(self, proc: Proc) -> None:
        """v1: the kernel signalled an OOM in the agent's memory cgroup; end the group."""
        self._close_oom(proc)
        if self.procs.get(proc.name) is proc and not proc.exited:
            self._memory_exceeded(proc)
            self.kill(proc.name, "memory")

    def _close_oom(self, proc: Proc) -> None:
        if proc.oom_fd >= 0:
            self.loop.remove_reader(proc.oom_fd)
            os.close(proc.oom_fd)
            proc.oom_fd = -1

    def _memory_exceeded(self, proc: Proc) -> None:
        """agent.memory, with the cgroup's own high-water mark and OOM count."""
        assert proc.group is not None
        limit = proc.spec.limits.memory_mb * 1024 * 1024
        self.events.emit(
            "agent.memory",
            proc.name,
            limit=limit,
            peak=proc.group.memory_peak(),
            oom_kills=proc.group.oom_kills(),
        )

    def mark_ready(self, name: str, incarnation: int) -> None:
        """READY from the bus (for any agent that speaks it)."""
        proc = self.procs.get(name)
        if proc is not None and proc.incarnation == incarnation:
            self._ready(proc)

    def kill_everything(self) -> None:
        """Last resort (second SIGTERM, shutdown timeout): SIGKILL every group."""
        for proc in list(self.procs.values()):
            if proc.queued:
                self._unqueue(proc)
            elif proc.forking:
                proc.stopping = proc.stop_hard = True
            elif proc.pid:
                proc.stopping = True
                self._kill_all_of(proc)

    # --- internals -------------------------------------------------------------------

    def _log(self, name: str) -> LogFile:
        log = self.logs.get(name)
        if log is None:
            path = Path(self.daemon.log_dir) / f"{name}.log"
            log = LogFile(path, self.daemon.log_max_bytes, self.daemon.log_backups)
            self.logs[name] = log
        return log

    def _ready(self, proc: Proc) -> None:
        if proc.ready or proc.stopping or self.procs.get(proc.name) is not proc:
            return
        if proc.forking:
            proc.ready_early = True  # the bus was quicker than the template's answer
            return
        if proc.pid == 0 or proc.exited:
            return
        proc.ready = True
        proc.cancel_timers()
        self.events.emit("agent.ready", proc.name, pid=proc.pid, incarnation=proc.incarnation)
        self.on_started(proc.name, proc.incarnation)
        self._leave_start_line(proc)

    def _start_timeout(self, proc: Proc) -> None:
        if not proc.ready and self.procs.get(proc.name) is proc:
            self.events.emit("agent.hung", proc.name, pid=proc.pid, detail="no READY in time")
            self.kill(proc.name, "hung")

    def _reap(self, proc: Proc, status: int) -> None:
        """The process has exited: a zombie until this returns (the reaper reaps it)."""
        group = proc.group
        if group is None:
            # Whatever it forked dies with it; the zombie keeps the pgid from reuse.
            spawn.kill_group(proc.pid, signal.SIGKILL)
        else:
            self._close_oom(proc)
            if proc.spec.limits.memory_mb and not proc.kill_reason and group.oom_kills():
                proc.kill_reason = "memory"  # the kernel's OOM killer, this very moment
                self._memory_exceeded(proc)
            if group.populated():  # whatever it started (setsid, double forks) dies with it
                self._kill_all_of(proc)
        proc.exited = True
        if proc.popen is not None:
            proc.popen.returncode = os.waitstatus_to_exitcode(status)
        self._finish(proc, status)

    def _finish(self, proc: Proc, status: int | None) -> None:
        proc.cancel_timers()
        for reader in proc.readers:
            reader.drain()
            reader.close()
        tail = proc.readers[-1].tail_lines() if proc.readers else []
        code = sig = None
        if status is not None:
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
            else:
                code = os.WEXITSTATUS(status)
        if proc.start_error:
            reason, tail = "start_failed", proc.start_error.splitlines()[-TAIL_LINES:]
        elif proc.kill_reason:
            reason = proc.kill_reason
        elif proc.stopping:
            reason = "stopped"
        elif not proc.ready:
            reason = "start_failed"
        elif sig is not None:
            reason = "signal"
        else:
            reason = "exit"
        info = ExitInfo(code, sig, reason, tail)
        if proc.group is not None:  # after the restart this exit may cause: off its path
            self.loop.call_later(0.1, self._retire, proc.group)
            if proc.stopping and not proc.kill_reason:
                self._drop_spare(proc.name)  # stopped, not crashed: no hurry to come back
        elif self.guard is not None and proc.pid:
            self.guard.remove(proc.pid)
        if self.procs.get(proc.name) is proc:
            del self.procs[proc.name]
        self.last_exit[proc.name] = info
        self.events.emit(
            "agent.exited",
            proc.name,
            pid=proc.pid,
            incarnation=proc.incarnation,
            code=code,
            signal=signal.Signals(sig).name if sig else None,
            reason=reason,
            stderr_tail=tail,
        )
        self.on_exited(proc.name, proc.incarnation, info)
        self._leave_start_line(proc)

    def _spare_later(self, proc: Proc) -> None:
        """A restarted agent's next cgroup, made off the restart path (not for every first
        start: 200 agents at once would pay for 200 spares)."""
        if proc.group is not None and proc.incarnation > 0:
            limits = proc.spec.limits
            self.loop.call_later(
                SPARE_AFTER, self._make_spare, proc.name, proc.incarnation + 1, limits
            )

    def _group_for(self, name: str, incarnation: int, limits: Limits) -> cgroup.Group:
        """The cgroup of this incarnation: the spare made ahead if it fits, else a new one."""
        spare = self._spares.pop(name, None)
        if spare is not None:
            group, made_for = spare
            if made_for == (incarnation, limits):
                return group
            self._retire(group)  # a reload changed the limits, or the incarnations moved
        assert self.cgroups is not None
        group = self.cgroups.group(
            name, incarnation, limits.memory_mb, limits.pids, limits.cpu_percent
        )
        if self.guard is not None:
            self.guard.add_group(group)
        return group

    def _make_spare(self, name: str, incarnation: int, limits: Limits) -> None:
        """mkdir (and limits) for an incarnation that may come: a crash restart then only
        spawns. Kept while the agent runs; dropped when it is stopped rather than crashed.
        """
        proc = self.procs.get(name)
        if self.cgroups is None or name in self._spares or proc is None or proc.stopping:
            return
        if proc.incarnation != incarnation - 1:
            return  # restarted since: that incarnation has its cgroup already
        try:
            group = self.cgroups.group(
                name, incarnation, limits.memory_mb, limits.pids, limits.cpu_percent
            )
        except OSError:
            return  # made when it is needed, then
        if self.guard is not None:
            self.guard.add_group(group)
        self._spares[name] = (group, (incarnation, limits))

    def _drop_spare(self, name: str) -> None:
        spare = self._spares.pop(name, None)
        if spare is not None:
            self._retire(spare[0])

    def _retire(self, group: cgroup.Group, delay: float = 0.005) -> None:
        """Remove a finished agent's cgroup once its last process is gone (killed already).

        Processes die a moment after SIGKILL, so rmdir is retried, a little later
        each time; the guard keeps the group until then.
        """
        try:
            gone = group.remove()
        except OSError:
            gone = False
        if gone:
            if self.guard is not None:
                self.guard.remove_group(group)
            return
        if delay > 5.0:
            self.events.emit("agent.cgroup_busy", "agentd", cgroup=group.main)
            return
        self._kill_quietly(group)
        asyncio.get_running_loop().call_later(delay, self._retire, group, delay * 2)

    @staticmethod
    def _kill_quietly(group: cgroup.Group) -> None:
        try:
            group.kill()
        except (OSError, ValueError):
            pass

    def _ensure_memory_sampler(self) -> None:
        if self._memory_task is None or self._memory_task.done():
            self._memory_task = self.loop.create_task(self._sample_memory())

    async def _sample_memory(self) -> None:
        """Every `memory_check_interval`: RSS of each limited agent and its descendants."""
        while True:
            await asyncio.sleep(self.daemon.memory_check_interval)
            limited = [
                (proc, proc.spec.limits.memory_mb)
                for proc in self.procs.values()
                if proc.spec.limits.memory_mb
                and proc.pid
                and (proc.group is None or "memory" not in proc.group.dirs)
            ]
            if not limited:
                return
            table = ProcTable()
            for proc, limit_mb in limited:
                rss = self.rss(proc, table)
                if rss is not None and rss > limit_mb * 1024 * 1024:
                    self.events.emit(
                        "agent.memory", proc.name, rss=rss, limit=limit_mb * 1024 * 1024
                    )
                    self.kill(proc.name, "memory")

    def rss(self, proc: Proc, table: ProcTable | None = None) -> int | None:
        """Resident memory of the agent and everything it forked, in bytes.

        From its memory cgroup when it has one (the whole group, nothing missed);
        else pass one `ProcTable` when asking about many agents: /proc is read once.
        """
        if not proc.pid:
            return None
        if proc.group is not None and "memory" in proc.group.dirs:
            return proc.group.memory()
        return (table or ProcTable()).tree_rss(proc.pid)

    def cpu(self, proc: Proc, table: ProcTable | None = None) -> float | None:
        """CPU% of one core used by the agent since the previous call (0.0 the first time)."""
        if not proc.pid:
            return None
        if proc.group is not None:  # the whole group's CPU time
            taken, seconds = time.monotonic(), proc.group.cpu_seconds()
        else:
            table = table or ProcTable()
            taken, seconds = table.taken, table.cpu_seconds(proc.pid)
        if seconds is None:
            return None
        previous, proc.cpu_mark = proc.cpu_mark, (taken, seconds)
        if previous is None or taken <= previous[0]:
            return 0.0
        return round(100.0 * (seconds - previous[1]) / (taken - previous[0]), 1)

    def close_logs(self) -> None:
        for log in self.logs.values():
            log.close()
        self.logs.clear()
