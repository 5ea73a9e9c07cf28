"""The daemon: one asyncio loop driving the tree, the runtime, the broker and ctl.

Data flows one way. The tree decides (pure), `_apply` carries its actions out
through the runtime, and what the runtime observes (ready, exited) goes back
into the tree as inputs. Signals, broker events, timers and ctl commands are
just more inputs. The broker itself is supervised here, outside the user's
tree: restarted at once whenever it dies, stopped last.
"""

from __future__ import annotations

import asyncio
import grp
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from agentd.bus.log import get_logger

from . import reload as reloading
from . import spawn
from .capture import tail
from .dynamic import Dynamic, SpawnError
from .events import EventLog
from .metrics import AgentSample, MetricsEndpoint, Snapshot
from .proctable import ProcTable
from .reaper import reaper
from .runtime import ExitInfo, Guard, Proc, ProcessRuntime
from .spec import AgentSpec, PoolSpec, Spec, pool_member
from .tree import (
    Action,
    Note,
    Pause,
    Policy,
    Resume,
    SetTimer,
    Start,
    Stop,
    Tree,
    TreeFailed,
    TreeReady,
    TreeStopped,
)

if TYPE_CHECKING:
    from agentd.bus.envelope import Stats

BUS = "bus"


class AgentNow(NamedTuple):
    """One agent (or the broker) as `ctl status` and the metrics both report it."""

    name: str
    state: str
    supervisor: str | None
    restarts: dict[str, int]  # by reason (the tree's, or the broker supervisor's, own count)
    proc: Proc | None  # its live process, if any
    last_exit: ExitInfo | None


def tree_from_spec(spec: Spec) -> Tree:
    """Build the state machine from a validated spec."""
    agents = {name: Policy.of(a) for name, a in spec.agents.items()}
    return Tree(spec.supervisors, agents, root=spec.root)


