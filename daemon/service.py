"""The daemon: bootstrap, signals and shutdown around one asyncio loop.

`run` makes the runtime dir, the control socket, the isolation, the guard, the
runtime and the broker, then hands the tree to the driver (driver.py), which
carries the tree's decisions out and serves the ctl commands that change it.
Signals are inputs like any other: SIGTERM/SIGINT stop the tree, SIGHUP reloads.
The broker itself is supervised here, outside the user's tree: restarted at
once whenever it dies, stopped last.
"""

from __future__ import annotations

import asyncio
import grp
import os
import signal
import sys
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentd.bus.log import get_logger

from . import spawn, views
from .capture import tail
from .control import ControlServer
from .driver import Driver
from .dynamic import Dynamic, SpawnError
from .events import EventLog
from .metrics import AgentSample, MetricsEndpoint, Snapshot
from .proctable import ProcTable
from .reaper import reaper
from .runtime import Guard, ProcessRuntime
from .spec import Spec
from .views import AgentNow

if TYPE_CHECKING:
    from agentd.bus.envelope import Stats


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
        self.config_path = config_path
        self.log = get_logger("agentd")
        self.events = EventLog(spec.daemon.event_history)
        self.driver = Driver(spec, self.events, self, clock=self.now)
        self.dynamic = Dynamic(self.driver)
        self.driver.children = self.dynamic
        self.guard: Guard | None = None
        self.process_runtime: ProcessRuntime | None = None
        self.cgroups: Any = None  # cgroup.Subtree once isolated; None: process groups
        self.isolation: dict[str, Any] = {}  # as the daemon.isolation line said it
        self._isolation_reason = ""
        self.exit_code: int | None = None
        self.stopping = False
        self._done: asyncio.Future[int] | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self.started_at = time.time()
        self.control: Any = None
        self.metrics: MetricsEndpoint | None = None
        self.broker_child: Any = None
        self.notifier: Any = None
        self._stopped_waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None

    @staticmethod
    def now() -> float:
        return time.monotonic()

    @property
    def spec(self) -> Spec:
        """The running spec (the driver's: reload, scale and spawn change it)."""
        return self.driver.spec

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
        self.control = ControlServer(self, self.spec.daemon.control, self.spec.daemon.keys_dir)
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
            self.driver.agents,
            self.events,
            on_started=self.driver.agent_started,
            on_exited=self.driver.agent_exited,
            guard=self.guard,
            cgroups=self.cgroups,
        )
        self.driver.attach(self.process_runtime)
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
                on_ready=self.driver.agent_ready,
                on_hung=self.driver.agent_hung,
                on_request=self._bus_request,
            )
            await self.broker_child.start(self.spec)
            if not self.stopping:  # SIGTERM while the broker was starting: no tree at all
                self.driver.start()
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
        self.isolation = views.isolation_info(self.spec, self.cgroups, reason)
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
        self.driver.shutdown()

    def _shutdown_timed_out(self) -> None:
        self.log.warning("daemon.shutdown_timeout", timeout=self.spec.daemon.shutdown_timeout)
        assert self.process_runtime is not None
        self.driver.abandon()
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
            self.driver.abandon()
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
                return await self.driver.reload(spec)
            except ConfigError as exc:
                self.log.error("daemon.reload_failed", errors=[str(i) for i in exc.issues])
                raise
            finally:
                count = len(self.driver.view.agents())
                self.notifier.ready(status=f"{count} agents running")

    def _on_chld(self) -> None:
        """SIGCHLD: every exited child to its owner, orphans reaped (reaper.py)."""
        reaper.reap()

    # --- outcomes of the driver ---------------------------------------------------------

    def tree_ready(self, agents: int) -> None:
        if self.notifier is not None:
            self.notifier.ready(status=f"{agents} agents running")

    def tree_failed(self, reason: str) -> None:
        self._crash_report(reason)
        self._finish(1)

    def tree_stopped(self) -> None:
        self._finish(0)

    def agent_exited(self, name: str, incarnation: int) -> None:
        """Before the tree hears of it: tell the broker."""
        if self.broker_child is not None:
            self.broker_child.agent_exited(name, incarnation)

    def agents_changed(self, spec: Spec, names: Collection[str] | None = None) -> None:
        """Tell the broker which agents exist now (reload, scale, spawn: `names` changed)."""
        if self.broker_child is not None:
            self.broker_child.set_agents(spec, names)

    def _crash_report(self, reason: str) -> None:
        assert self.process_runtime is not None
        exits: dict[str, Any] = {
            name: {"code": e.code, "signal": e.signal, "reason": e.reason, "stderr": e.stderr_tail}
            for name, e in self.process_runtime.last_exit.items()
        }
        self.log.critical("daemon.crash_report", reason=reason, last_exits=exits)

    # --- what status, tree and the metrics show (views.py, from one pass each) ---------

    def isolation_status(self) -> dict[str, Any]:
        """`status --json`'s `isolation`, for the agents configured now (reloads included)."""
        return views.isolation_info(self.spec, self.cgroups, self._isolation_reason)

    def agents_now(self) -> Iterator[AgentNow]:
        """Every agent in start order, then the broker (`bus`): the rows of status and metrics."""
        assert self.process_runtime is not None
        broker = None
        if self.broker_child is not None:
            b = self.broker_child
            broker = views.broker_now(b.proc(), b.restarts_by_reason, b.last_exit())
        runtime = self.process_runtime
        return views.agents_now(self.driver.view, runtime.procs, runtime.last_exit, broker)

    async def _bus_stats(self) -> Stats | None:
        return await self.broker_child.stats() if self.broker_child is not None else None

    async def status_rows(self) -> list[dict[str, Any]]:
        """`ctl status --json` rows, the broker (`bus`) included."""
        runtime = self.process_runtime
        assert runtime is not None
        stats = await self._bus_stats()  # before the /proc pass: no await from here on
        now = time.time()
        table = ProcTable()  # one pass over /proc for every row
        rows = []
        for a in self.agents_now():
            proc = views.live(a.proc)
            rss = runtime.rss(proc, table) if proc else None
            cpu = runtime.cpu(proc, table) if proc else None
            rows.append(views.status_row(a, now, stats, rss, cpu))
        return rows

    async def metrics_snapshot(self) -> Snapshot:
        """What one scrape reports: the agents from one /proc pass, the broker's counters."""
        stats = await self._bus_stats()  # before the /proc pass: no await from here on
        table = ProcTable()
        samples = []
        for a in self.agents_now():
            proc = views.live(a.proc)
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
        return views.tree_view(self.driver.view, procs, self.spec.supervisors)

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
