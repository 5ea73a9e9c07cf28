"""The real driver (daemon/driver.py) on a fake runtime, a fake loop and a fake clock.

`Sim` builds a `Driver` from supervisor specs, as the daemon does, and attaches
`FakeRuntime`, which carries out Start and Stop at once and reports back the way
ProcessRuntime does: later, from the loop (`FakeLoop`, drained after every input),
never from inside the action. A Start is ready at once unless `auto_ready` is
off; a Stop ends the process at once. Timers run on the fake clock (`advance`).
Everything is recorded in order: what the tree tests assert on.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentd.daemon.driver import Driver
from agentd.daemon.runtime import ExitInfo
from agentd.daemon.spec import AgentSpec, DaemonSpec, RestartType, Spec, SupervisorSpec
from agentd.daemon.tree import Action, Note, Policy, TreeFailed, TreeReady, TreeStopped


def sup(name: str, children: list[str], strategy: str = "one_for_one", **kw) -> SupervisorSpec:
    return SupervisorSpec(name=name, strategy=strategy, children=tuple(children), **kw)  # type: ignore[arg-type]


class FakeLoop:
    """call_soon and call_later on a fake clock; `run` drains what is due."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.ready: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self.timers: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()

    def call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        self.ready.append((callback, args))

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.timers, (self.clock() + delay, next(self._seq), callback, args))

    def run(self) -> None:
        """Run every callback that is due now, and what they schedule, until none is."""
        while True:
            if self.ready:
                callback, args = self.ready.popleft()
                callback(*args)
            elif self.timers and self.timers[0][0] <= self.clock():
                _, _, callback, args = heapq.heappop(self.timers)
                callback(*args)
            else:
                return


@dataclass
class FakeProc:
    name: str
    incarnation: int
    pid: int
    paused: str | None = None
    stopping: bool = False


class FakeRuntime:
    """Carries out the driver's actions instantly; reports through the loop."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.agents: dict[str, AgentSpec] = {}
        self.procs: dict[str, FakeProc] = {}
        self.last_exit: dict[str, ExitInfo] = {}

    def start(self, name: str, incarnation: int) -> None:
        sim = self.sim
        sim.next_pid += 1
        self.procs[name] = FakeProc(name, incarnation, sim.next_pid)
        sim.running[name] = sim.next_pid
        sim.log.append(("start", name))
        if sim.auto_ready:
            sim.loop.call_soon(sim.driver.agent_started, name, incarnation)

    def stop(self, name: str) -> None:
        sim = self.sim
        sim.log.append(("stop", name))
        sim.running.pop(name, None)
        proc = self.procs.pop(name, None)
        if proc is not None:
            info = ExitInfo(None, None, "stopped")
            self.last_exit[name] = info
            sim.loop.call_soon(sim.driver.agent_exited, name, proc.incarnation, info)

    def pause(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is not None:
            proc.paused = "sigstop"
        return proc is not None

    def resume(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is not None:
            proc.paused = None
        return proc is not None

    def frozen(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.paused is not None

    def kill(self, name: str, reason: str, incarnation: int) -> None:
        self.sim.crash(name, reason=reason)

    def mark_ready(self, name: str, incarnation: int) -> None:
        self.sim.loop.call_soon(self.sim.driver.agent_started, name, incarnation)

    def retire_templates(self, names: list[str] | None = None) -> None:
        pass


class Events:
    """The event log's `emit`, recorded: the tree's notes are what tests look at."""

    def __init__(self) -> None:
        self.emitted: list[Note] = []

    def emit(self, event: str, name: str, **data: Any) -> None:
        self.emitted.append(Note(event, name, data))


@dataclass
class Sim:
    spec: Spec
    now: float = 0.0
    auto_ready: bool = True
    log: list[tuple[str, str]] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)  # name -> pid
    outcome: list[object] = field(default_factory=list)
    next_pid: int = 100
    driver: Driver = field(init=False)

    def __post_init__(self) -> None:
        self.loop = FakeLoop(lambda: self.now)
        self.events = Events()
        self.driver = Driver(
            self.spec,
            self.events,  # type: ignore[arg-type]
            self,
            clock=lambda: self.now,
            call_later=self.loop.call_later,
        )
        self.runtime = FakeRuntime(self)
        self.driver.attach(self.runtime)

    @classmethod
    def make(
        cls,
        sups: list[SupervisorSpec],
        agents: dict[str, RestartType | tuple] | None = None,
        **kw: Any,
    ) -> Sim:
        """Supervisors, and agents by name: a restart type or a Policy's fields (restart,
        restart_delay, significant, pool); unnamed agents are permanent."""
        names = {c for s in sups for c in s.children} - {s.name for s in sups}
        specs: dict[str, AgentSpec] = {}
        for name in sorted(names):
            value = (agents or {}).get(name, "permanent")
            policy = Policy(*value) if isinstance(value, tuple) else Policy(value)
            specs[name] = AgentSpec(
                name=name,
                pool=policy.group,
                argv=("true",),
                bus_agent=False,
                restart=policy.restart,
                restart_delay=policy.restart_delay,
                significant=policy.significant,
            )
        daemon = DaemonSpec(runtime_dir="/none", log_dir="", control="", bus="", state_dir="")
        spec = Spec(daemon, "root", {s.name: s for s in sups}, specs, {})
        return cls(spec, **kw)

    # --- the daemon around the driver (driver.Outcomes) ------------------------------

    def tree_ready(self, agents: int) -> None:
        self.outcome.append(TreeReady())

    def tree_failed(self, reason: str) -> None:
        self.outcome.append(TreeFailed(reason))

    def tree_stopped(self) -> None:
        self.outcome.append(TreeStopped())

    def agent_exited(self, name: str, incarnation: int) -> None:
        pass

    def agents_changed(self, spec: Spec, names: object = None) -> None:
        pass

    # --- inputs -------------------------------------------------------------------------

    @property
    def tree(self):  # the pure tree, for its inputs (tree.stop_child(...) and so on)
        return self.driver.tree

    @property
    def view(self):
        return self.driver.view

    @property
    def notes(self) -> list[Note]:
        """The tree's Notes, as the driver emitted them (not the daemon's own events)."""
        return [n for n in self.events.emitted if not n.event.startswith("daemon.")]

    def apply(self, actions: list[Action]) -> None:
        """Hand the tree's actions to the real driver, then run the loop."""
        self.driver.apply(actions)
        self.loop.run()

    def start(self) -> Sim:
        self.driver.start()
        self.loop.run()
        return self

    def crash(self, name: str, abnormal: bool = True, reason: str = "exit") -> None:
        """The agent's process ends by itself (abnormal: code 1; else code 0)."""
        self.log.append(("crash", name))
        self.running.pop(name, None)
        self.runtime.procs.pop(name, None)
        info = ExitInfo(1 if abnormal else 0, None, reason)
        assert info.abnormal == abnormal, (reason, abnormal)
        incarnation = self.view.child(name).incarnation
        self.driver.agent_exited(name, incarnation, info)
        self.loop.run()

    def advance(self, seconds: float) -> None:
        """The clock moves on: the restart_delay timers that are due fire, in order."""
        self.now += seconds
        self.loop.run()

    def clear(self) -> None:
        self.log.clear()

    def ops(self, kind: str) -> list[str]:
        return [name for op, name in self.log if op == kind]