def prepare_runtime_dir(path: str) -> None:
    """Create the runtime dir 0750, group `agentd` where that group exists."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o750)
    try:
        gid = grp.getgrnam("agentd").gr_gid
    except KeyError:
        return
    try:
        os.chown(directory, -1, gid)
    except PermissionError:
        pass


def prepare_state_dir(path: str) -> None:
    """Create state_dir 0750 if it is missing; an existing one keeps its owner and mode.

    Under systemd it already exists (StateDirectory=, with StateDirectoryMode=).
    """
    directory = Path(path)
    if directory.is_dir():
        return
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    os.chmod(directory, 0o750)  # whatever the umask


class Daemon:
    """A running agentd: owns the loop-side state of everything."""

    def __init__(self, spec: Spec, config_path: str | None = None) -> None:
        self.spec = spec
        self.config_path = config_path
        self.log = get_logger("agentd")
        self.events = EventLog(spec.daemon.event_history)
        self.dynamic = Dynamic(self)
        self.tree = tree_from_spec(spec)
        self.guard: Guard | None = None
        self.process_runtime: ProcessRuntime | None = None
        self.cgroups: Any = None  # cgroup.Subtree once isolated; None: process groups
        self.isolation: dict[str, Any] = {}  # as the daemon.isolation line said it
        self._isolation_reason = ""
        self.exit_code: int | None = None
        self.ready = False
        self.stopping = False
        self._done: asyncio.Future[int] | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self.started_at = time.time()
        self.control: Any = None
        self.metrics: MetricsEndpoint | None = None
        self.broker_child: Any = None
        self.notifier: Any = None
        self.exits: dict[str, int] = {}
        self._waiters: list[tuple[Any, asyncio.Future[None]]] = []
        self._stopped_waiters: list[asyncio.Future[None]] = []
        self._pool_templates: dict[str, AgentSpec] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self._resumed_at: dict[str, float] = {}  # ctl resume: no hung verdict for a heartbeat

    @staticmethod
    def now() -> float:
        return time.monotonic()

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> int:
        """Start the tree, serve until stopped; the exit status."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        prepare_runtime_dir(self.spec.daemon.runtime_dir)
        Path(self.spec.daemon.log_dir).mkdir(parents=True, exist_ok=True)
        try:
            prepare_state_dir(self.spec.daemon.state_dir)
        except OSError as exc:  # load() checked it: a race, or a full disk
            state_dir = self.spec.daemon.state_dir
            self.log.error("daemon.state_dir_failed", path=state_dir, error=str(exc))
            return 1
        spawn.set_child_subreaper()
        _raise_nofile_limit()
        from .notify import Notifier, watchdog_loop

        self.notifier = Notifier.from_env()
        self.notifier.status("starting")
        # From the loop itself: a stuck loop stops the pings and systemd steps in.
        # Without a watchdog for this process the task ends at once.
        self._watchdog = loop.create_task(watchdog_loop(self.notifier))
        for sig, handler in (
            (signal.SIGTERM, self._on_term),
            (signal.SIGINT, self._on_term),
            (signal.SIGHUP, self._on_hup),
            (signal.SIGCHLD, self._on_chld),
        ):
            loop.add_signal_handler(sig, handler)
        from .control import ControlServer

        self.control = ControlServer(self, self.spec.daemon.control)
        try:
            self.control.bind()
        except (RuntimeError, OSError) as exc:
            self.log.error(
                "daemon.control_failed", endpoint=self.spec.daemon.control, error=str(exc)
            )
            return 1
        # After the bind: a second daemon on the same runtime_dir stops at it and never
        # touches the first one's cgroups. Before the guard and the broker: under a
        # delegated cgroup the daemon moves into its leaf alone, its children follow it.
        if not self._isolate():
            await self.control.close()
            return 1
        self.guard = Guard()
        if self.cgroups is not None:
            for base in self.cgroups.guard_lines():
                self.guard.add_base(base)
        self.process_runtime = ProcessRuntime(
            self.spec.daemon,
            self.spec.agents,
            self.events,
            on_started=self._agent_started,
            on_exited=self._agent_exited,
            guard=self.guard,
            cgroups=self.cgroups,
        )
        restored = self.dynamic.restore()  # the last run's dynamic children, in the spec now
        self.metrics = MetricsEndpoint(self.metrics_snapshot, loop)
        if not self._serve_metrics():
            await self.control.close()
            self.guard.close()
            return 1
        self.log.info(
            "daemon.starting",
            pid=os.getpid(),
            config=self.config_path,
            agents=len(self.spec.agents),
        )
        try:
            from .bus import BrokerChild

            self.broker_child = BrokerChild(
                self.spec.daemon,
                self.events,
                self.guard,
                on_ready=self._bus_ready,
                on_hung=self._bus_hung,
                on_request=self._bus_request,
            )
            await self.broker_child.start(self.spec)
            if not self.stopping:  # SIGTERM while the broker was starting: no tree at all
                self._apply(self.tree.start(self.now()))
                self._background(self.dynamic.settle(restored))
            code = await self._done
            await self.broker_child.stop()
            for future in self._stopped_waiters:
                if not future.done():
                    future.set_result(None)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                loop.remove_signal_handler(sig)
            if self._watchdog is not None:
                self._watchdog.cancel()
            self.notifier.close()
            if self.control is not None:
                await self.control.close()
            if self.metrics is not None:
                await self.metrics.close()
            if self.process_runtime is not None:
                self.process_runtime.close_templates()
                self.process_runtime.close_logs()
            if self.broker_child is not None:
                self.broker_child.close_logs()
            if self.guard is not None:
                self.guard.close()
            if self.cgroups is not None:
                self.cgroups.close()
        return code

    def _serve_metrics(self) -> bool:
        """`daemon.metrics`: the HTTP(S) endpoint; False (logged) if it cannot be served."""
        assert self.metrics is not None
        daemon = self.spec.daemon
        if daemon.metrics is None:
            return True
        try:
            self.metrics.serve(daemon.metrics, daemon.metrics_tls_cert, daemon.metrics_tls_key)
        except (OSError, ValueError) as exc:  # the port is taken, a cert that does not load
            self.log.error("daemon.metrics_failed", address=daemon.metrics, error=str(exc))
            return False
        tls = daemon.metrics_tls_cert is not None
        self.log.info("daemon.metrics", address=daemon.metrics, tls=tls)
        return True

    def _isolate(self) -> bool:
        """A cgroup subtree for the agents, or today's process groups, said out loud.

        One `daemon.isolation` line; `required` without a usable tree refuses to start.
        """
        from . import cgroup

        daemon = self.spec.daemon
        reason = "daemon.cgroup = off"
        leftovers = 0
        if daemon.cgroup != "off":
            try:
                tag = cgroup.tag_for(daemon.runtime_dir)
                subtree = cgroup.open_subtree(cgroup.detect(), tag, daemon.cgroup_root)
                leftovers = subtree.clean_leftovers()
                self.cgroups = subtree
            except (cgroup.Unavailable, OSError) as exc:
                reason = f"no writable cgroup tree: {exc}"
        self._isolation_reason = reason
        self.isolation = isolation_info(self.spec, self.cgroups, reason)
        missing = self.isolation["unenforced"] + self.isolation["sampled"]
        if daemon.cgroup == "required" and (self.cgroups is None or missing):
            what = reason if self.cgroups is None else f"no controller for {', '.join(missing)}"
            self.log.error(
                "daemon.isolation",
                **self.isolation,
                error=f"daemon.cgroup = required, but {what}; agentd does not start",
            )
            if self.cgroups is not None:
                self.cgroups.close()
            return False
        fell_back = self.cgroups is None and daemon.cgroup != "off"
        quiet = not (fell_back or self.isolation["unenforced"] or (self.cgroups and missing))
        log = self.log.info if quiet else self.log.warning
        extra: dict[str, Any] = {"leftovers_removed": leftovers}
        if os.environ.get("INVOCATION_ID") and self.isolation.get("how") == "created":
            log = self.log.warning  # a systemd unit, but agents outside it: a unit's kill misses
            extra["hint"] = "the unit's cgroup is not delegated: set Delegate=yes"
        log("daemon.isolation", **self.isolation, **extra)
        return True

    def shutdown(self) -> None:
        """Orderly stop: the whole tree in reverse order within shutdown_timeout."""
        if self.stopping:
            return
        self.stopping = True
        if self.broker_child is not None:
            self.broker_child.abort_start()
        if self.notifier is not None:
            self.notifier.stopping()
        self.events.emit("daemon.stopping", "agentd")
        loop = asyncio.get_running_loop()
        self._kill_timer = loop.call_later(
            self.spec.daemon.shutdown_timeout, self._shutdown_timed_out
        )
        self._apply(self.tree.shutdown(self.now()))

    def _shutdown_timed_out(self) -> None:
        self.log.warning("daemon.shutdown_timeout", timeout=self.spec.daemon.shutdown_timeout)
        assert self.process_runtime is not None
        self.process_runtime.kill_everything()

    async def shutdown_and_wait(self) -> None:
        """ctl shutdown: returns once the whole tree is stopped."""
        future = asyncio.get_running_loop().create_future()
        self._stopped_waiters.append(future)
        self.shutdown()
        await future

    def _finish(self, code: int) -> None:
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        if self._done is not None and not self._done.done():
            self._done.set_result(code)

    # --- signals ---------------------------------------------------------------------

    def _on_term(self) -> None:
        if self.stopping:
            # A second SIGTERM/SIGINT during shutdown: no more grace for anyone.
            self.log.warning("daemon.kill_all", reason="second stop signal")
            assert self.process_runtime is not None
            self.process_runtime.kill_everything()
            return
        self.shutdown()

    def _on_hup(self) -> None:
        """SIGHUP: reload, exactly like `ctl reload` (a bad config changes nothing)."""
        task = asyncio.get_running_loop().create_task(self._reload_quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_quietly(self) -> None:
        from .locate import ConfigError

        try:
            await self.reload_from_file()
        except ConfigError:
            pass  # already logged; the old config keeps running

    async def reload_from_file(self) -> dict[str, Any]:
        """Validate the config file again and apply it; raises ConfigError if invalid."""
        from .config import ConfigError, load

        async with self._reload_lock:
            self.notifier.reloading()
            try:
                spec = load(self.config_path)
                return await self.reload(spec)
            except ConfigError as exc:
                self.log.error("daemon.reload_failed", errors=[str(i) for i in exc.issues])
                raise
            finally:
                count = len(self.tree.agents())
                self.notifier.ready(status=f"{count} agents running")

    def _on_chld(self) -> None:
        """SIGCHLD: every exited child to its owner, orphans reaped (reaper.py)."""
        reaper.reap()

    # --- broker -> tree -----------------------------------------------------------------

    def _bus_ready(self, name: str, incarnation: int) -> None:
        assert self.process_runtime is not None
        self.process_runtime.mark_ready(name, incarnation)

    def _bus_hung(self, name: str, incarnation: int) -> None:
        assert self.process_runtime is not None
        proc = self.process_runtime.procs.get(name)
        if proc is None or proc.incarnation != incarnation or proc.stopping:
            return
        resumed = self._resumed_at.get(name)
        if proc.paused or (resumed is not None and self.now() - resumed < proc.spec.heartbeat):
            return  # frozen on purpose, or not had a heartbeat's time since: not hung
        self.events.emit("agent.hung", name, pid=proc.pid, incarnation=incarnation)
        self.process_runtime.kill(name, "hung", incarnation)

    # --- tree <-> runtime ---------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        """Carry out the tree's decisions."""
        assert self.process_runtime is not None
        for action in actions:
            match action:
                case Start(name=name, incarnation=incarnation):
                    self.process_runtime.start(name, incarnation)
                case Stop(name=name):
                    self.process_runtime.stop(name)
                case Pause(name=name):
                    if self.process_runtime.pause(name):
                        self.events.emit("agent.paused", name)
                case Resume(name=name):
                    if self.process_runtime.resume(name):
                        self._resumed_at[name] = self.now()
                        self.events.emit("agent.resumed", name)
                case SetTimer(key=key, delay=delay):
                    asyncio.get_running_loop().call_later(delay, self._timer, key)
                case Note(event=event, name=name, detail=detail):
                    self.events.emit(event, name, **detail)
                case TreeReady():
                    self.ready = True
                    count = len(self.tree.agents())
                    self.events.emit("daemon.ready", "agentd", agents=count)
                    if self.notifier is not None:
                        self.notifier.ready(status=f"{count} agents running")
                case TreeFailed(reason=reason):
                    self._crash_report(reason)
                    self._finish(1)
                case TreeStopped():
                    self._finish(0)
        self._check_waiters()

    def _timer(self, key: str) -> None:
        self._apply(self.tree.timer(key, self.now()))

    def _agent_started(self, name: str, incarnation: int) -> None:
        self._apply(self.tree.started(name, self.now(), incarnation))

    def _agent_exited(self, name: str, incarnation: int, info: ExitInfo) -> None:
        self.exits[name] = self.exits.get(name, 0) + 1
        if self.broker_child is not None:
            self.broker_child.agent_exited(name, incarnation)
        self._apply(
            self.tree.exited(
                name,
                self.now(),
                abnormal=info.abnormal,
                reason=info.reason,
                incarnation=incarnation,
            )
        )
        self.dynamic.sweep(name)

    def _crash_report(self, reason: str) -> None:
        assert self.process_runtime is not None
        exits: dict[str, Any] = {
            name: {"code": e.code, "signal": e.signal, "reason": e.reason, "stderr": e.stderr_tail}
            for name, e in self.process_runtime.last_exit.items()
        }
        self.log.critical("daemon.crash_report", reason=reason, last_exits=exits)

    # --- waiting on state ----------------------------------------------------------

    def _check_waiters(self) -> None:
        for predicate, future in list(self._waiters):
            if future.done():
                self._waiters.remove((predicate, future))
            elif predicate():
                future.set_result(None)
                self._waiters.remove((predicate, future))

    async def wait_until(self, predicate: Any, timeout: float) -> bool:
        """Wait (without polling) until `predicate()` holds after some tree input."""
        if predicate():
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        return True

    def _start_timeout(self, names: list[str]) -> float:
        specs = [self.spec.agents[n] for n in names if n in self.spec.agents]
        worst = max((max(a.start_seconds, a.heartbeat) + a.restart_delay for a in specs), default=1)
        return 10.0 + worst * max(1, len(specs))

    def _stop_timeout(self, names: list[str]) -> float:
        specs = [self.spec.agents[n] for n in names if n in self.spec.agents]
        # An agent with shutdown = "infinity" is waited for as long as a daemon stop.
        bound = self.spec.daemon.shutdown_timeout
        return 10.0 + sum(min(a.shutdown or 0, bound) for a in specs)

    # --- ctl commands -----------------------------------------------------------------

    def expand(self, name: str) -> list[str]:
        """A ctl name: an agent instance, a pool (all members) or a supervisor."""
        if name in self.tree.children:
            return [name]
        if name in self.spec.pools:
            return [n for n, a in self.spec.agents.items() if a.pool == name]
        return []

    async def stop_agents(self, names: list[str]) -> None:
        for name in names:
            self._apply(self.tree.stop_child(name, self.now()))
        await self.wait_until(
            lambda: all(self.tree.state(n) in ("stopped", "failed") for n in names),
            self._stop_timeout(names),
        )

    async def pause_agents(self, names: list[str]) -> list[str]:
        """ctl pause: freeze running agents; the names that are not (or not yet) paused."""
        for name in names:
            self._apply(self.tree.pause_child(name, self.now()))
        assert self.process_runtime is not None
        deadline = self.now() + 5.0
        while not all(
            self.process_runtime.frozen(n) for n in names if self.tree.state(n) == "paused"
        ):
            if self.now() > deadline:
                break
            await asyncio.sleep(0.005)  # the kernel freezes in the background: a few ms
        return [n for n in names if not self.process_runtime.frozen(n)]

    async def resume_agents(self, names: list[str]) -> list[str]:
        """ctl resume: thaw paused agents; the names that were not paused."""
        refused = [n for n in names if self.tree.state(n) != "paused"]
        for name in names:
            self._apply(self.tree.resume_child(name, self.now()))
        return refused

    async def start_agents(self, names: list[str]) -> list[str]:
        """ctl start; the names that did not reach running."""
        exits = {n: self.exits.get(n, 0) for n in names}
        for name in names:
            self._apply(self.tree.start_child(name, self.now()))
        return await self._await_running(names, exits)

    async def restart_agents(self, names: list[str]) -> list[str]:
        exits = {n: self.exits.get(n, 0) for n in names}
        before = {n: self.tree.children[n].incarnation for n in names}
        assert self.process_runtime is not None
        # New templates, so the restart runs the code on disk (SPEC §12).
        self.process_runtime.retire_templates(self._agents_under(names))
        for name in names:
            self._apply(self.tree.restart_child(name, self.now()))
        return await self._await_running(names, exits, before)

    def _agents_under(self, names: list[str]) -> list[str]:
        """The agents among `names` and under the supervisors among them."""
        wanted, out = set(names), []
        for agent in self.tree.agents():
            node = agent
            while node not in wanted and node != self.tree.root:
                node = self.tree.supervisor_of(node)
            if node in wanted:
                out.append(agent)
        return out

    async def _await_running(
        self,
        names: list[str],
        exits: dict[str, int],
        before: dict[str, int] | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        def settled(name: str) -> bool:
            child = self.tree.children.get(name)
            if child is None:
                return True
            if self._failed_since(name, exits, before):
                return True
            fresh = before is None or child.incarnation > before[name]
            return child.state == "running" and fresh

        timeout = self._start_timeout(names) if timeout is None else timeout
        await self.wait_until(lambda: all(settled(n) for n in names), timeout)
        return [
            n
            for n in names
            if n not in self.tree.children
            or self.tree.state(n) != "running"
            or self._failed_since(n, exits, before)
        ]

    def _failed_since(
        self, name: str, exits: dict[str, int], before: dict[str, int] | None
    ) -> bool:
        """Did `name` exit (other than by our stop) since the command began?"""
        allowed = 1 if before is not None else 0  # a restart's own stop
        if self.tree.children[name].is_supervisor:
            return False
        return self.exits.get(name, 0) - exits.get(name, 0) > allowed and (
            self.tree.state(name) != "running"
        )

    def isolation_status(self) -> dict[str, Any]:
        """`status --json`'s `isolation`, for the agents configured now (reloads included)."""
        return isolation_info(self.spec, self.cgroups, self._isolation_reason)

    def agents_now(self) -> Iterator[AgentNow]:
        """Every agent in start order, then the broker (`bus`): the rows of status and metrics."""
        assert self.process_runtime is not None
        for name in self.tree.agents():
            child = self.tree.children[name]
            proc = self.process_runtime.procs.get(name)
            last = self.process_runtime.last_exit.get(name)
            yield AgentNow(name, child.state, child.parent, child.restarts_by_reason, proc, last)
        if self.broker_child is not None:  # supervised here, outside the user's tree
            proc = self.broker_child.proc()
            state = "running" if proc is not None else "stopped"
            by_reason = self.broker_child.restarts_by_reason
            yield AgentNow(BUS, state, None, by_reason, proc, self.broker_child.last_exit())

    async def _bus_stats(self) -> Stats | None:
        return await self.broker_child.stats() if self.broker_child is not None else None

    async def status_rows(self) -> list[dict[str, Any]]:
        """`ctl status --json` rows, the broker (`bus`) included."""
        assert self.process_runtime is not None
        stats = await self._bus_stats()  # before the /proc pass: no await from here on
        now = time.time()
        table = ProcTable()  # one pass over /proc for every row
        return [self._row(a, now, table, stats) for a in self.agents_now()]

    def _row(
        self, a: AgentNow, now: float, table: ProcTable, stats: Stats | None
    ) -> dict[str, Any]:
        assert self.process_runtime is not None
        proc = a.proc if _alive(a.proc) else None
        last = a.last_exit
        held, in_flight = _bus_figures(a.name, stats)
        return {
            "name": a.name,
            "state": a.state,
            "pid": proc.pid if proc else None,
            "uptime": round(now - proc.started_at, 3) if proc else None,
            "restarts": sum(a.restarts.values()),
            "supervisor": a.supervisor,
            "last_exit": None
            if last is None
            else {
                "code": last.code,
                "signal": signal.Signals(last.signal).name if last.signal else None,
                "reason": last.reason,
            },
            "rss": self.process_runtime.rss(proc, table) if proc else None,
            "cpu": self.process_runtime.cpu(proc, table) if proc else None,
            "held": held,
            "in_flight": in_flight,
        }

    async def metrics_snapshot(self) -> Snapshot:
        """What one scrape reports: the agents from one /proc pass, the broker's counters."""
        stats = await self._bus_stats()  # before the /proc pass: no await from here on
        table = ProcTable()
        samples = []
        for a in self.agents_now():
            proc = a.proc if _alive(a.proc) else None
            samples.append(
                AgentSample(
                    a.name,
                    up=a.state in ("running", "paused"),  # paused: held by ctl, not down
                    restarts=dict(a.restarts),  # a copy: the scrape reads it on another thread
                    rss=table.tree_rss(proc.pid) if proc else None,
                    cpu_seconds=table.cpu_seconds(proc.pid) if proc else None,
                    start_time=proc.started_at if proc else None,
                )
            )
        return Snapshot(samples, None if stats is None else dict(stats.counters))

    def tree_view(self) -> dict[str, Any]:
        """The supervision tree with strategies and states, for `ctl tree`."""
        procs = self.process_runtime.procs if self.process_runtime is not None else {}

        def node(name: str) -> dict[str, Any]:
            sup = self.tree.sups[name]
            children = []
            for child_name in sup.children:
                child = self.tree.children[child_name]
                if child.is_supervisor:
                    children.append(node(child_name))
                else:
                    proc = procs.get(child_name)
                    children.append(
                        {
                            "name": child_name,
                            "type": "agent",
                            "state": child.state,
                            "restart": child.restart,
                            "pid": proc.pid if proc and proc.pid else None,
                        }
                    )
            dynamic = self.spec.supervisors.get(name)
            extra = {}
            if dynamic is not None and dynamic.strategy == "dynamic":
                extra = {"template": dynamic.template, "max_children": dynamic.max_children}
            return {
                **extra,
                "name": name,
                "type": "supervisor",
                "strategy": sup.spec.strategy,
                "max_restarts": sup.spec.max_restarts,
                "max_seconds": sup.spec.max_seconds,
                "state": sup.phase,
                "children": children,
            }

        return node(self.tree.root)

    def log_tail(self, name: str, lines: int) -> list[str]:
        return tail(Path(self.spec.daemon.log_dir) / f"{name}.log", lines)

    def follow_log(self, name: str) -> asyncio.Queue[str]:
        assert self.process_runtime is not None
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=10_000)
        self.process_runtime._log(name).followers.add(queue)
        return queue

    def unfollow_log(self, name: str, queue: asyncio.Queue[str]) -> None:
        assert self.process_runtime is not None
        log = self.process_runtime.logs.get(name)
        if log is not None:
            log.followers.discard(queue)

    async def scale(self, pool: str, count: int) -> dict[str, Any]:
        """Grow or shrink a pool; the highest-numbered members stop first."""
        assert self.process_runtime is not None
        members = [n for n, a in self.spec.agents.items() if a.pool == pool]
        members.sort(key=lambda n: int(n.rpartition("@")[2]))
        template = self.spec.agents[members[0]] if members else self._pool_template(pool)
        supervisor = self.spec.pools[pool].supervisor
        agents = dict(self.spec.agents)
        added, removed = [], []
        for index in range(len(members), count):
            name = pool_member(pool, index)
            agents[name] = msgspec.structs.replace(template, name=name)
            added.append(name)
        removed = members[count:]
        for name in removed:
            del agents[name]
        self._pool_templates[pool] = template
        sup_spec = self.spec.supervisors[supervisor]
        children = list(sup_spec.children)
        anchor = children.index(members[-1]) + 1 if members else len(children)
        if removed:
            children = [c for c in children if c not in removed]
            anchor = min(anchor, len(children))
        children[anchor:anchor] = added
        supervisors = dict(self.spec.supervisors)
        supervisors[supervisor] = msgspec.structs.replace(sup_spec, children=tuple(children))
        pools = dict(self.spec.pools)
        pools[pool] = PoolSpec(pool, count, supervisor)
        self.spec = msgspec.structs.replace(
            self.spec, agents=agents, supervisors=supervisors, pools=pools
        )
        self.process_runtime.agents = dict(agents)
        self._bus_table_changed()
        for name in reversed(removed):
            self._apply(self.tree.remove_child(name, self.now()))
        for offset, name in enumerate(added):
            self._apply(
                self.tree.add_child(
                    supervisor,
                    name,
                    self.now(),
                    agents={name: Policy.of(agents[name])},
                    index=anchor + offset,
                )
            )
        await self.wait_until(
            lambda: (
                all(n not in self.tree.children for n in removed)
                and all(self.tree.state(n) == "running" for n in added if n in self.tree.children)
            ),
            self._start_timeout(added) + self._stop_timeout(removed),
        )
        return {"pool": pool, "replicas": count, "added": added, "removed": removed}

    def _pool_template(self, pool: str) -> AgentSpec:
        try:
            return self._pool_templates[pool]
        except KeyError:
            raise LookupError(f"pool `{pool}` has no members to copy") from None

    async def reload(self, new: Spec) -> dict[str, Any]:
        """Apply the difference between the running spec and `new`."""
        assert self.process_runtime is not None
        old = self.spec
        new = self.dynamic.carry(new)  # running dynamic children stay, from the new template
        plan = reloading.diff(old, new)
        for pool in new.pools:
            members = [a for a in new.agents.values() if a.pool == pool]
            if members:
                self._pool_templates[pool] = members[0]
        self.spec = msgspec.structs.replace(new, daemon=old.daemon)
        self.process_runtime.agents = dict(new.agents)
        self.process_runtime.retire_templates()  # those no agent uses now
        self.process_runtime.retire_templates(plan.changed_agents)  # changed: new code too
        self._bus_table_changed()
        self.dynamic.save_quietly()
        before = {n: self.tree.children[n].incarnation for n in plan.changed_agents}
        now = self.now()
        for name in plan.removed:
            self._apply(self.tree.remove_child(name, now))
        self.tree.update_supervisor(new.supervisors[new.root])
        for name in plan.changed_supervisors:
            self.tree.update_supervisor(new.supervisors[name])
        for item in plan.added:
            agents, supervisors = reloading.subtree(new, item.name)
            self._apply(
                self.tree.add_child(
                    item.parent,
                    item.name,
                    now,
                    agents=agents,
                    supervisors=supervisors,
                    index=item.index,
                )
            )
        for name in plan.changed_agents:
            spec = new.agents[name]
            self.tree.set_agent(name, Policy.of(spec))
            self._apply(self.tree.restart_child(name, now))
        for name in plan.changed_supervisors:
            if name != new.root:
                self._apply(self.tree.restart_child(name, now))
        added = [a.name for a in plan.added]
        removed = list(plan.removed)

        def done() -> bool:
            if any(n in self.tree.children for n in removed):
                return False
            for n in added + plan.changed_supervisors:
                if n in self.tree.children and self.tree.state(n) in (
                    "starting",
                    "stopping",
                    "stopped",
                ):
                    return False
            return all(
                self.tree.children[n].incarnation > before[n]
                and self.tree.state(n) not in ("starting", "stopping")
                for n in plan.changed_agents
            )

        await self.wait_until(done, 60.0)
        self.events.emit(
            "daemon.reloaded",
            "agentd",
            added=added,
            removed=removed,
            changed=plan.changed_agents + plan.changed_supervisors,
        )
        result = {
            "added": added,
            "removed": removed,
            "changed": plan.changed_agents + plan.changed_supervisors,
        }
        if plan.daemon_changed:
            result["warning"] = "[daemon] settings changed: restart agentd to apply them"
        return result

    def _bus_request(self, frame: Any, reply: Any) -> None:
        """A spawn or terminate from the bus: the same code as `ctl spawn`/`terminate`."""
        from agentd.bus.envelope import Spawn

        async def serve() -> None:
            try:
                if isinstance(frame, Spawn):
                    await self.dynamic.spawn(frame.supervisor, frame.name, frame.args)
                else:
                    await self.dynamic.terminate(frame.name)
            except SpawnError as exc:
                reply(False, str(exc))
            except Exception as exc:  # a bug must not leave the caller waiting
                self.log.exception("dynamic.error", frame=type(frame).__name__)
                reply(False, f"internal error: {exc}")
            else:
                reply(True, None)

        self._background(serve())

    def _background(self, work: Any) -> None:
        """Run a coroutine on the loop, kept referenced until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _bus_table_changed(self) -> None:
        """Tell the broker which agents exist now (reload, scale)."""
        if self.broker_child is not None:
            self.broker_child.set_agents(self.spec)

    # --- views --------------------------------------------------------------------------

    def agent_spec(self, name: str) -> AgentSpec | None:
        return self.spec.agents.get(name)


def _alive(proc: Proc | None) -> bool:
    return proc is not None and bool(proc.pid) and not proc.exited


def _bus_figures(name: str, stats: Stats | None) -> tuple[int | None, int | None]:
    """(held, in_flight) of one status row; None, None if the broker did not answer.

    held: what the broker keeps for the agent and has not handed over (its hold
    queue, and for ack = true its mailbox's pending signals). The broker's own row
    (`bus`) has the totals, which include what waits for a pool as a whole.
    """
    if stats is None:
        return None, None
    if name == BUS:
        c = stats.counters
        return c.get("held_now", 0) + c.get("pending_now", 0), c.get("in_flight_now", 0)
    figures = stats.agents.get(name)
    if figures is None:
        return 0, 0
    return figures.held + figures.pending, figures.in_flight


def isolation_info(spec: Spec, cgroups: Any, reason: str) -> dict[str, Any]:
    """The isolation in force: the `daemon.isolation` line and `status --json`'s field.

    `unenforced`: limits some agent sets that nothing enforces here (pids and
    cpu_percent need their cgroup controller); `sampled`: memory limits checked by
    the RSS sampler instead of the kernel.
    """
    from .cgroup import LIMIT_CONTROLLER

    used = {
        key
        for agent in spec.agents.values()
        for key in LIMIT_CONTROLLER
        if getattr(agent.limits, key)
    }
    if cgroups is None:
        return {
            "mode": "process_group",
            "reason": reason,
            "unenforced": sorted(used - {"memory_mb"}),
            "sampled": sorted(used & {"memory_mb"}),
        }
    served = cgroups.controllers
    missing = sorted(key for key in used if LIMIT_CONTROLLER[key] not in served)
    return {
        "mode": "cgroup",
        "layout": cgroups.layout.kind,
        "subtree": cgroups.main,
        "how": cgroups.how,
        "controllers": served,
        "unenforced": [key for key in missing if key != "memory_mb"],
        "sampled": [key for key in missing if key == "memory_mb"],
    }


def _raise_nofile_limit() -> None:
    """Thousands of agents need two pipes each: lift the soft fd limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_daemon(spec: Spec, config_path: str | None) -> int:
    """`agentd run`: the daemon in the foreground; returns the exit status."""
    daemon = Daemon(spec, config_path)
    try:
        return asyncio.run(daemon.run())
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout.flush()
