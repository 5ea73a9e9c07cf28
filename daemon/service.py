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
from pathlib import Path
from typing import Any

from . import spawn
from .events import EventLog
from .log import get_logger
from .runtime import ExitInfo, Guard, Runtime
from .spec import AgentSpec, Spec
from .tree import (
    Action,
    Note,
    SetTimer,
    Start,
    Stop,
    Tree,
    TreeFailed,
    TreeReady,
    TreeStopped,
)

BUS = "bus"


def tree_from_spec(spec: Spec) -> Tree:
    """Build the state machine from a validated spec."""
    agents = {name: (a.restart, a.restart_delay) for name, a in spec.agents.items()}
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


class Daemon:
    """A running agentd: owns the loop-side state of everything."""

    def __init__(self, spec: Spec, config_path: str | None = None) -> None:
        self.spec = spec
        self.config_path = config_path
        self.log = get_logger("agentd")
        self.events = EventLog()
        self.tree = tree_from_spec(spec)
        self.guard: Guard | None = None
        self.runtime: Runtime | None = None
        self.exit_code: int | None = None
        self.ready = False
        self.stopping = False
        self._done: asyncio.Future[int] | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self.started_at = time.time()

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
        spawn.set_child_subreaper()
        _raise_nofile_limit()
        self.guard = Guard()
        self.runtime = Runtime(
            self.spec.daemon,
            self.spec.agents,
            self.events,
            on_started=self._agent_started,
            on_exited=self._agent_exited,
            guard=self.guard,
        )
        for sig, handler in (
            (signal.SIGTERM, self._on_term),
            (signal.SIGINT, self._on_term),
            (signal.SIGHUP, self._on_hup),
            (signal.SIGCHLD, self._on_chld),
        ):
            loop.add_signal_handler(sig, handler)
        self.log.info(
            "daemon.starting",
            pid=os.getpid(),
            config=self.config_path,
            agents=len(self.spec.agents),
        )
        try:
            self._apply(self.tree.start(self.now()))
            code = await self._done
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                loop.remove_signal_handler(sig)
            if self.runtime is not None:
                self.runtime.close_logs()
            if self.guard is not None:
                self.guard.close()
        return code

    def shutdown(self) -> None:
        """Orderly stop: the whole tree in reverse order within shutdown_timeout."""
        if self.stopping:
            return
        self.stopping = True
        self.events.emit("daemon.stopping", "agentd")
        loop = asyncio.get_running_loop()
        self._kill_timer = loop.call_later(
            self.spec.daemon.shutdown_timeout, self._shutdown_timed_out
        )
        self._apply(self.tree.shutdown(self.now()))

    def _shutdown_timed_out(self) -> None:
        self.log.warning("daemon.shutdown_timeout", timeout=self.spec.daemon.shutdown_timeout)
        assert self.runtime is not None
        self.runtime.kill_everything()

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
            assert self.runtime is not None
            self.runtime.kill_everything()
            return
        self.shutdown()

    def _on_hup(self) -> None:
        self.log.info("daemon.sighup")

    def _on_chld(self) -> None:
        assert self.runtime is not None and self.guard is not None
        self.runtime.reap_strays({self.guard.popen.pid})

    # --- tree <-> runtime ---------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        """Carry out the tree's decisions."""
        assert self.runtime is not None
        for action in actions:
            match action:
                case Start(name=name, incarnation=incarnation):
                    self.runtime.start(name, incarnation)
                case Stop(name=name):
                    self.runtime.stop(name)
                case SetTimer(key=key, delay=delay):
                    asyncio.get_running_loop().call_later(delay, self._timer, key)
                case Note(event=event, name=name, detail=detail):
                    self.events.emit(event, name, **detail)
                case TreeReady():
                    self.ready = True
                    self.events.emit("daemon.ready", "agentd", agents=len(self.tree.agents()))
                case TreeFailed(reason=reason):
                    self._crash_report(reason)
                    self._finish(1)
                case TreeStopped():
                    self._finish(0)

    def _timer(self, key: str) -> None:
        self._apply(self.tree.timer(key, self.now()))

    def _agent_started(self, name: str, incarnation: int) -> None:
        self._apply(self.tree.started(name, self.now(), incarnation))

    def _agent_exited(self, name: str, incarnation: int, info: ExitInfo) -> None:
        self._apply(
            self.tree.exited(
                name,
                self.now(),
                abnormal=info.abnormal,
                reason=info.reason,
                incarnation=incarnation,
            )
        )

    def _crash_report(self, reason: str) -> None:
        assert self.runtime is not None
        exits: dict[str, Any] = {
            name: {"code": e.code, "signal": e.signal, "reason": e.reason, "stderr": e.stderr_tail}
            for name, e in self.runtime.last_exit.items()
        }
        self.log.critical("daemon.crash_report", reason=reason, last_exits=exits)

    # --- views --------------------------------------------------------------------------

    def agent_spec(self, name: str) -> AgentSpec | None:
        return self.spec.agents.get(name)


def _raise_nofile_limit() -> None:
    """Hundreds of agents need pipes and pidfds: lift the soft fd limit to the hard one."""
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
